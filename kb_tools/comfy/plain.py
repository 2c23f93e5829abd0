"""Prompts + seeds -> latents with the plain sampler: the one helper that builds a knowledge base's
trajectories (Algorithm 1) and every plain reference run (demo, training evaluation, benchmarks).

Each item i starts from the noise of its own seed, drawn exactly as KSampler draws a batch of
one, so an item's result does not depend on its batch. Evaluations are counted at the denoiser
and the sampler's state can be kept at chosen steps, converted to the LATENT-dict space the KB
stores (`comfy_sampling.to_latent_space`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import comfy.samplers
import torch

from ..core.errors import KBError
from ..core.evaluations import Evaluations
from ..core.records import Recipe
from ..core.schedule import Switch
from . import model_facts as cs
from .counted import sample_counted
from .guiders import SwitchGuider


def batch_conditioning(conds: Sequence[list]) -> list:
    """Stack per-prompt CONDITIONING (one entry each) into one CONDITIONING of batch len(conds).

    Returns [] when the prompts' token lengths differ (the caller then samples them one by one).
    """
    first = conds[0]
    if any(len(c) != len(first) for c in conds):
        raise KBError("prompts produced conditionings of different structure; build with batch size 1.")
    out = []
    for parts in zip(*conds):
        tensors = [p[0] for p in parts]
        if any(t.shape[1:] != tensors[0].shape[1:] for t in tensors):
            return []  # different token lengths: caller samples one by one
        extras = dict(parts[0][1])
        pooled = [p[1].get("pooled_output") for p in parts]
        if all(isinstance(p, torch.Tensor) for p in pooled):
            extras["pooled_output"] = torch.cat(pooled, dim=0)
        out.append([torch.cat(tensors, dim=0), extras])
    return out


def cfg_guider(model, positive, negative, cfg: float):
    """ComfyUI's CFGGuider (what KSampler and the CFGGuider node use) for these conditionings."""
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider


def stitched_guider(main, key_guider, stitch_step: int):
    """`key_guider` for the first `stitch_step` steps, `main` after them (T-Stitch keys); `main` when 0."""
    if not stitch_step:
        return main
    return SwitchGuider(key_guider, main, Switch("step", stitch_step), names=("small_model", "model"))


@dataclass(frozen=True)
class PlainSamples:
    """What sample_prompts made, in prompt order: N = len(prompts)."""

    latents: torch.Tensor  # [N, C, H, W] LATENT-dict space, at the run's last sigma
    states: dict[int, torch.Tensor]  # step -> [N, C, H, W] LATENT-dict space
    evaluations: Evaluations


def sample_prompts(model, encode: Callable[[str], list], prompts: Sequence[str], seeds: Sequence[int], recipe: Recipe, *,
                   latent_shape: Sequence[int], negative_prompt: str = "", batch_size: int = 8,
                   keep_steps: Sequence[int] = (), stop_step: int | None = None, key_model=None,
                   key_encode: Callable[[str], list] | None = None, stitch_step: int = 0,
                   callback: Callable | None = None) -> PlainSamples:
    """Prompt i sampled from the noise of seeds[i] with the plain sampler of `recipe`, `batch_size` at a time.

    stop_step: stop at that step of the recipe's schedule (None: the end). keep_steps: steps
    whose latents are returned in `states`. key_model / key_encode / stitch_step: the first
    stitch_step steps run on key_model (T-Stitch keys, one sampler run).
    """
    if len(prompts) != len(seeds):
        raise KBError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt.")
    if stitch_step and key_model is None:
        raise KBError("stitch_step > 0 needs a key (small) model to run the early steps.")
    sigmas = cs.schedule_sigmas(model, recipe.sampler, recipe.scheduler, recipe.steps)
    if stop_step is not None:
        sigmas = sigmas[: stop_step + 1]
    key_encode = key_encode or encode
    negative = encode(negative_prompt)
    key_negative = key_encode(negative_prompt) if stitch_step else None
    latents, evaluations, states = [], None, {int(s): [] for s in keep_steps}
    for b in range(0, len(prompts), max(1, batch_size)):
        items = list(zip(prompts[b:b + batch_size], seeds[b:b + batch_size]))
        conds = [encode(p) for p, _ in items]
        positive = batch_conditioning(conds)
        groups = [(items, positive)] if positive else [([item], cond) for item, cond in zip(items, conds)]
        for group, pos in groups:  # prompts of different token lengths: one at a time
            key = None
            if stitch_step:
                key = cfg_guider(key_model, batch_conditioning([key_encode(p) for p, _ in group]), key_negative, recipe.cfg)
            guider = stitched_guider(cfg_guider(model, pos, negative, recipe.cfg), key, stitch_step)
            out, kept, tally = sample_counted(guider, torch.zeros((len(group), *latent_shape)), [s for _, s in group],
                                              sigmas, recipe.sampler, keep_steps=keep_steps, callback=callback)
            latents.append(out)
            evaluations = tally if evaluations is None else evaluations.concat(tally)
            for step in states:
                states[step].append(kept[step])
    return PlainSamples(torch.cat(latents), {s: torch.cat(v) for s, v in states.items()},
                        evaluations if evaluations is not None else Evaluations(0))
