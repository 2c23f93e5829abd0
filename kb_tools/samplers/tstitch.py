"""T-Stitch: a small diffusion model runs the first steps of a trajectory, a large one the rest.

Pan et al., "T-Stitch: Accelerating Sampling in Pre-Trained Diffusion Models with
Trajectory Stitching" (ICLR 2024). Both models must share the latent space, the prediction
type and the noise schedule; each gets conditioning from its own text encoder. There is no
latent alignment between the two, so a mismatched pair is refused before any sampling
(the official code only failed inside the network, `mat1 and mat2 shapes cannot be
multiplied`, when SD2 was paired with an SD1-family small model).

The run itself is one sampler run through `guiders.SwitchGuider`: every model evaluation goes
to the model that owns its sigma, so a multistep sampler keeps its history across the
hand-over (the official code shares one scheduler, whose history mixes the two models;
running the two halves as separate runs restarts it). Everything above `tstitch_guider` is
plain Python over dicts and numbers and imports no ComfyUI; `tstitch_guider` and
`tstitch_sample` import the ComfyUI side when they are called.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from ..core.errors import KBError
from ..core.schedule import Switch
from ..core.stitch import check_stitch_compatible, node_switch, stitch_summary


def parameter_count(model) -> int:
    """Parameters of a ComfyUI model's diffusion network (ModelPatcher.model.diffusion_model)."""
    return sum(int(p.numel()) for p in model.model.diffusion_model.parameters())


def conditioning_context_dim(conditioning) -> int | None:
    """Last dimension of the first CONDITIONING entry's tensor (its text-context size), None if empty."""
    if not conditioning:
        return None
    tensor = conditioning[0][0]
    return int(tensor.shape[-1]) if getattr(tensor, "ndim", 0) >= 1 else None


def guider_context_dims(guider) -> dict[str, int] | None:
    """{conditioning name: context size} of a CFG-style guider's conditionings (None for other guiders)."""
    conds = getattr(guider, "original_conds", None)
    if not isinstance(conds, dict):
        return None
    out = {}
    for name, entries in conds.items():
        tensor = entries[0].get("cross_attn") if entries else None
        out[name] = int(tensor.shape[-1]) if getattr(tensor, "ndim", 0) >= 1 else None
    return out


# --------------------------------------------------------------------------- ComfyUI side


@dataclass
class TStitchResult:
    """What a stitched run did: the split, evaluations per model (counted) and the summary line."""

    steps: int
    small_steps: int
    small_evaluations: int
    large_evaluations: int
    small_parameters: int
    large_parameters: int
    summary: str


def tstitch_guider(small_guider, large_guider, switch: Switch):
    """The T-Stitch GUIDER (one sampler run, each evaluation on the model owning its sigma), after the pair check."""
    from ..comfy import model_facts as cs  # ComfyUI only from here on
    from ..comfy.guiders import SwitchGuider

    check_stitch_compatible(cs.model_signature(small_guider.model_patcher), cs.model_signature(large_guider.model_patcher),
                            guider_context_dims(small_guider), guider_context_dims(large_guider))
    return SwitchGuider(small_guider, large_guider, switch, names=("small_model", "large_model"))


def tstitch_sample(small_model, large_model, *, small_positive, small_negative, large_positive, large_negative,
                   latent: dict, seed: int, sampler_name: str, scheduler: str, steps: int, cfg: float,
                   switch_mode: str = "fraction", small_fraction: float = 0.4, switch_sigma: float = 1.0,
                   seeds: Sequence[int] | None = None, callback: Callable | None = None) -> tuple[dict, TStitchResult]:
    """Sample one trajectory, small model on the first steps, large model on the rest (TStitchSampler).

    One noise schedule spans the whole run: the large model's, built exactly as KSampler
    builds it, and one sampler run (a multistep sampler keeps its history across the
    hand-over). Batch item i starts from the noise of seeds[i] (default seed + i). Returns (a copy of the LATENT
    dict with new "samples", the run's TStitchResult). The pair is checked before anything is sampled.
    """
    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    import torch

    from ..comfy import model_facts as cs
    from ..comfy.plain import cfg_guider

    if "noise_mask" in latent:
        raise KBError("T-Stitch does not support a latent noise mask (inpainting); remove the mask "
                      "(SetLatentNoiseMask) or sample the masked latent with KSampler.")
    guider = tstitch_guider(cfg_guider(small_model, small_positive, small_negative, cfg),
                            cfg_guider(large_model, large_positive, large_negative, cfg),
                            node_switch(switch_mode, small_fraction, switch_sigma))
    sigmas = cs.schedule_sigmas(large_model, sampler_name, scheduler, int(steps))
    steps = len(sigmas) - 1
    s = guider.switch.step_in(sigmas.tolist())
    samples = comfy.sample.fix_empty_latent_channels(large_model, latent["samples"])
    if seeds is None:
        seeds = [(int(seed) + i) & 0xFFFFFFFFFFFFFFFF for i in range(samples.shape[0])]
    with torch.no_grad():
        out_samples = guider.sample(cs.seeded_noise(samples, seeds), samples, comfy.samplers.sampler_object(sampler_name),
                                    sigmas, callback=callback, disable_pbar=True, seed=int(seed))
    small_params, large_params = parameter_count(small_model), parameter_count(large_model)
    ratio = small_params / large_params if large_params else None
    summary = stitch_summary(s, steps - s, ratio)
    cs.log.info(summary)
    out = latent.copy()
    out["samples"] = out_samples.to(comfy.model_management.intermediate_device())
    return out, TStitchResult(steps, s, guider.evaluations.get("small_model", 0), guider.evaluations.get("large_model", 0),
                              small_params, large_params, summary)
