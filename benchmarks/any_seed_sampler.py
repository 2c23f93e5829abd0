"""Retrieval for any seed (an experiment, not wired into the nodes): ReDi keyed on the
denoised estimate, `sample_any_seed`.

With a seed the KB never saw, x_k is mostly the query's own noise, so its nearest stored x_k is far.
Here the key is the model's clean-image prediction D_q (which the noise dominates much less), and the
value is the neighbours' blended clean-image prediction at the value step v, re-noised with the
query's own noise estimate eps_q = (x_k - D_q) / sigma_k:

    x_v = sum_i w_i D_i(v) + sigma_v * eps_q            (value mode "blend")
    x_v = D_q + sum_i w_i (D_i(v) - D_i(key)) + sigma_v * eps_q   ("blend+residual": keep the part of
                                                          D_q the neighbours cannot rebuild)

so items with different seeds keep their own noise and give different images. No KB format change:
a KB sampled with Euler that stores steps a and a + 1 holds D_a implicitly in its fine Euler step,
x_{a+1} = x_a + (s_{a+1} - s_a)(x_a - D_a) / s_a  =>  D_a = x_a - s_a (x_{a+1} - x_a) / (s_{a+1} - s_a).
The search over denoised keys is brute-force exact L2 in numpy (the KB's FAISS index holds x_k, not D_k).

The query's D_q is either one extra model evaluation at x_k (key source "extra", key step k, counted
in the NFE), or the prediction the sampler already made for its last step k-1 (key source "previous",
key step k-1, free); for Euler x_k = D_{k-1} + s_k (x_{k-1} - D_{k-1}) / s_{k-1}, so eps_q = (x_k -
D_{k-1}) / s_k is the same direction that step used.

Measured (benchmarks/any_seed.py, benchmarks/results/any_seed.md): it loses to plain Euler at equal NFE
at every budget tried, on foreign and on KB seeds, and so is not exposed in the nodes.

Everything happens in the sampler's own space (x = latent + sigma * noise for EPS and v models);
stored latents are converted with `comfy_sampling.from_latent_space`. Shapes: B items, N KB entries,
H neighbours, D = C*H*W.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

import comfy.samplers

from kb_tools.comfy import model_facts as cs
from kb_tools.comfy.counted import CountedDenoiser, run_sampler
from kb_tools.core.errors import KBError
from kb_tools.core.evaluations import Evaluations
from kb_tools.core.weights import WEIGHT_MODES, WeightFit, fit_weights
from kb_tools.store import KnowledgeBase

KEY_SOURCES = ("extra", "previous")
VALUE_MODES = ("blend", "blend+residual")


# --------------------------------------------------------------------------- pure math


def denoised_from_euler_steps(x_a, x_next, sigma_a: float, sigma_next: float):
    """D_a = x_a - s_a (x_{a+1} - x_a) / (s_{a+1} - s_a): the clean-image prediction an Euler step used."""
    return x_a - sigma_a * (x_next - x_a) / (sigma_next - sigma_a)


def noise_estimate(x, denoised, sigma: float):
    """eps = (x - D) / sigma: the noise direction of state x at sigma (k-diffusion's to_d)."""
    return (x - denoised) / sigma


def renoise(denoised, eps, sigma: float):
    """x = D + sigma * eps: a clean estimate put back at noise level sigma with the given noise."""
    return denoised + sigma * eps


def nearest_rows(table: np.ndarray, queries: np.ndarray, h: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-h rows of table [N, D] nearest each query [B, D] in L2: (ids int64 [B, h], distances float64 [B, h])."""
    t = np.asarray(table, np.float64)
    q = np.asarray(queries, np.float64)
    d2 = np.einsum("bd,bd->b", q, q)[:, None] + np.einsum("nd,nd->n", t, t)[None] - 2.0 * np.einsum("bd,nd->bn", q, t)
    ids = np.argsort(d2, axis=1, kind="stable")[:, :h]
    return ids.astype(np.int64), np.sqrt(np.maximum(np.take_along_axis(d2, ids, 1), 0.0))


def spread(table: np.ndarray) -> float:
    """RMS distance of the rows of table [N, D] from their mean (what centered residuals are measured in)."""
    t = np.asarray(table, np.float64)
    return float(np.sqrt(((t - t.mean(0)) ** 2).sum(1).mean()))


# --------------------------------------------------------------------------- the KB's denoised estimates


def kb_denoised(kb: KnowledgeBase, base, sigmas, step: int) -> np.ndarray:
    """Every entry's D at `step`, float32 [N, D] in the sampler's space, from its stored Euler step step -> step + 1."""
    stored = set(kb.stored_steps)
    if kb.settings.sampler != "euler":
        raise KBError(f"the any-seed experiment reads D from Euler steps, but the KB at {kb.path} was sampled with "
                      f"{kb.settings.sampler!r}; use a KB built with 'euler'.")
    if step not in stored or step + 1 not in stored:
        raise KBError(f"D at step {step} needs stored steps {step} and {step + 1}; the KB stores {kb.stored_steps}. "
                      "Choose key and value steps whose next step is stored too.")
    ids = np.arange(len(kb))
    x_a = cs.from_latent_space(base, sigmas[step], torch.from_numpy(kb.latents(step, ids)).float())
    x_b = cs.from_latent_space(base, sigmas[step + 1], torch.from_numpy(kb.latents(step + 1, ids)).float())
    d = denoised_from_euler_steps(x_a.double(), x_b.double(), float(sigmas[step]), float(sigmas[step + 1]))
    return d.reshape(len(kb), -1).float().numpy()


@dataclass
class AnySeedRun:
    """One any-seed configuration; `sample_any_seed` leaves its result in the fields after `result_`."""

    kb: KnowledgeBase
    key_step: int  # k: the sampler stops at x_k
    value_step: int  # v: sampling resumes at x_v
    neighbours: int = 3
    weight_mode: str = "lstsq"
    key_source: str = "previous"
    value_mode: str = "blend"
    ridge: float = 1e-2
    _tables: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    # Results of the last run.
    evaluations: Evaluations | None = None
    ids: np.ndarray | None = None
    fit: WeightFit | None = None

    def __post_init__(self) -> None:
        if self.key_source not in KEY_SOURCES or self.value_mode not in VALUE_MODES or self.weight_mode not in WEIGHT_MODES:
            raise KBError(f"key source must be one of {KEY_SOURCES}, value mode one of {VALUE_MODES}, weight mode one "
                          f"of {WEIGHT_MODES}; got {self.key_source!r}, {self.value_mode!r}, {self.weight_mode!r}.")
        if not 1 <= self.match_step < self.value_step < self.kb.settings.steps:
            raise KBError(f"need 1 <= key step ({self.match_step} for key source {self.key_source!r}) < value step "
                          f"{self.value_step} < {self.kb.settings.steps}.")
        if not 1 <= self.neighbours <= len(self.kb):
            raise KBError(f"H = {self.neighbours}, but the KB holds {len(self.kb)} entries.")

    @property
    def match_step(self) -> int:
        """The step whose D is matched: k with an extra evaluation, k - 1 with the sampler's own last prediction."""
        return self.key_step if self.key_source == "extra" else self.key_step - 1

    def table(self, base, sigmas, step: int) -> np.ndarray:
        if step not in self._tables:
            self._tables[step] = kb_denoised(self.kb, base, sigmas, step)
        return self._tables[step]


def any_seed_ksampler(run: AnySeedRun) -> comfy.samplers.KSAMPLER:
    """The SAMPLER (for guider.sample or SamplerCustomAdvanced) that runs `run`."""
    return comfy.samplers.KSAMPLER(sample_any_seed, extra_options={"run": run})


@torch.no_grad()
def sample_any_seed(model, x, sigmas, extra_args=None, callback=None, disable=None, *, run: AnySeedRun):
    """Euler to x_k, retrieve on the denoised estimate, resume Euler from the re-noised blend at v.

    model: the k-diffusion denoiser; x [B, C, H, W]: the scaled starting noise; sigmas: the KB's schedule.
    """
    from kb_tools.samplers.entry import check_schedule

    extra_args = {} if extra_args is None else extra_args
    check_schedule(run.kb, sigmas)
    base = model.inner_model.inner_model
    k, v, batch = run.key_step, run.value_step, len(x)
    euler = comfy.samplers.sampler_object("euler")
    tally = Evaluations(batch)
    seen: dict[int, torch.Tensor] = {}

    def keep(d):  # the sampler's own prediction at each step (k-diffusion's callback carries it)
        seen[int(d["i"])] = d["denoised"]
        if callback is not None:
            callback(d)

    x_k = run_sampler(euler, CountedDenoiser(model, tally, range(batch)), x, sigmas[:k + 1], extra_args, keep, disable)
    if run.key_source == "extra":
        denoised = CountedDenoiser(model, tally, range(batch))(x_k, sigmas[k] * x_k.new_ones([batch]), **extra_args)
    else:
        denoised = seen[k - 1]
    eps = noise_estimate(x_k, denoised, sigmas[k])
    query = denoised.reshape(batch, -1).double().cpu().numpy()
    keys = run.table(base, sigmas, run.match_step)
    ids, _ = nearest_rows(keys, query, run.neighbours)
    fit = fit_weights(query, keys[ids], spread(keys), run.weight_mode, run.ridge)
    values = run.table(base, sigmas, v)[ids].astype(np.float64)  # [B, H, D]
    blended = np.einsum("bh,bhd->bd", fit.weights, values)
    if run.value_mode == "blend+residual":
        blended += query - np.einsum("bh,bhd->bd", fit.weights, keys[ids].astype(np.float64))
    d_v = torch.from_numpy(blended).to(x_k).reshape(x_k.shape)
    x_v = renoise(d_v, eps, sigmas[v])
    out = run_sampler(euler, CountedDenoiser(model, tally, range(batch)), x_v, sigmas[v:], extra_args, callback, disable,
                      first_step=v)
    run.evaluations, run.ids, run.fit = tally, ids, fit
    return out


def any_seed_sample(kb: KnowledgeBase, model, prompts: Sequence[str], seeds: Sequence[int], run: AnySeedRun) -> torch.Tensor:
    """Retrieval for any seed on the KB's recipe with the embedded model: Euler to x_k, retrieve on the denoised estimate,
    resume from the re-noised blend at v. Latents [B, 3, 16, 16]; `run` keeps the NFE per item, ids and weights."""
    from embedded.sampling import cfg_guider, conditioning, empty_latents, schedule_sigmas
    from kb_tools.comfy.model_facts import seeded_noise
    latent = empty_latents(len(prompts))
    guider = cfg_guider(model, *conditioning(prompts), kb.settings.cfg)
    sigmas = schedule_sigmas(model, kb.settings.sampler, kb.settings.scheduler, kb.settings.steps)
    with torch.no_grad():
        out = guider.sample(seeded_noise(latent, seeds), latent, any_seed_ksampler(run), sigmas, disable_pbar=True,
                            seed=int(seeds[0]))
    return out.float().cpu()
