"""Fitting the calibrated sampler's coefficient table on converged trajectories: rollout least squares.

Given teacher trajectories (the states of a fine, converged run at each sigma of the N-step
schedule), step i's (c1, c2, c3) are fitted by least squares on the states the calibrated sampler
itself reaches (its own x_i, D_i and history, the earlier steps already calibrated), targeting the
teacher's x_{i+1}; so the N-step sampler lands on the teacher (cf. the rollout fits of learned
solvers: Zhou et al. 2024, AMED; Watson et al. 2021, learning fast samplers). Step i's residual is
linear in its coefficients:

    teacher_{i+1} - (r x_i + (1 - r) D_i) = (1 - r) [D_i - D_{i-1}, D_i - x_i, D_{i-1} - D_{i-2}] . (c1, c2, c3)

solved in float64 over every item's flattened values, lightly ridge-regularised (ridge times the
mean diagonal of the normal matrix). Terms without history (steps 0 and 1) keep coefficient 0.

The model is a callable denoise_fn(x [B, C, H, W], sigma: float) -> D [B, C, H, W], so this
module needs no ComfyUI. Shapes: teacher_states [M + 1, B, C, H, W] at teacher_sigmas [M + 1];
sigmas [N + 1], each one of teacher_sigmas; the table float64 [N, 3].
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch

from ..core.errors import KBError
from ..core.multistep import calibrated_step, check_sigmas, correction_terms, step_ratio, zero_coefficients

Denoise = Callable[[torch.Tensor, float], torch.Tensor]


@dataclass
class SamplerFit:
    """A fitted table and how close each step's rollout came to the teacher (mean squared error per value)."""

    coeffs: torch.Tensor          # float64 [N, 3]
    euler_step_mse: list[float]   # step i's plain Euler step from the sampler's own x_i vs teacher x_{i+1}
    fitted_step_mse: list[float]  # the calibrated step from the same x_i vs teacher x_{i+1}

    @property
    def final_mse(self) -> float:
        """The calibrated rollout's final state vs the teacher's."""
        return self.fitted_step_mse[-1]


def teacher_points(teacher_states, teacher_sigmas, sigmas) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The teacher's state at each of `sigmas` ([B, C, H, W] each) and the schedule float64 [N + 1]; KBError if not there."""
    sig = check_sigmas(sigmas)
    t_sig = torch.as_tensor(teacher_sigmas, dtype=torch.float64).detach().cpu().reshape(-1)
    if isinstance(teacher_states, torch.Tensor):
        states = list(teacher_states.unbind(0)) if teacher_states.ndim == 5 else None
    else:
        states = list(teacher_states)
    if states is None or not states or any(not isinstance(s, torch.Tensor) or s.ndim != 4 for s in states):
        raise KBError("teacher_states must be one [B, C, H, W] state per teacher sigma (a [M + 1, B, C, H, W] tensor or a "
                      "list of [B, C, H, W] tensors).")
    if len(states) != len(t_sig):
        raise KBError(f"got {len(states)} teacher states for {len(t_sig)} teacher sigmas; pass one state per sigma.")
    if any(s.shape != states[0].shape for s in states):
        raise KBError("the teacher states differ in shape; every state must be [B, C, H, W] for the same items.")
    picked = []
    for s in sig.tolist():
        close = torch.nonzero((t_sig - s).abs() <= 1e-5 * max(s, 1e-12)).flatten()
        if len(close) == 0:
            raise KBError(f"sigma {s:.6g} of the N-step schedule is not on the teacher's schedule; run the teacher on a "
                          "schedule that contains every sigma of the N-step one (e.g. karras with (steps - 1) a multiple "
                          "of N - 1).")
        picked.append(states[int(close[0])])
    if not all(torch.isfinite(p).all() for p in picked):
        raise KBError("the teacher states hold NaN or infinite values; rerun the teacher.")
    return picked, sig


def solve_step(columns: list[torch.Tensor], target: torch.Tensor, ridge: float) -> torch.Tensor:
    """Ridge least squares in float64: columns k x [P] values, target [P] -> k coefficients."""
    a = torch.stack([c.reshape(-1).double() for c in columns], dim=1)
    y = target.reshape(-1).double()
    gram = a.T @ a
    scale = torch.diagonal(gram)
    if not torch.isfinite(gram).all() or (scale <= 0).any():
        raise KBError("a correction term is zero or non-finite on every item (the predictions did not change between steps, "
                      "or the model returned NaN); fit on items whose trajectories move, with a working model.")
    lam = ridge * float(scale.mean())
    return torch.linalg.solve(gram + lam * torch.eye(len(columns), dtype=torch.float64), a.T @ y)


def fit_coefficients(teacher_states, teacher_sigmas, denoise_fn: Denoise, sigmas: Sequence[float] | torch.Tensor,
                     ridge: float = 1e-6) -> SamplerFit:
    """Fit the N-step table step by step on the sampler's own rollout from the teacher's x_0 (see the module doc)."""
    targets, sig = teacher_points(teacher_states, teacher_sigmas, sigmas)
    if not ridge >= 0 or ridge != ridge or ridge == float("inf"):
        raise KBError(f"ridge must be a finite number >= 0, got {ridge!r}.")
    table = zero_coefficients(len(sig) - 1)
    x = targets[0].clone()
    history: list[torch.Tensor] = []
    euler_mse, fitted_mse = [], []
    for i in range(len(sig) - 1):
        s, s_next = float(sig[i]), float(sig[i + 1])
        denoised = denoise_fn(x, s)
        if not isinstance(denoised, torch.Tensor) or denoised.shape != x.shape:
            raise KBError(f"denoise_fn returned {getattr(denoised, 'shape', type(denoised).__name__)} for a state of shape "
                          f"{tuple(x.shape)}; it must return the denoised prediction of the same shape.")
        if not torch.isfinite(denoised).all():
            raise KBError(f"the model's prediction at sigma {s:.6g} holds NaN or infinite values; check the model.")
        r = step_ratio(s, s_next)
        euler = calibrated_step(x, denoised, (), s, s_next, (0.0, 0.0, 0.0))
        target = targets[i + 1].to(x)
        terms = correction_terms(x, denoised, history)
        used = [k for k, t in enumerate(terms) if t is not None]
        solved = solve_step([(1.0 - r) * terms[k].double() for k in used], target.double() - euler.double(), ridge)
        table[i, used] = solved
        x_next = calibrated_step(x, denoised, history, s, s_next, table[i])
        euler_mse.append(float(((euler.double() - target.double()) ** 2).mean()))
        fitted_mse.append(float(((x_next.double() - target.double()) ** 2).mean()))
        x, history = x_next, [denoised, *history[:1]]
    return SamplerFit(table, euler_mse, fitted_mse)


def rollout(denoise_fn: Denoise, x: torch.Tensor, sigmas, coeffs) -> torch.Tensor:
    """The calibrated sampler's final state from x [B, C, H, W] at sigmas[0] (what sample_calibrated computes)."""
    sig = check_sigmas(sigmas)
    history: list[torch.Tensor] = []
    for i in range(len(sig) - 1):
        denoised = denoise_fn(x, float(sig[i]))
        x, history = calibrated_step(x, denoised, history, float(sig[i]), float(sig[i + 1]), coeffs[i]), [denoised, *history[:1]]
    return x


def free_coefficients(n: int) -> list[tuple[int, int]]:
    """(step, term) of every coefficient a table of n steps uses: c1 from step 1, c2 always, c3 from step 2."""
    return [(i, k) for i in range(n) for k in range(3) if (k != 0 or i >= 1) and (k != 2 or i >= 2)]


def _rollout_states(denoise_fn: Denoise, x: torch.Tensor, sig: torch.Tensor, table: torch.Tensor):
    """The rollout's final state, and each step's (x_i, D_i) so a change of step i's table replays only what follows."""
    xs, ds = [], []
    for i in range(len(sig) - 1):
        d = denoise_fn(x, float(sig[i]))
        xs.append(x)
        ds.append(d)
        x = calibrated_step(x, d, ds[-2::-1][:2], float(sig[i]), float(sig[i + 1]), table[i])
    return x, xs, ds


def _replay_from(denoise_fn: Denoise, step: int, xs, ds, sig: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The final state when the table changed from `step` on: step's own D is unchanged, later ones are evaluated."""
    history = ds[step - 1::-1][:2] if step > 0 else []
    x = calibrated_step(xs[step], ds[step], history, float(sig[step]), float(sig[step + 1]), table[step])
    history = [ds[step], *history[:1]]
    for i in range(step + 1, len(sig) - 1):
        d = denoise_fn(x, float(sig[i]))
        x, history = calibrated_step(x, d, history, float(sig[i]), float(sig[i + 1]), table[i]), [d, *history[:1]]
    return x


#: Damping increases an iteration of refine_for_final_state may try before it gives up (1e-3 up to 1e2 from the start).
DAMPING_TRIES = 6


class FinalStateFit(NamedTuple):
    """What refine_for_final_state returns."""

    sigmas: torch.Tensor                # float64 [N + 1]: the schedule (its knots moved only with `knots`)
    coeffs: torch.Tensor                # float64 [N, 3]: the table
    history: list[float]                # the final state's MSE to the target per accepted iteration (first: the start)
    eval_shifts: torch.Tensor | None    # float64 [N]: log(evaluation sigma / sigma) per step, with `eval_shifts` only


def shifted(denoise_fn: Denoise, sig: torch.Tensor, shifts: torch.Tensor | None) -> Denoise:
    """denoise_fn evaluated at sigma_i * exp(shift_i) where the step's state sits at sigma_i (LD3's decoupled timesteps)."""
    if shifts is None:
        return denoise_fn
    scale = {float(s): math.exp(float(v)) for s, v in zip(sig[:-1].tolist(), shifts.tolist())}
    return lambda z, s: denoise_fn(z, s * scale[float(s)])


def refine_for_final_state(denoise_fn: Denoise, x0: torch.Tensor, target: torch.Tensor, sigmas, coeffs, *,
                           knots: bool = False, eval_shifts: bool = False, iterations: int = 3, eps: float = 1e-3,
                           damping: float = 1e-3, should_stop: Callable[[], bool] | None = None) -> FinalStateFit:
    """Levenberg-Marquardt on the whole table (and the schedule's interior knots, and each step's evaluation sigma) for
    the final state alone.

    The rollout fit lands every step on the teacher; the sampler is judged only by where it ends,
    so the table, and with `knots` the log sigma of every interior knot, are refined jointly for the
    final state (cf. LD3, Tong et al. 2025; S4S-Alt, Frankel et al. 2025, which optimise the final
    output). With `eval_shifts` the model of step i is evaluated at sigma_i * exp(e_i) while the
    update still steps from sigma_i (LD3's decoupled timesteps; e starts at 0, the undecoupled sampler).
    x0, target [B, C, H, W]: the items' first state and the teachers' converged ends
    (sampler space); sigma_max and the final 0 stay. The Jacobian is taken by forward differences of
    `eps` (a change at step i replays only the steps after it); the step is damped by lambda times
    each parameter's own curvature, lambda starting at `damping`, tenfold up until the MSE falls
    with the knots still in order and tenfold down after a step that held (Levenberg-Marquardt's
    rule: the decoupled sigmas and the table differ in scale and curvature); an iteration that
    cannot lower it in DAMPING_TRIES ends the refinement. About 2 N^2 batch evaluations an iteration.
    """
    sig = check_sigmas(sigmas).clone()
    table = torch.as_tensor(coeffs, dtype=torch.float64).clone()
    n = len(sig) - 1
    shifts = torch.zeros(n, dtype=torch.float64) if eval_shifts else None
    params = [("c", i, k) for i, k in free_coefficients(n)]
    if knots:
        params += [("s", j, 0) for j in range(1, n)]
    if eval_shifts:
        params += [("e", i, 0) for i in range(n)]
    goal = target.double()

    def mse(x: torch.Tensor) -> float:
        return float(((x.double() - goal) ** 2).mean())

    def moved(p, amount: float, s_, t_, e_) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        kind, i, k = p
        s_, t_, e_ = s_.clone(), t_.clone(), None if e_ is None else e_.clone()
        if kind == "c":
            t_[i, k] += amount
        elif kind == "s":
            s_[i] = s_[i] * math.exp(amount)
        else:
            e_[i] += amount
        return s_, t_, e_

    def column(p) -> torch.Tensor:
        s_, t_, e_ = moved(p, eps, sig, table, shifts)
        f = shifted(denoise_fn, s_, e_)
        if p[0] == "e":  # the step's own prediction changes: replay from its state with it re-evaluated
            moved_ds = [*ds[:p[1]], f(xs[p[1]], float(s_[p[1]])), *ds[p[1] + 1:]]
            out = _replay_from(f, p[1], xs, moved_ds, s_, t_)
        else:
            out = _replay_from(f, p[1] if p[0] == "c" else p[1] - 1, xs, ds, s_, t_)  # a knot moves the step ending there
        return (out.double() - final.double()).reshape(-1) / eps

    final, xs, ds = _rollout_states(shifted(denoise_fn, sig, shifts), x0, sig, table)
    history = [mse(final)]
    lam = damping
    for _ in range(int(iterations)):
        if should_stop is not None and should_stop():
            break
        residual = (final.double() - goal).reshape(-1)
        jac = torch.stack([column(p) for p in params], dim=1)
        gram = jac.T @ jac
        curvature = torch.diagonal(gram).clamp_min(1e-30)
        for _ in range(DAMPING_TRIES):
            delta = torch.linalg.solve(gram + lam * torch.diag(curvature), -(jac.T @ residual))
            s_, t_, e_ = sig, table, shifts
            for p, v in zip(params, delta.tolist()):
                s_, t_, e_ = moved(p, v, s_, t_, e_)
            if bool((s_[:-1] > s_[1:]).all()):  # knots out of order: more damping, a shorter step
                out, t_xs, t_ds = _rollout_states(shifted(denoise_fn, s_, e_), x0, s_, t_)
                if math.isfinite(mse(out)) and mse(out) < history[-1]:
                    sig, table, shifts, final, xs, ds = s_, t_, e_, out, t_xs, t_ds
                    history.append(mse(out))
                    lam /= 10  # the model held: trust it further (Gauss-Newton's own step)
                    break
            lam *= 10  # it did not: lean toward gradient descent (each parameter scaled by its own curvature)
        else:
            break
    return FinalStateFit(sig, table, history, shifts)
