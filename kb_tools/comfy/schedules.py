"""The plain choices a ComfyUI user has, by name: sampler x schedule, at a budget of model evaluations.

A schedule is a KSampler scheduler name or one of the preset-schedule nodes ComfyUI ships
(`AlignYourStepsScheduler` for SD1/SDXL, `GITSScheduler` at coeff 1.2), named "ays_sd1",
"ays_sdxl", "gits_1.2". The presets are absolute noise levels tuned on SD1.5/SDXL; they are
what a user of those nodes gets, whatever the model. The calibration's held-out comparison and
the head-to-head benchmark's oracle both walk `PLAIN_SAMPLERS` x `PLAIN_SCHEDULES`.
"""
from __future__ import annotations

import comfy.samplers
import torch

from ..core.errors import KBError
from .model_facts import schedule_sigmas

#: The built-in samplers a careful user would try (single-step and multistep ODE/SDE solvers).
PLAIN_SAMPLERS = ("euler", "heun", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "uni_pc", "uni_pc_bh2", "deis", "ipndm",
                  "res_multistep", "lms", "gradient_estimation")
#: The schedules they are tried with: KSampler's schedulers and the preset nodes' noise levels.
PLAIN_SCHEDULES = ("normal", "karras", "exponential", "sgm_uniform", "simple", "beta", "kl_optimal", "linear_quadratic",
                   "ays_sd1", "gits_1.2")
#: A quick grid for a first calibration: the samplers and schedules users pick most (a quarter of the evaluations of the
#: full grid's 120 choices in the held-out check; the full grid is the default).
COMMON_SAMPLERS = ("euler", "dpmpp_2m", "deis", "uni_pc")
COMMON_SCHEDULES = ("normal", "karras", "ays_sd1", "gits_1.2")
#: Preset-node schedules: name -> (node module, node class, its first input).
PRESET_SCHEDULES = {"ays_sd1": ("comfy_extras.nodes_align_your_steps", "AlignYourStepsScheduler", "SD1"),
                    "ays_sdxl": ("comfy_extras.nodes_align_your_steps", "AlignYourStepsScheduler", "SDXL"),
                    "gits_1.2": ("comfy_extras.nodes_gits", "GITSScheduler", 1.2)}
#: Samplers that evaluate the model twice per step except the last one, which is a single Euler step to sigma 0.
TWO_EVALUATION_SAMPLERS = frozenset({"heun", "dpm_2"})


def schedule_names() -> list[str]:
    """Every schedule `plain_sigmas` accepts: ComfyUI's schedulers, then the preset nodes'."""
    return [*comfy.samplers.KSampler.SCHEDULERS, *PRESET_SCHEDULES]


def steps_for_nfe(sampler_name: str, nfe: int) -> int:
    """Sampler steps that spend at most `nfe` model evaluations (Heun: 2 per step, 1 on the last)."""
    if int(nfe) < 1:
        raise KBError(f"a budget of {nfe} model evaluations is too small; give at least 1.")
    return max(1, (int(nfe) + 1) // 2) if sampler_name in TWO_EVALUATION_SAMPLERS else int(nfe)


def nfe_for_steps(sampler_name: str, steps: int) -> int:
    """Model evaluations `steps` steps of the sampler spend (the inverse of steps_for_nfe)."""
    return 2 * int(steps) - 1 if sampler_name in TWO_EVALUATION_SAMPLERS else int(steps)


def plain_sigmas(model, sampler_name: str, schedule: str, steps: int) -> torch.Tensor:
    """float [steps + 1]: the noise levels the user's choice walks, as KSampler or the preset node builds them."""
    if schedule not in PRESET_SCHEDULES:
        return schedule_sigmas(model, sampler_name, schedule, steps)
    if not 2 <= int(steps) <= 1000:
        raise KBError(f"the {schedule} preset schedule needs 2 to 1000 steps, got {steps}; pick another schedule for "
                      "a single step.")
    import importlib

    module, node, first = PRESET_SCHEDULES[schedule]
    # The node's own execute: a user's SamplerCustom graph with this node gets exactly these sigmas.
    sigmas = getattr(importlib.import_module(module), node).execute(first, int(steps), 1.0).result[0]
    return torch.as_tensor(sigmas, dtype=torch.float32).detach().cpu()
