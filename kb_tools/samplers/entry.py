"""What every sampler of the pack is given, checked once at its entry: the KB against the model, the SIGMAS, the
latent and H; and what a run takes from the KB (its seeds' noise, its guider). Refusals are KBErrors naming the fix."""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch

from ..comfy import model_facts as cs
from ..comfy.guiders import SwitchGuider, patcher_at
from ..comfy.plain import cfg_guider, stitched_guider
from ..core.errors import KBError, KBMismatchError
from ..core.records import describe_differences, differences
from ..core.schedule import Switch
from ..core.weights import WEIGHT_MODES
from ..store import KnowledgeBase

log = logging.getLogger("ReDi")


#: How close a run's SIGMAS must be to the KB's schedule (float32 schedules from one formula agree exactly).
SIGMA_TOLERANCE = (1e-5, 1e-7)



def check_neighbours(kb: KnowledgeBase, neighbours: int, weight_mode: str) -> None:
    """Refuse an empty KB, an H it cannot supply and an unknown weight mode (every retrieval run checks these once)."""
    if len(kb) == 0:
        raise KBError(f"the knowledge base at {kb.path} is empty; build it (BuildKnowledgeBase) before querying it.")
    if not 1 <= int(neighbours) <= len(kb):
        raise KBError(f"H = {neighbours} neighbours, but the knowledge base at {kb.path} holds {len(kb)} trajectories; "
                      f"choose H between 1 and {len(kb)}.")
    if weight_mode not in WEIGHT_MODES:
        raise KBError(f"unknown weight mode {weight_mode!r}; valid modes are {list(WEIGHT_MODES)}.")



def check_known_recipe(kb: KnowledgeBase) -> None:
    """Refuse a KB whose sampler or scheduler the running ComfyUI does not know (the store checks only the names' shape)."""
    for what, name, known in (("sampler", kb.settings.sampler, cs.sampler_names()),
                              ("scheduler", kb.settings.scheduler, cs.scheduler_names())):
        if name not in known:
            raise KBError(f"the knowledge base at {kb.path} was built with the {what} {name!r}, which this ComfyUI does "
                          f"not know (it knows {known[:12]}{'...' if len(known) > 12 else ''}). Install the custom nodes "
                          f"that provide it, or use a KB built with one of ComfyUI's {what}s.")


def check_schedule(kb: KnowledgeBase, sigmas) -> None:
    """Refuse SIGMAS that are not the KB's schedule, naming each difference (and a KB sampler ComfyUI does not know)."""
    check_known_recipe(kb)
    stored = {"steps": kb.settings.steps, "sigmas": kb.settings.sigmas}
    given = [float(s) for s in sigmas]
    diffs = differences(stored, {"steps": len(given) - 1, "sigmas": given}, tolerances={"sigmas": SIGMA_TOLERANCE})
    if diffs:
        r = kb.settings.recipe
        raise KBMismatchError(
            f"the SIGMAS are not the knowledge base's schedule: {describe_differences(diffs, 'knowledge base', 'SIGMAS')}. "
            f"Connect a BasicScheduler with scheduler '{r.scheduler}', {r.steps} steps and denoise 1.0 on the model the KB "
            f"was built with ({r.describe()}), or use the ReDiSampler node, which takes the schedule from the KB.")



def check_models(kb: KnowledgeBase, model_at: Callable[[float], object]) -> list[str]:
    """Refuse models the KB was not built with; `model_at(sigma)` is the ModelPatcher evaluating that sigma.

    Returns warnings (weight patches such as LoRAs differ). The KB's main model must evaluate
    the late steps; a KB whose keys a small model made (T-Stitch keys) needs that model for
    steps before its stitch step and the main model after.
    """
    s = kb.settings
    sigmas = s.sigmas
    main = model_at(sigmas[s.steps - 1])
    if cs.sampling_type(main) != s.sampling_type:
        raise KBMismatchError(f"sampling type: knowledge base has {s.sampling_type!r}, connected model has "
                              f"{cs.sampling_type(main)!r}. Connect the model the KB was built with.")
    warnings = cs.check_model_matches(s.model_fingerprint, main)
    stitch = int(s.extra.get("stitch_step", 0)) if s.key_model_fingerprint is not None else 0
    if stitch:
        small, after = model_at(sigmas[0]), model_at(sigmas[stitch])
        if small is main or small.is_clone(main):
            raise KBMismatchError(
                f"this knowledge base's keys were made by a small (T-Stitch) model for the first {stitch} steps; "
                "connect that model to the small_model input (ReDiSampler, ReDiPartialSample), or give SamplerReDi a "
                "TStitchGuider with it, or use a KB built without one.")
        warnings += cs.check_model_matches(s.key_model_fingerprint, small, what="small model")
        if not (after is main or after.is_clone(main)) or model_at(sigmas[stitch - 1]) is not small:
            raise KBMismatchError(f"the small model must run exactly the first {stitch} steps, as when the knowledge "
                                  f"base was built; set the TStitchGuider's switch to step {stitch} (fraction "
                                  f"{stitch / s.steps:g}).")
    else:
        first = model_at(sigmas[0])
        if not (first is main or first.is_clone(main)):
            warnings += cs.check_model_matches(s.model_fingerprint, first, what="early-step model")
    return warnings



def check_latent(kb: KnowledgeBase, shape) -> None:
    """Refuse a latent whose size the KB was not built for."""
    s = kb.settings
    shape = tuple(int(d) for d in shape)
    if shape != tuple(s.latent_shape):
        raise KBMismatchError(
            f"latent size: knowledge base has {list(s.latent_shape)} (C, H, W), the input latent is {list(shape)}. "
            f"Use an empty latent of {s.latent_shape[2] * 8}x{s.latent_shape[1] * 8} pixels (for 8x-downscaling VAEs) "
            "or a KB built for this size.")



def check_sampling(kb: KnowledgeBase, model, x, sigmas, extra_args: dict, sampler: str = "ReDi") -> list[str]:
    """What every KB sampler is given inside a sampler run (denoiser, x [B, C, H, W], SIGMAS), checked against the KB
    before the first model evaluation; returns warnings."""
    if extra_args.get("denoise_mask") is not None:
        raise KBError(f"{sampler} does not support a latent noise mask (inpainting): the stored trajectories start from "
                      "an empty latent. Remove the mask (SetLatentNoiseMask) or sample the masked latent with KSampler.")
    warnings = check_models(kb, lambda sigma: patcher_at(model, torch.tensor(sigma)))
    check_latent(kb, x.shape[1:])
    check_schedule(kb, sigmas)
    return warnings


def query_seeds(kb: KnowledgeBase, batch: int, seed_mode: str, seed: int) -> tuple[list[int], list[str]]:
    """Seeds for a batch of queries, and warnings when their noise is not in the KB.

    seed_mode "kb": every item starts from the KB's first seed (the official ReDi protocol:
    one shared x_T). "custom": item i uses seed + i.
    """
    kb_seeds = sorted({s for _, s in kb.entries}) if len(kb) else []
    if seed_mode == "kb":
        if not kb_seeds:
            raise KBError("the knowledge base is empty; build it (BuildKnowledgeBase) before querying it.")
        first = kb.entries[0][1]
        return [first] * batch, []
    if seed_mode != "custom":
        raise KBError(f"seed_mode must be 'kb' or 'custom', got {seed_mode!r}.")
    seeds = [int(seed) + i for i in range(batch)]
    foreign = sorted(set(seeds) - set(kb_seeds))
    warnings = []
    if foreign:
        warnings.append(
            f"seeds {foreign[:4]}{'...' if len(foreign) > 4 else ''} are not in the knowledge base (it has {len(kb_seeds)} seed(s), e.g. {kb_seeds[:3]}): "
            "their starting noise has no stored trajectory, so retrieval will likely find no near key and the guard will fall back to plain sampling. "
            "Use seed_mode 'kb' or a seed the KB was built with for a speed-up."
        )
    return seeds, warnings



def check_recipe(kb: KnowledgeBase, sampler: str | None = None, scheduler: str | None = None,
                 steps: int | None = None, cfg: float | None = None) -> None:
    """A recipe override must agree with the KB, which is the single source of truth."""
    check_known_recipe(kb)
    asked = {k: v for k, v in (("sampler", sampler), ("scheduler", scheduler), ("steps", steps), ("cfg", cfg))
             if v is not None}
    stored = {k: v for k, v in kb.settings.recipe.to_dict().items() if k in asked}
    diffs = differences(stored, asked)
    if diffs:
        raise KBMismatchError(describe_differences(diffs, "knowledge base", "override") + ". Clear the override "
                              "(sampler, scheduler, steps and cfg come from the knowledge base), or build a KB with those settings.")



class KBNoise:
    """NOISE (for SamplerCustomAdvanced): every batch item starts from the KB's seed noise.

    The official ReDi protocol: queries share the x_T of the knowledge base, so their keys
    land near stored ones. Each item's noise is drawn as KSampler draws a batch of one.
    """

    def __init__(self, kb: KnowledgeBase):
        self.seed = query_seeds(kb, 1, "kb", 0)[0][0]

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        samples = input_latent["samples"]
        return cs.seeded_noise(samples, [self.seed] * samples.shape[0])



def redi_guider(kb: KnowledgeBase, model, positive, negative, *, key_step: int | None = None, resume_positive=None,
                small_model=None, small_positive=None, small_negative=None):
    """The GUIDER a ReDi query runs with the KB's cfg: the small model first for KBs with T-Stitch keys,
    and for stylization (`resume_positive`) the content prompt up to the key step, content + style after it."""
    s = kb.settings
    main = cfg_guider(model, positive, negative, s.cfg)
    if resume_positive is not None:
        styled = cfg_guider(model, resume_positive, negative, s.cfg)
        main = SwitchGuider(main, styled, Switch("step", key_step), names=("model", "model"))
    stitch = int(s.extra.get("stitch_step", 0)) if s.key_model_fingerprint is not None else 0
    if not stitch:
        return main
    if small_model is None:
        raise KBMismatchError(
            f"this knowledge base's keys were made by a small (T-Stitch) model for the first {stitch} steps; "
            "connect that model to the small_model input, or use a KB built without one.")
    key = cfg_guider(small_model, small_positive if small_positive is not None else positive,
                     small_negative if small_negative is not None else negative, s.cfg)
    return stitched_guider(main, key, stitch)



def planned_model_at(guider, sigmas: Sequence[float]) -> Callable[[float], object]:
    """model_at(sigma) for a guider before it runs: the ModelPatcher that will evaluate that sigma."""
    if isinstance(guider, SwitchGuider):
        return lambda sigma: guider.patcher_at(sigma, sigmas)
    return lambda sigma: guider.model_patcher



def _empty_latent_warning(latent: torch.Tensor) -> list[str]:
    if torch.count_nonzero(latent) != 0:
        w = ("the input latent is not empty; knowledge-base trajectories start from an empty latent, so retrieval "
             "will match poorly. Use EmptyLatentImage.")
        log.warning("ReDi: %s", w)
        return [w]
    return []
