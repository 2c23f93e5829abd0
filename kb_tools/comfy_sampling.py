"""ComfyUI facts ReDi and T-Stitch rely on: the KB's schedule, per-item seed noise, the latent space
a knowledge base stores, and a model's identity (so a knowledge base can be matched to it).

Sampling itself runs through ComfyUI's GUIDERs and KSAMPLER (`plain`, `redi_sampler`,
`guiders`); the segment helpers at the end are kept for embedded/ and benchmarks/ until they
are rewired. Models are only ever extended through `model.clone()` and ComfyUI's hooks;
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
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

import comfy.sample
import comfy.samplers

from .errors import KBError, KBMismatchError
from .records import Difference, differences
from .schedule import sigma_index

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


# --------------------------------------------------------------------------- kept for embedded/benchmarks until they are rewired

@dataclass
class SamplingProbe:
    """Post-CFG hook that counts model evaluations and records the sampler state at chosen steps.

    Kept for embedded/benchmarks until they are rewired (new code: guiders.CountedDenoiser).

    The hook sees every denoiser evaluation once (after CFG) with the state ``x`` it was asked
    about. For step i we keep the last state evaluated at sigmas[i] before the sampler moves
    below it: for single-evaluation samplers that is the only one, and for Heun-like
    samplers the corrected state, not the predictor's.
    """

    sigmas: list[float] = field(default_factory=list)
    record_steps: frozenset[int] = frozenset()
    evaluations: int = 0
    evaluated_sigmas: list[float] = field(default_factory=list)
    records: dict[int, torch.Tensor] = field(default_factory=dict)

    def __call__(self, args: dict) -> torch.Tensor:
        self.evaluations += 1
        sigma = float(args["sigma"].flatten()[0])
        self.evaluated_sigmas.append(sigma)
        if self.record_steps:
            step = sigma_index(self.sigmas, sigma)
            if step is not None and step in self.record_steps:
                self.records[step] = args["input"].detach().to("cpu", torch.float32, copy=True)
        return args["denoised"]


def probed(model, probe: SamplingProbe):
    """A clone of `model` whose every denoiser evaluation passes through `probe`; kept for embedded/benchmarks until they are rewired."""
    clone = model.clone()
    clone.set_model_sampler_post_cfg_function(probe)
    return clone


def sample_sigmas(model, *, latent: torch.Tensor, noise: torch.Tensor | None, positive, negative, cfg: float,
                  sampler_name: str, sigmas: torch.Tensor, seed: int, probe: SamplingProbe | None = None,
                  callback: Callable | None = None, disable_pbar: bool = True) -> torch.Tensor:
    """Run `sampler_name` over exactly `sigmas` and return the latent at sigmas[-1] (LATENT space).

    Kept for embedded/benchmarks until they are rewired (new code: plain.sample_counted). noise=None continues from `latent` as it is (KSamplerAdvanced with add_noise off): that
    is how a partial run, a retrieved value or T-Stitch's hand-over is resumed.
    """
    if len(sigmas) < 2:
        return latent.clone()
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    if noise is None:
        noise = torch.zeros_like(latent, device="cpu")
    run_model = probed(model, probe) if probe is not None else model
    sampler = comfy.samplers.sampler_object(sampler_name)
    with torch.no_grad():  # ComfyUI's executor does the same; some samplers would track gradients otherwise
        out = comfy.sample.sample_custom(run_model, noise, cfg, sampler, sigmas, positive, negative, latent,
                                         callback=callback, disable_pbar=disable_pbar, seed=seed)
    return out.detach()


@dataclass
class Segment:
    """One model's share of a segmented run (steps [start, stop)); kept for embedded/benchmarks until they are rewired."""

    model: object
    positive: list
    negative: list
    start: int
    stop: int


def sample_stitched(segments: Sequence[Segment], *, latent: torch.Tensor, noise: torch.Tensor | None, cfg: float,
                    sampler_name: str, sigmas: torch.Tensor, seed: int, record_steps: Sequence[int] = (),
                    callback: Callable | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor], list[int]]:
    """Run consecutive schedule segments, each on its own model, over ONE sigma schedule.

    Kept for embedded/benchmarks until they are rewired (new code: plain.sample_prompts, and
    guiders.SwitchGuider for runs that switch models or prompts in one sampler run).

    The first segment adds `noise` (None: continue from `latent`); later ones continue from the
    previous segment's latent. Returns (latent at the last segment's end, {step: latent} for
    `record_steps`, model evaluations per segment). A multistep sampler restarts its history
    at each hand-over, exactly as at a ReDi resume.
    """
    if record_steps and sampler_name in SCHEDULE_FREE_SAMPLERS:
        raise KBError(f"sampler {sampler_name!r} chooses its own noise levels, so its trajectory has no fixed steps to store; "
                      "build the knowledge base with a schedule-following sampler such as 'euler' or 'dpmpp_2m'.")
    sigma_list = [float(s) for s in sigmas]
    records: dict[int, torch.Tensor] = {}
    evaluations: list[int] = []
    for seg in segments:
        if seg.stop <= seg.start:
            evaluations.append(0)
            continue
        wanted = frozenset(s for s in record_steps if seg.start <= s < seg.stop)
        probe = SamplingProbe(sigmas=sigma_list, record_steps=wanted)
        # The noise goes to the first segment that runs; empty segments before it are skipped.
        latent = sample_sigmas(seg.model, latent=latent, noise=noise, positive=seg.positive,
                               negative=seg.negative, cfg=cfg, sampler_name=sampler_name,
                               sigmas=sigmas[seg.start:seg.stop + 1], seed=seed, probe=probe, callback=callback)
        noise = None
        for step in wanted:
            if step not in probe.records:
                raise KBError(f"sampler {sampler_name!r} never evaluated the model at step {step} of its schedule, so it cannot be stored; store other steps or use a sampler such as 'euler'.")
            records[step] = to_latent_space(seg.model, sigma_list[step], probe.records[step])
        evaluations.append(probe.evaluations)
    return latent, records, evaluations
