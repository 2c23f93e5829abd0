"""T-Stitch: a small diffusion model runs the first steps of a trajectory, a large one the rest.

Pan et al., "T-Stitch: Accelerating Sampling in Pre-Trained Diffusion Models with
Trajectory Stitching" (ICLR 2024). Both models must share the latent space, the prediction
type and the noise schedule; each gets conditioning from its own text encoder. There is no
latent alignment between the two, so a mismatched pair is refused before any sampling
(the official code only failed inside the network, `mat1 and mat2 shapes cannot be
multiplied`, when SD2 was paired with an SD1-family small model).

Everything above `tstitch_sample` is plain Python over dicts and numbers and imports no
ComfyUI; `tstitch_sample` imports the ComfyUI side (`comfy_sampling`) when it is called.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

from .errors import KBError, KBMismatchError
from .schedule import stitch_switch_step

#: Relative tolerance on sigma_min / sigma_max when deciding two models share a schedule.
SIGMA_REL_TOL = 1e-3

SWITCH_MODES = ("fraction", "sigma")

_SAMPLING_TYPE_NAMES = {
    "EPS": "EPS (noise prediction)",
    "V_PREDICTION": "V_PREDICTION (v-prediction)",
    "CONST": "CONST (flow matching)",
}


def _sampling_type_name(value) -> str:
    return _SAMPLING_TYPE_NAMES.get(value, str(value))


def _as_dim_map(value) -> dict[str, int | None]:
    """A conditioning context size given as an int (one conditioning) or {label: int}."""
    if isinstance(value, Mapping):
        return {str(k): (None if v is None else int(v)) for k, v in value.items()}
    return {"conditioning": None if value is None else int(value)}


def check_stitch_compatible(small_sig: dict, large_sig: dict, small_context_dim, large_context_dim) -> None:
    """Raise KBMismatchError naming every setting that keeps the two models off one trajectory.

    small_sig / large_sig: `comfy_sampling.model_signature(model)` dicts. small_context_dim /
    large_context_dim: last dimension of the conditioning tensor given to each model (an int,
    None to skip, or {label: int} such as {"positive": 768, "negative": 768}); it is compared
    with that model's own `context_dim`. Model class and context size may differ between the
    two models: each model gets its own conditioning.
    """
    problems: list[str] = []

    def pair(key):
        return small_sig.get(key), large_sig.get(key)

    s, big = pair("latent_channels")
    if s != big:
        problems.append(f"latent channels: small model {s}, large model {big} (the two models live in different VAE latent spaces)")
    s, big = pair("latent_scale_factor")
    if s is not None and big is not None and not math.isclose(float(s), float(big), rel_tol=1e-4):
        fmt_s, fmt_l = pair("latent_format")
        problems.append(f"latent scale factor: small model {s} ({fmt_s}), large model {big} ({fmt_l}) (different VAEs)")
    s, big = pair("sampling_type")
    if s != big:
        problems.append(f"sampling type: small model {_sampling_type_name(s)}, large model {_sampling_type_name(big)}")
    for key in ("sigma_min", "sigma_max"):
        s, big = pair(key)
        if s is not None and big is not None and not math.isclose(float(s), float(big), rel_tol=SIGMA_REL_TOL):
            problems.append(f"sigma range ({key}): small model {float(s):.6g}, large model {float(big):.6g} (different noise schedules)")
    for role, sig, given in (("small", small_sig, small_context_dim), ("large", large_sig, large_context_dim)):
        expected = sig.get("context_dim")
        if expected is None:
            continue  # the model declares no cross-attention context size: nothing to compare
        for label, dim in _as_dim_map(given).items():
            if dim is not None and dim != int(expected):
                problems.append(
                    f"context size: the {role} model's {label} conditioning is {dim}-dimensional, but the {role} model "
                    f"expects {int(expected)} (its unet_config context_dim); encode the {role} model's prompts with the "
                    f"text encoder (CLIP) that belongs to the {role} model"
                )
    if problems:
        raise KBMismatchError(
            "T-Stitch cannot put these two models on one sampling trajectory: " + "; ".join(problems) + ". "
            "Fix: pair a small and a large model of the same family (same VAE latent space, same prediction type and "
            "noise schedule, e.g. two SD1.x models or two SDXL models), and feed each model conditioning from its own "
            "text encoder."
        )


def stitch_summary(small_steps: int, large_steps: int, small_cost_ratio: float | None = None) -> str:
    """The one log line: how the steps were split and what it saves.

    small_cost_ratio: cost of one small-model evaluation relative to one large-model
    evaluation (e.g. the parameter-count ratio); when given, the estimated time saving is added.
    """
    total = small_steps + large_steps
    if total <= 0:
        return "T-Stitch: no steps to run"
    saved = small_steps / total
    line = (f"T-Stitch: {small_steps} of {total} steps on the small model, {large_steps} on the large "
            f"(large-model evaluations -{saved:.0%})")
    if small_cost_ratio is not None and small_steps > 0:
        ratio = float(small_cost_ratio)
        if ratio >= 1.0:
            line += (f"; the 'small' model is not smaller ({ratio:.2f}x the large model's parameters), so no time is "
                     "saved: connect the cheaper model to small_model")
        else:
            time_saved = small_steps * (1.0 - ratio) / total
            line += f"; estimated time -{time_saved:.0%} (small model ~{ratio:.2f}x the large model's cost, by parameter count)"
    return line


def switch_step(sigmas, switch_mode: str, small_fraction: float, switch_sigma: float) -> int:
    """Steps the small model runs, from the node's switch settings (see `stitch_switch_step`)."""
    if switch_mode == "fraction":
        return stitch_switch_step(sigmas, fraction=float(small_fraction))
    if switch_mode == "sigma":
        return stitch_switch_step(sigmas, switch_sigma=float(switch_sigma))
    raise KBError(f"unknown switch mode {switch_mode!r}; choose one of {list(SWITCH_MODES)}.")


def parameter_count(model) -> int:
    """Parameters of a ComfyUI model's diffusion network (ModelPatcher.model.diffusion_model)."""
    return sum(int(p.numel()) for p in model.model.diffusion_model.parameters())


def conditioning_context_dim(conditioning) -> int | None:
    """Last dimension of the first CONDITIONING entry's tensor (its text-context size), None if empty."""
    if not conditioning:
        return None
    tensor = conditioning[0][0]
    return int(tensor.shape[-1]) if getattr(tensor, "ndim", 0) >= 1 else None


# --------------------------------------------------------------------------- ComfyUI side

@dataclass
class TStitchResult:
    """What a stitched run did: the split, evaluations per model and the summary line."""

    steps: int
    small_steps: int
    small_evaluations: int
    large_evaluations: int
    small_parameters: int
    large_parameters: int
    summary: str


def tstitch_sample(small_model, large_model, *, small_positive, small_negative, large_positive, large_negative,
                   latent: dict, seed: int, sampler_name: str, scheduler: str, steps: int, cfg: float,
                   switch_mode: str = "fraction", small_fraction: float = 0.4, switch_sigma: float = 1.0,
                   callback: Callable | None = None) -> tuple[dict, TStitchResult]:
    """Sample one trajectory, small model on steps [0, s), large model on [s, steps).

    One noise schedule spans the whole run: the large model's, built exactly as KSampler
    builds it. Batch item i starts from the noise of seed + i. A multistep sampler restarts
    its history at the hand-over. Returns (a copy of the LATENT dict with new "samples",
    the run's TStitchResult). The compatibility check runs before anything is sampled.
    """
    import comfy.sample  # ComfyUI only from here on

    from . import comfy_sampling as cs

    check_stitch_compatible(
        cs.model_signature(small_model), cs.model_signature(large_model),
        {"positive": conditioning_context_dim(small_positive), "negative": conditioning_context_dim(small_negative)},
        {"positive": conditioning_context_dim(large_positive), "negative": conditioning_context_dim(large_negative)},
    )
    if "noise_mask" in latent:
        raise KBError("T-Stitch does not support a latent noise mask (inpainting); remove the mask "
                      "(SetLatentNoiseMask) or sample the masked latent with KSampler.")
    steps = int(steps)
    sigmas = cs.schedule_sigmas(large_model, sampler_name, scheduler, steps)
    steps = len(sigmas) - 1
    s = switch_step(sigmas.tolist(), switch_mode, small_fraction, switch_sigma)

    samples = comfy.sample.fix_empty_latent_channels(large_model, latent["samples"])
    seeds = [(int(seed) + i) & 0xFFFFFFFFFFFFFFFF for i in range(samples.shape[0])]
    noise = cs.seeded_noise(samples, seeds)
    # An empty segment is left out: the first segment run must be the one that adds the noise.
    planned = [("small", cs.Segment(small_model, small_positive, small_negative, 0, s)),
               ("large", cs.Segment(large_model, large_positive, large_negative, s, steps))]
    planned = [(role, seg) for role, seg in planned if seg.stop > seg.start]
    segments = [seg for _, seg in planned]
    if 0 < s < steps and sampler_name in cs.MULTISTEP_SAMPLERS:
        cs.log.info("T-Stitch: %s keeps a history of model outputs; it restarts at the hand-over (step %d), "
                    "so the first large-model steps run at lower order.", sampler_name, s)
    out_samples, _, evaluations = cs.sample_stitched(segments, latent=samples, noise=noise, cfg=cfg,
                                                     sampler_name=sampler_name, sigmas=sigmas, seed=int(seed),
                                                     callback=callback)
    per_model = {"small": 0, "large": 0}
    for (role, _), count in zip(planned, evaluations):
        per_model[role] += count
    small_params, large_params = parameter_count(small_model), parameter_count(large_model)
    ratio = small_params / large_params if large_params else None
    summary = stitch_summary(s, steps - s, ratio)
    cs.log.info(summary)
    out = latent.copy()
    out["samples"] = out_samples
    return out, TStitchResult(steps, s, per_model["small"], per_model["large"], small_params, large_params, summary)
