"""T-Stitch's pure parts (Pan et al., ICLR 2024): whether two models can share one trajectory, where the small one
hands over, and the run's summary. Plain Python over dicts and numbers, no ComfyUI."""
from __future__ import annotations

from typing import Mapping

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
