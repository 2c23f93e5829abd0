"""Sampling with every model evaluation counted per item: the one path the pack's samplers run ComfyUI's samplers on.

A whole batch (`sample_counted`), each item from its own start step (`resume_items`, `resume_from`), or one
k-diffusion sampler function on a counted denoiser (`run_sampler` with `CountedDenoiser`). Latents are
[B, C, H, W]; states kept at given steps come back per step.
"""
from __future__ import annotations

from typing import Callable, Sequence

import comfy.sample
import comfy.samplers
import numpy as np
import torch

from ..core.errors import KBError
from ..core.evaluations import Evaluations
from . import model_facts as cs
from .counting import evaluating
from .guiders import batch_view, model_name_at


class CountedDenoiser:
    """A k-diffusion denoiser that counts each evaluation for its model and items, and keeps states.

    keep: {schedule index: sigma}; the state x last evaluated at that sigma is kept in `states`
    (for a Heun-like sampler the corrected state, since the next step's first evaluation at that
    sigma comes last).
    """

    def __init__(self, denoiser, tally: Evaluations, items: Sequence[int], keep: dict[int, float] | None = None):
        self.denoiser, self.tally, self.items = denoiser, tally, np.asarray(items, np.int64)
        self.keep = keep or {}
        self.states: dict[int, torch.Tensor] = {}

    def __getattr__(self, name):
        # Samplers read the guider through the denoiser (model.inner_model.model_patcher...): pass those through.
        if name == "denoiser":
            raise AttributeError(name)
        return getattr(self.denoiser, name)

    def __call__(self, x, sigma, **kwargs):
        self.tally.add(model_name_at(self.denoiser, sigma), self.items)
        level = float(torch.as_tensor(sigma).max())
        for step, s in self.keep.items():
            if abs(level - s) <= 1e-4 * max(abs(s), 1e-7):
                self.states[step] = x.detach().clone()
        with evaluating(self.items):  # a forward-pass counter (counting.evaluating_items) credits these items
            return self.denoiser(x, sigma, **kwargs)



def run_sampler(sampler, denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict, callback, disable,
                first_step: int = 0) -> torch.Tensor:
    """One k-diffusion sampler function of `sampler` (a KSAMPLER) over `sigmas`; progress counted from `first_step`."""
    if len(sigmas) < 2:
        return x
    step_callback = None
    if callback is not None:
        step_callback = lambda d: callback({**d, "i": d["i"] + first_step})  # noqa: E731
    # A copy of extra_args: cfg_pp samplers put their post-CFG function into it.
    return sampler.sampler_function(denoiser, x, sigmas, extra_args=dict(extra_args), callback=step_callback,
                                    disable=disable, **sampler.extra_options)


def _sample_counted(model, x, sigmas, extra_args=None, callback=None, disable=None, *, inner, tally: Evaluations,
                    keep: dict[int, float], kept: dict[int, torch.Tensor]):
    """k-diffusion sampler: `inner`'s sampler function, counting evaluations and keeping states at `keep`."""
    denoiser = CountedDenoiser(model, tally, range(len(x)), keep)
    x = run_sampler(inner, denoiser, x, sigmas, extra_args or {}, callback, disable)
    base = model.inner_model.inner_model
    for step, state in denoiser.states.items():
        kept[step] = cs.to_latent_space(base, keep[step], state).float().cpu()
    return x


def counted_ksampler(sampler_name: str, tally: Evaluations) -> comfy.samplers.KSAMPLER:
    """ComfyUI's sampler `sampler_name` as a SAMPLER whose evaluations go into `tally` (one count per item per call)."""
    return comfy.samplers.KSAMPLER(_sample_counted, extra_options={
        "inner": comfy.samplers.sampler_object(sampler_name), "tally": tally, "keep": {}, "kept": {}})


def sample_counted(guider, latent: torch.Tensor, seeds: Sequence[int], sigmas: torch.Tensor, sampler_name: str, *,
                   keep_steps: Sequence[int] = (), callback: Callable | None = None,
                   noise: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor], Evaluations]:
    """One batch through `guider` with `sampler_name` over exactly `sigmas`: (latent, {step: latent}, evaluations).

    latent [B, C, H, W] in LATENT-dict space; item i gets the noise of seeds[i] (noise=None), or
    `noise` as given (zeros: continue from `latent` as it is).
    """
    if keep_steps and sampler_name in cs.SCHEDULE_FREE_SAMPLERS:
        raise KBError(f"sampler {sampler_name!r} chooses its own noise levels, so its trajectory has no fixed steps to store; "
                      "build the knowledge base with a schedule-following sampler such as 'euler' or 'dpmpp_2m'.")
    tally = Evaluations(latent.shape[0])
    kept: dict[int, torch.Tensor] = {}
    keep = {int(s): float(sigmas[s]) for s in keep_steps}
    sampler = comfy.samplers.KSAMPLER(_sample_counted, extra_options={
        "inner": comfy.samplers.sampler_object(sampler_name), "tally": tally, "keep": keep, "kept": kept})
    latent = comfy.sample.fix_empty_latent_channels(guider.model_patcher, latent)
    if noise is None:
        noise = cs.seeded_noise(latent, seeds)
    with torch.no_grad():  # ComfyUI's executor does the same; some samplers would track gradients otherwise
        out = guider.sample(noise, latent, sampler, sigmas, callback=callback, disable_pbar=True, seed=int(seeds[0]))
    missing = sorted(set(keep) - set(kept))
    if missing:
        raise KBError(f"sampler {sampler_name!r} never evaluated the model at step(s) {missing} of its schedule, so they "
                      "cannot be stored; store other steps or use a sampler such as 'euler'.")
    return out.detach().float().cpu(), kept, tally


def resume_items(model, states: torch.Tensor, start_steps: np.ndarray, sigmas: torch.Tensor, extra_args: dict,
                 callback, disable, sampler, tally: Evaluations, keep: dict[int, float] | None = None,
                 kept: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Sample each item from its own start step to the end (lines 9-11); items that share a step run together.

    states [B, C, H, W]: item i's state at sigmas[start_steps[i]], in the sampler's space. A
    subset of the batch runs on a view of the denoiser whose per-item conditioning is sliced to
    it (guiders.batch_view), so items with different prompts keep their own. keep {step: sigma}:
    the states the model is evaluated at there go into `kept[step]` [B, C, H, W] (sampler space,
    NaN for items that never passed that step).
    """
    batch = len(states)
    out = torch.empty_like(states)
    for step in sorted(set(int(s) for s in start_steps)):
        idx = np.flatnonzero(start_steps == step)
        denoiser = model if len(idx) == batch else batch_view(model, idx, batch)
        rows = torch.from_numpy(idx).to(states.device)
        counted = CountedDenoiser(denoiser, tally, idx, keep)
        out[rows] = run_sampler(sampler, counted, states[rows], sigmas[step:], extra_args, callback, disable, first_step=step)
        for st, state in counted.states.items() if kept is not None else ():
            kept.setdefault(st, torch.full_like(states, float("nan")))[rows] = state
    return out


def _sample_from_starts(model, x, sigmas, extra_args=None, callback=None, disable=None, *, values: torch.Tensor,
                        jumped: np.ndarray, starts: np.ndarray, sampler, tally: Evaluations):
    """k-diffusion sampler: x is every item's key-step state; `jumped` items continue from `values` at their start."""
    base = model.inner_model.inner_model
    states = x.clone()
    for step in sorted(set(int(s) for s in starts[jumped])):
        rows = torch.from_numpy(np.flatnonzero(jumped & (starts == step))).to(x.device)
        states[rows] = cs.from_latent_space(base, sigmas[step], values[rows.cpu()].to(x))
    return resume_items(model, states, starts, sigmas, extra_args or {}, callback, disable, sampler, tally)



def resume_from(guider, sigmas: torch.Tensor, sampler_name: str, key_step: int, starts: np.ndarray,
                key_latent: torch.Tensor, value_latent: torch.Tensor, seeds: Sequence[int],
                callback: Callable | None = None) -> tuple[torch.Tensor, Evaluations]:
    """Resume a batch outside a sampler run: item i continues from value_latent[i] at starts[i], or from key_latent[i]
    at `key_step` where starts[i] == key_step (ReDi's lines 9-11). sigmas: the whole schedule.

    Latents [B, C, H, W] in LATENT-dict space. Returns (latent, evaluations).
    """
    starts = np.asarray(starts, np.int64)
    tally = Evaluations(len(key_latent))
    sampler = comfy.samplers.KSAMPLER(_sample_from_starts, extra_options={
        "values": value_latent.float(), "jumped": starts != key_step, "starts": starts - key_step,
        "sampler": comfy.samplers.sampler_object(sampler_name), "tally": tally})
    with torch.no_grad():
        out = guider.sample(torch.zeros_like(key_latent), key_latent.float(), sampler, sigmas[key_step:], callback=callback,
                            disable_pbar=True, seed=int(seeds[0]))
    return out.detach().float().cpu(), tally
