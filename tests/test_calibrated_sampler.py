"""The calibrated multistep sampler on the real ComfyUI with a tiny model: coeffs = 0 is ComfyUI's euler, the
DPM-Solver++(2M) table is its dpmpp_2m, a table fitted on teacher trajectories of train items beats Euler on held-out
items at the same 5 evaluations (counted), and bad input is refused with KBError."""
from __future__ import annotations

import types

import pytest
import torch

pytestmark = pytest.mark.comfy

N = 5             # calibrated steps
FINE = 16 * (N - 1) + 1  # karras at FINE steps holds karras at N steps: sigma j of N is sigma 16 j of FINE, then 0
CFG = 3.0


@pytest.fixture(scope="module")
def kb(pack):
    import importlib
    for name in ("core.multistep", "calibration.sampler_fit", "samplers.calibrated"):
        importlib.import_module(f"{pack.__name__}.kb_tools.{name}")
    k = pack.kb_tools
    return types.SimpleNamespace(ms=k.core.multistep, fit=k.calibration.sampler_fit, cal=k.samplers.calibrated,
                                 KBError=k.core.errors.KBError, Evaluations=k.core.evaluations.Evaluations,
                                 facts=k.comfy.model_facts, plain=k.comfy.plain)


@pytest.fixture(scope="module")
def model():
    import tiny_models
    return tiny_models.make_tiny_model(0, "EPS")


def _batch(kb, model, prompts, seeds):
    """(guider, latent, noise) for item i = (prompts[i], seeds[i]) with cfg CFG."""
    import tiny_models
    pos = kb.plain.batch_conditioning([tiny_models.prompt_cond(p) for p in prompts])
    neg = kb.plain.batch_conditioning([tiny_models.prompt_cond("") for _ in prompts])
    latent = tiny_models.empty_latent(len(prompts))
    return kb.plain.cfg_guider(model, pos, neg, CFG), latent, kb.facts.seeded_noise(latent, seeds)


def _run(batch, sampler, sigmas):
    guider, latent, noise = batch
    with torch.no_grad():
        return guider.sample(noise, latent, sampler, sigmas, disable_pbar=True, seed=0).float().cpu()


def _capture(model, x, sigmas, extra_args=None, callback=None, disable=None, *, inner, out):
    """k-diffusion sampler: `inner`'s run, keeping its state at every sigma ([len(sigmas)] x [B, C, H, W])."""
    states = []
    y = inner.sampler_function(model, x, sigmas, extra_args=dict(extra_args or {}), disable=disable,
                               callback=lambda d: states.append(d["x"].detach().clone()), **inner.extra_options)
    out["states"] = states + [y.detach().clone()]
    return y


def _fit_inside(model, x, sigmas, extra_args=None, callback=None, disable=None, *, fit, teacher, teacher_sigmas, out):
    """k-diffusion sampler that only fits the table (the denoiser is live only inside a sampler run)."""
    s_in = x.new_ones([x.shape[0]])
    out["fit"] = fit.fit_coefficients(teacher, teacher_sigmas, lambda z, s: model(z, s * s_in, **(extra_args or {})), sigmas)
    return x


def _mse(a, b):
    return float(((a.double() - b.double()) ** 2).mean())


def _close(a, b, rel=1e-5):
    return float((a - b).abs().max()) <= rel * float(b.abs().max())


@pytest.fixture(scope="module")
def schedules(kb, model):
    coarse = kb.facts.schedule_sigmas(model, "euler", "karras", N)
    fine = kb.facts.schedule_sigmas(model, "dpmpp_2m", "karras", FINE)
    assert len(fine) == FINE + 1 and fine[-1] == 0 == coarse[-1]
    assert torch.allclose(fine[:-1:16], coarse[:-1], rtol=1e-5), "the fine karras schedule must contain the coarse one"
    return coarse, fine


# --------------------------------------------------------------------------- pure parts


def test_zero_step_is_euler_and_the_last_step_lands_on_the_prediction_plus_corrections(kb):
    g = torch.Generator().manual_seed(0)
    x, d, p1, p2 = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(4))
    euler = x + (x - d) / 2.0 * (1.0 - 2.0)
    assert torch.allclose(kb.ms.calibrated_step(x, d, [p1, p2], 2.0, 1.0, (0, 0, 0)), euler, atol=1e-6)
    c = (0.3, -0.2, 0.1)
    last = kb.ms.calibrated_step(x, d, [p1, p2], 2.0, 0.0, c)
    assert torch.allclose(last, d + 0.3 * (d - p1) - 0.2 * (d - x) + 0.1 * (p1 - p2), atol=1e-6)
    # Missing history drops its terms: only c2 acts at the first step.
    assert torch.allclose(kb.ms.calibrated_step(x, d, [], 2.0, 0.0, c), d - 0.2 * (d - x), atol=1e-6)


def test_the_rollout_fit_recovers_a_known_table(kb):
    """Teacher = the calibrated rollout itself with a known table on a synthetic denoiser: the fit finds that table."""
    g = torch.Generator().manual_seed(1)
    offset = torch.randn(8, 2, 4, 4, generator=g)
    denoise = lambda z, s: torch.tanh(z) * 0.7 + offset / (1.0 + s)  # noqa: E731
    sigmas = torch.tensor([8.0, 3.0, 1.2, 0.5, 0.1, 0.0], dtype=torch.float64)
    true = torch.tensor([[0.0, 0.4, 0.0], [0.5, -0.3, 0.0], [0.2, 0.1, -0.15], [0.3, 0.05, 0.1], [-0.2, 0.2, 0.3]],
                        dtype=torch.float64)
    x, hist, states = torch.randn(8, 2, 4, 4, generator=g, dtype=torch.float64) * 8.0, [], []
    for i in range(5):
        states.append(x)
        d = denoise(x, float(sigmas[i]))
        x, hist = kb.ms.calibrated_step(x, d, hist, float(sigmas[i]), float(sigmas[i + 1]), true[i]), [d, *hist[:1]]
    states.append(x)
    fitted = kb.fit.fit_coefficients(torch.stack(states), sigmas, denoise, sigmas, ridge=0.0)
    assert torch.allclose(fitted.coeffs, true, atol=1e-6), fitted.coeffs
    assert fitted.final_mse < 1e-16 < fitted.euler_step_mse[-1]


def test_refinement_for_the_final_state_lowers_it_from_any_start(kb):
    """Levenberg-Marquardt on the whole table, judged only by the final state: from Euler's table (0) it nears a known table's end,
    its history never rises, and a replay from any step equals the full rollout."""
    g = torch.Generator().manual_seed(2)
    offset = torch.randn(8, 2, 4, 4, generator=g, dtype=torch.float64)
    denoise = lambda z, s: torch.tanh(z) * 0.7 + offset / (1.0 + s)  # noqa: E731
    sigmas = torch.tensor([8.0, 3.0, 1.2, 0.5, 0.1, 0.0], dtype=torch.float64)
    true = torch.tensor([[0.0, 0.4, 0.0], [0.5, -0.3, 0.0], [0.2, 0.1, -0.15], [0.3, 0.05, 0.1], [-0.2, 0.2, 0.3]],
                        dtype=torch.float64)
    x0 = torch.randn(8, 2, 4, 4, generator=g, dtype=torch.float64) * 8.0
    target = kb.fit.rollout(denoise, x0, sigmas, true)
    final, xs, ds = kb.fit._rollout_states(denoise, x0, sigmas, true)
    assert torch.equal(final, target)
    assert all(torch.allclose(kb.fit._replay_from(denoise, i, xs, ds, sigmas, true), target, atol=1e-12) for i in range(5))
    sig, table, history, shifts = kb.fit.refine_for_final_state(denoise, x0, target, sigmas, kb.ms.zero_coefficients(5),
                                                        knots=False, iterations=6, eps=1e-6)
    assert shifts is None and torch.equal(sig, sigmas) and all(b < a for a, b in zip(history, history[1:])) and len(history) >= 3
    assert history[-1] < 1e-3 * history[0], history
    assert table[0, 0] == 0 and table[0, 2] == 0 and table[1, 2] == 0  # terms without history stay unused
    assert kb.fit.free_coefficients(3) == [(0, 1), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2)]
    # with the knots free too: the ends stay, the knots stay in order, and the final state still nears the target
    sig2, _, history2, _ = kb.fit.refine_for_final_state(denoise, x0, target, sigmas, kb.ms.zero_coefficients(5),
                                                      knots=True, iterations=6, eps=1e-6)
    assert sig2[0] == sigmas[0] and sig2[-1] == 0 and bool((sig2[:-1] > sig2[1:]).all())
    assert all(b < a for a, b in zip(history2, history2[1:])) and history2[-1] < 1e-2 * history2[0], history2


def test_refinement_with_decoupled_evaluation_sigmas_finds_the_shifts_a_target_was_made_with(kb):
    """LD3's decoupled timesteps: a target rolled out with the model evaluated at shifted sigmas is reached again only
    when the shifts are free (the table alone cannot bring the prediction's own sigma back)."""
    g = torch.Generator().manual_seed(3)
    offset = torch.randn(8, 2, 4, 4, generator=g, dtype=torch.float64)
    denoise = lambda z, s: torch.tanh(z) * 0.7 + offset / (1.0 + s)  # noqa: E731
    sigmas = torch.tensor([8.0, 3.0, 1.2, 0.5, 0.1, 0.0], dtype=torch.float64)
    table = kb.ms.zero_coefficients(5)
    true_shifts = torch.tensor([0.3, -0.2, 0.25, 0.0, 0.2], dtype=torch.float64)
    x0 = torch.randn(8, 2, 4, 4, generator=g, dtype=torch.float64) * 8.0
    target = kb.fit.rollout(kb.fit.shifted(denoise, sigmas, true_shifts), x0, sigmas, table)
    assert torch.equal(kb.fit.rollout(kb.fit.shifted(denoise, sigmas, None), x0, sigmas, table),
                       kb.fit.rollout(denoise, x0, sigmas, table))
    free = kb.fit.refine_for_final_state(denoise, x0, target, sigmas, table, eval_shifts=True, iterations=8, eps=1e-6)
    assert torch.equal(free.sigmas, sigmas) and all(b < a for a, b in zip(free.history, free.history[1:]))
    assert free.history[-1] < 1e-4 * free.history[0], free.history
    reached = kb.fit.rollout(kb.fit.shifted(denoise, sigmas, free.eval_shifts), x0, sigmas, free.coeffs)
    assert float(((reached - target) ** 2).mean()) == pytest.approx(free.history[-1], rel=1e-9)


def test_dpmpp_2m_table_is_the_step_ratio_rule(kb, schedules):
    coarse, _ = schedules
    table = kb.ms.dpmpp_2m_coefficients(coarse)
    s = coarse.double()
    h = torch.log(s[:-2] / s[1:-1])  # h_0 .. h_{N-2}
    assert table.shape == (N, 3) and table.dtype == torch.float64
    assert table[0, 0] == 0 and table[-1, 0] == 0 and (table[:, 1:] == 0).all()
    assert torch.allclose(table[1:-1, 0], h[1:] / (2 * h[:-1]))


# --------------------------------------------------------------------------- through ComfyUI


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m"])
def test_the_euler_and_dpmpp_2m_tables_reproduce_comfyui(kb, model, schedules, name):
    coarse, _ = schedules
    batch = _batch(kb, model, ["a cat", "a dog"], [3, 4])
    table = kb.ms.zero_coefficients(N) if name == "euler" else kb.ms.dpmpp_2m_coefficients(coarse)
    tally = kb.Evaluations(2)
    ours = _run(batch, kb.cal.calibrated_ksampler(table, tally), coarse)
    theirs = _run(batch, comfy_sampler(name), coarse)
    assert _close(ours, theirs), float((ours - theirs).abs().max())
    assert tally.per_item().tolist() == [N, N]
    other = "dpmpp_2m" if name == "euler" else "euler"  # the comparison can fail: the two samplers differ
    assert not _close(ours, _run(batch, comfy_sampler(other), coarse), rel=1e-3)


def comfy_sampler(name):
    import comfy.samplers
    return comfy.samplers.sampler_object(name)


def test_a_table_fitted_on_train_items_beats_euler_on_held_out_items(kb, model, schedules, capsys):
    import comfy.samplers
    coarse, fine = schedules
    prompts, seeds = [f"train prompt {i}" for i in range(6)], list(range(100, 106))
    held_prompts, held_seeds = [f"held-out prompt {i}" for i in range(6)], list(range(200, 206))
    train, held = _batch(kb, model, prompts, seeds), _batch(kb, model, held_prompts, held_seeds)
    captured: dict = {}  # one teacher run for all 12 items: train items 0-5, held-out items 6-11
    teacher = _run(_batch(kb, model, prompts + held_prompts, seeds + held_seeds),
                   comfy.samplers.KSAMPLER(_capture, extra_options={"inner": comfy_sampler("dpmpp_2m"), "out": captured}),
                   fine)[6:]
    fitted: dict = {}
    _run(train, comfy.samplers.KSAMPLER(_fit_inside, extra_options={
        "fit": kb.fit, "teacher": [s[:6] for s in captured["states"]], "teacher_sigmas": fine, "out": fitted}), coarse)
    fit = fitted["fit"]
    assert fit.coeffs.shape == (N, 3) and torch.isfinite(fit.coeffs).all()

    tally = kb.Evaluations(6)
    calibrated = _mse(_run(held, kb.cal.calibrated_ksampler(fit.coeffs, tally), coarse), teacher)
    euler = _mse(_run(held, comfy_sampler("euler"), coarse), teacher)
    dpmpp = _mse(_run(held, comfy_sampler("dpmpp_2m"), coarse), teacher)
    with capsys.disabled():
        print(f"\nheld-out MSE to the {FINE}-step dpmpp_2m teacher at N={N}: calibrated {calibrated:.4g}, euler {euler:.4g}, "
              f"dpmpp_2m {dpmpp:.4g}; train final step {fit.final_mse:.4g}; coeffs {fit.coeffs.tolist()}")
    assert calibrated < euler
    assert tally.per_item().tolist() == [N] * 6


# --------------------------------------------------------------------------- refusals


def test_bad_tables_and_schedules_are_refused(kb, model, schedules):
    coarse, _ = schedules
    for bad, match in ((torch.zeros(N, 2), r"\[steps, 3\]"), (torch.zeros(N - 1, 3), "rows but the schedule has"),
                       (torch.full((N, 3), float("nan")), "NaN")):
        with pytest.raises(kb.KBError, match=match):
            kb.ms.check_coefficients(bad, coarse)
    for bad in ([1.0], [1.0, 2.0, 0.0], [3.0, float("inf"), 0.0], [3.0, 0.0, 0.0]):
        with pytest.raises(kb.KBError, match="schedule"):
            kb.ms.check_sigmas(bad)
    batch = _batch(kb, model, ["a cat"], [1])
    with pytest.raises(kb.KBError, match="rows but the schedule has"):
        _run(batch, kb.cal.calibrated_ksampler(kb.ms.zero_coefficients(N + 1)), coarse)


def test_bad_fit_inputs_are_refused(kb):
    sigmas = torch.tensor([4.0, 1.0, 0.3, 0.0])
    g = torch.Generator().manual_seed(2)
    states = torch.randn(4, 3, 2, 4, 4, generator=g)
    denoise = lambda z, s: torch.tanh(z)  # noqa: E731
    cases = [
        (states[:3], sigmas, denoise, sigmas, "3 teacher states for 4"),
        (states[:, 0], sigmas, denoise, sigmas, r"\[B, C, H, W\]"),
        (states, sigmas, denoise, torch.tensor([4.0, 2.0, 0.0]), "not on the teacher's schedule"),
        (states.clone().index_fill_(0, torch.tensor([2]), float("nan")), sigmas, denoise, sigmas, "NaN"),
        (states, sigmas, lambda z, s: z[:1], sigmas, "same shape"),
        (states, sigmas, lambda z, s: z * float("nan"), sigmas, "NaN"),
        (states, sigmas, lambda z, s: torch.ones_like(z), sigmas, "zero or non-finite"),  # D never moves
    ]
    for teacher, t_sig, fn, sig, match in cases:
        with pytest.raises(kb.KBError, match=match):
            kb.fit.fit_coefficients(teacher, t_sig, fn, sig)
