"""ComfyUI facts ReDi and T-Stitch rely on: the KB's schedule, per-item seed noise, the latent space
a knowledge base stores, and a model's identity (so a knowledge base can be matched to it).

Sampling itself runs through ComfyUI's GUIDERs and KSAMPLER (`plain`, `redi_sampler`,
`guiders`). Models are only ever extended through `model.clone()` and ComfyUI's hooks;
nothing in ComfyUI is patched.

Latent space: every latent handed in or out here is in ComfyUI's LATENT-dict space, the
space `KSamplerAdvanced(return_with_leftover_noise)` returns:
``process_latent_out(inverse_noise_scaling(sigma, x))`` of the sampler's internal ``x``
(``x / scale_factor`` for EPS and v models, ``x / (1 - sigma) / scale_factor`` for flow
models). Keys and values of a knowledge base are stored in that space too, so a query,
its keys and the blended value are directly comparable, and resuming from a LATENT with
``add_noise`` off lands exactly on the stored state.
"""
from __future__ import annotations

import hashlib
import json
import logging
from typing import Sequence

import comfy.sample
import comfy.samplers
import torch

from ..core.errors import KBError, KBMismatchError
from ..core.records import Difference, differences

log = logging.getLogger("ReDi")

#: Samplers that pick their own noise levels instead of walking the schedule's sigmas; a
#: trajectory cannot be recorded at fixed steps with them.
SCHEDULE_FREE_SAMPLERS = frozenset({"dpm_fast", "dpm_adaptive"})


def sampler_names() -> list[str]:
    """Every sampler name ComfyUI lists."""
    return list(comfy.samplers.KSampler.SAMPLERS)


def scheduler_names() -> list[str]:
    """Every scheduler name ComfyUI lists."""
    return list(comfy.samplers.KSampler.SCHEDULERS)


# --------------------------------------------------------------------------- schedule

def schedule_sigmas(model, sampler_name: str, scheduler: str, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """Full sigma schedule [steps + 1] exactly as KSampler builds it for this sampler."""
    if sampler_name not in comfy.samplers.KSampler.SAMPLERS:
        raise KBError(f"unknown sampler {sampler_name!r}; choose one of ComfyUI's samplers, e.g. 'euler'.")
    if scheduler not in comfy.samplers.KSampler.SCHEDULERS:
        raise KBError(f"unknown scheduler {scheduler!r}; choose one of {list(comfy.samplers.KSampler.SCHEDULERS)}.")
    # KSampler owns the sampler-specific quirks (dpm_2 and uni_pc drop the penultimate sigma).
    ksampler = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                       scheduler=scheduler, denoise=denoise, model_options=model.model_options)
    return ksampler.sigmas.detach().float().cpu()


def seeded_noise(latent: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
    """Initial noise [B, C, H, W], item i drawn from its own seed exactly as KSampler draws a batch of one.

    Per-item seeds make every batch item reproducible on its own, so a batch of queries meets
    the same noise as the single trajectories stored in a knowledge base.
    """
    if len(seeds) != latent.shape[0]:
        raise KBError(f"got {len(seeds)} seeds for a batch of {latent.shape[0]} latents.")
    items = [comfy.sample.prepare_noise(latent[i:i + 1], int(seed)) for i, seed in enumerate(seeds)]
    return torch.cat(items, dim=0)


# --------------------------------------------------------------------------- latent space

def _base_model(model):
    """The BaseModel (latent format, noise scaling) of a ModelPatcher or of a BaseModel itself."""
    return model if hasattr(model, "model_sampling") else model.model


def to_latent_space(model, sigma, x: torch.Tensor) -> torch.Tensor:
    """Sampler state at `sigma` -> LATENT-dict space (what KSamplerAdvanced returns with leftover noise).

    model: a ModelPatcher or its BaseModel. The same two steps KSAMPLER and CFGGuider apply to
    a sampler's output: inverse_noise_scaling, then the latent format's process_out.
    """
    base = _base_model(model)
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(1)
    return base.process_latent_out(base.model_sampling.inverse_noise_scaling(sigma, x))


def from_latent_space(model, sigma, latent: torch.Tensor) -> torch.Tensor:
    """LATENT-dict space -> sampler state at `sigma`: the inverse of to_latent_space.

    The same two steps CFGGuider and KSAMPLER apply when a LATENT is resumed without new
    noise: the latent format's process_in, then noise_scaling with zero noise.
    """
    base = _base_model(model)
    latent = base.process_latent_in(latent)
    sigma = torch.as_tensor(sigma, dtype=latent.dtype, device=latent.device).reshape(1)
    return base.model_sampling.noise_scaling(sigma, torch.zeros_like(latent), latent)


# --------------------------------------------------------------------------- model identity

def sampling_type(model) -> str:
    """Prediction type of the model's sampling object: 'EPS', 'V_PREDICTION', 'CONST' (flow), ..."""
    known = ("V_PREDICTION", "EDM", "EPS", "CONST", "X0", "IMG_TO_IMG", "COSMOS_RFLOW")
    for cls in type(model.get_model_object("model_sampling")).__mro__:
        if cls.__name__ in known:
            return cls.__name__
    return type(model.get_model_object("model_sampling")).__name__


def model_signature(model) -> dict:
    """What two models must share to sit on one trajectory (latent space, schedule, context size)."""
    ms = model.get_model_object("model_sampling")
    fmt = model.get_model_object("latent_format")
    unet_config = getattr(model.model.model_config, "unet_config", {}) or {}
    return {
        "model_class": type(model.model).__name__,
        "latent_channels": int(fmt.latent_channels),
        "latent_scale_factor": float(fmt.scale_factor),
        "latent_format": type(fmt).__name__,
        "sampling_type": sampling_type(model),
        "sigma_min": float(ms.sigma_min),
        "sigma_max": float(ms.sigma_max),
        "context_dim": unet_config.get("context_dim"),
    }


def _weight_probe(model, count: int = 48) -> list[float]:
    """A few BASE weights sampled evenly from the first, middle and last parameter tensors.

    Several ModelPatcher clones share one torch module, whose live weights carry the patches
    (LoRAs) of whichever clone was loaded last. Loading this clone first and reading the
    patched tensors from its backup gives the unpatched checkpoint weights either way.
    """
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    named = list(model.model.diffusion_model.named_parameters())
    if not named:
        return []
    picks = [named[0], named[len(named) // 2], named[-1]]
    values: list[float] = []
    per = max(1, count // len(picks))
    for name, param in picks:
        backup = model.backup.get(f"diffusion_model.{name}")
        flat = (backup.weight if backup is not None else param).detach().flatten()
        idx = torch.linspace(0, flat.numel() - 1, steps=min(per, flat.numel())).long()
        values.extend(float(v) for v in flat[idx].float().cpu())
    return values


def _patches_digest(model) -> dict:
    """Digest of weight patches (LoRAs and the like) applied through the ModelPatcher."""
    keys = sorted(getattr(model, "patches", {}) or {})
    h = hashlib.sha256()
    for key in keys:
        h.update(key.encode())
        for patch in model.patches[key]:
            h.update(repr((round(float(patch[0]), 6), round(float(patch[2]), 6))).encode())
    return {"count": len(keys), "sha256": h.hexdigest()[:16] if keys else None}


def model_fingerprint(model) -> dict:
    """JSON-able identity of a model: architecture, a weight sample and its weight patches."""
    unet_config = getattr(model.model.model_config, "unet_config", {}) or {}
    arch = json.dumps(unet_config, sort_keys=True, default=str)
    return {
        "signature": model_signature(model),
        "arch_sha256": hashlib.sha256(arch.encode()).hexdigest()[:16],
        "weight_probe": _weight_probe(model),
        "patches": _patches_digest(model),
    }


#: How close two fingerprints' numbers must be: signatures to 1e-4, sampled weights to 2% (fp16 round trips).
FINGERPRINT_TOLERANCES = {"signature": (1e-4, 0.0), "weight_probe": (2e-2, 1e-3)}


def compare_fingerprints(stored: dict, current: dict, what: str = "model") -> tuple[list[str], list[str]]:
    """(errors, warnings) between a KB's fingerprint and the model at hand (records.differences).

    Architecture, signature or base weights that differ are errors: the trajectories belong
    to another model. Different weight patches (a LoRA added or removed) only warn, because
    a LoRA moves trajectories a little and the residual guard still protects the output.
    """
    errors: list[str] = []
    for d in differences(stored, current, tolerances=FINGERPRINT_TOLERANCES, ignore=("patches", "weight_probe")):
        if d.path == "arch_sha256":
            errors.append(f"{what} architecture differs from the one the knowledge base was built with")
        else:
            path = d.path.removeprefix("signature.")
            errors.append(f"{what} {Difference(path, d.left, d.right).describe('knowledge base', 'connected model')}")
    if differences(stored.get("weight_probe", []), current.get("weight_probe", []),
                   tolerances={"": FINGERPRINT_TOLERANCES["weight_probe"]}):
        errors.append(f"{what} weights differ from the checkpoint the knowledge base was built with")
    warnings: list[str] = []
    if differences(stored.get("patches"), current.get("patches")):
        warnings.append(
            f"{what} weight patches (LoRA) differ from those the knowledge base was built with "
            f"(KB: {(stored.get('patches') or {}).get('count', 0)} patched weights, now: {(current.get('patches') or {}).get('count', 0)}); "
            "retrieval may match less well, the residual guard falls back to plain sampling where it does."
        )
    return errors, warnings


def check_model_matches(stored: dict, model, what: str = "model") -> list[str]:
    """Raise KBMismatchError if `model` is not the one the KB was built with; return warnings."""
    errors, warnings = compare_fingerprints(stored, model_fingerprint(model), what)
    if errors:
        raise KBMismatchError(
            "this knowledge base was built with a different model: " + "; ".join(errors)
            + ". Connect the checkpoint the knowledge base was built with, or build a knowledge base for this model."
        )
    for w in warnings:
        log.warning("ReDi: %s", w)
    return warnings
