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
from typing import Callable, Mapping, Sequence

from .errors import KBError, KBMismatchError
from .records import differences
from .schedule import Switch

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


#: Per-setting tolerances when comparing two model signatures (records.differences).
SIGNATURE_TOLERANCES = {"latent_scale_factor": (1e-4, 0.0), "sigma_min": (SIGMA_REL_TOL, 0.0),
                        "sigma_max": (SIGMA_REL_TOL, 0.0)}

#: How each signature difference reads; settings not listed may differ (each model gets its own conditioning).
_PROBLEMS = {
    "latent_channels": "latent channels: small model {s}, large model {l} (the two models live in different VAE latent spaces)",
    "latent_scale_factor": "latent scale factor: small model {s} ({fs}), large model {l} ({fl}) (different VAEs)",
    "sampling_type": "sampling type: small model {sn}, large model {ln}",
    "sigma_min": "sigma range (sigma_min): small model {s:.6g}, large model {l:.6g} (different noise schedules)",
    "sigma_max": "sigma range (sigma_max): small model {s:.6g}, large model {l:.6g} (different noise schedules)",
}


def check_stitch_compatible(small_sig: dict, large_sig: dict, small_context_dim, large_context_dim) -> None:
    """Raise KBMismatchError naming every setting that keeps the two models off one trajectory.

    small_sig / large_sig: `comfy_sampling.model_signature(model)` dicts. small_context_dim /
    large_context_dim: last dimension of the conditioning tensor given to each model (an int,
    None to skip, or {label: int} such as {"positive": 768, "negative": 768}); it is compared
    with that model's own `context_dim`. Model class and context size may differ between the
    two models: each model gets its own conditioning.
    """
    problems: list[str] = []
    compared = {k: small_sig.get(k) for k in _PROBLEMS}, {k: large_sig.get(k) for k in _PROBLEMS}
    for d in differences(*compared, tolerances=SIGNATURE_TOLERANCES):
        if d.path != "latent_channels" and (d.left is None or d.right is None):
            continue  # a model that does not declare the setting: nothing to compare
        problems.append(_PROBLEMS[d.path].format(
            s=d.left, l=d.right, sn=_sampling_type_name(d.left), ln=_sampling_type_name(d.right),
            fs=small_sig.get("latent_format"), fl=large_sig.get("latent_format")))
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


def node_switch(switch_mode: str, small_fraction: float, switch_sigma: float) -> Switch:
    """The Switch the T-Stitch nodes' inputs describe."""
    if switch_mode not in SWITCH_MODES:
        raise KBError(f"unknown switch mode {switch_mode!r}; choose one of {list(SWITCH_MODES)}.")
    return Switch("fraction", float(small_fraction)) if switch_mode == "fraction" else Switch("sigma", float(switch_sigma))


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
    from . import comfy_sampling as cs  # ComfyUI only from here on
    from .guiders import SwitchGuider

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
    import torch

    import comfy.model_management
    import comfy.sample
    import comfy.samplers

    from . import comfy_sampling as cs
    from .plain import cfg_guider

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
