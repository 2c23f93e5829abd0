"""The runs behind the plain reference (plain_reference.py): a few KB entries sampled in full, at equal NFE, and resumed from their blends.

Calibration time only (`python -m kb_tools calibrate KB ... --ckpt CHECKPOINT`), never during
a generation. Items are entries the blend-error measurement left out, so their leave-one-out
blends (neighbours and weights from `BlendErrors`) are the ones the error model was fitted on.
Cost per item: T + sum_v (k + T - v) + sum_v (T - v) model evaluations over the S value steps.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from ..comfy import model_facts as cs
from ..comfy.counted import resume_from
from ..comfy.plain import cfg_guider, sample_prompts
from ..core.errors import KBError
from ..core.records import Recipe
from ..core.schedule import plan_redi
from ..store import KnowledgeBase
from ..store.retrieval import blend_entries
from .blend_error import BlendErrors
from .plain_reference import ReferenceErrors

#: Items sampled when the caller does not say: enough for a median, few enough for one calibration on a GPU.
DEFAULT_ITEMS = 8


def _rms(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """float64 [n]: RMS over each item's elements of a - b ([n, C, H, W] each)."""
    d = (a.double() - b.double()).reshape(len(a), -1)
    return d.pow(2).mean(1).sqrt().numpy()


def measure_reference(kb: KnowledgeBase, model, encode: Callable[[str], list], measured: BlendErrors, *,
                      items: int = DEFAULT_ITEMS, progress: Callable[[str], None] | None = None) -> ReferenceErrors:
    """Sample the first `items` entries `measured` left out: in full, plain at k + T - v steps, and resumed from their blends at v."""
    s = kb.settings
    if not isinstance(measured, BlendErrors) or measured.kb_count != len(kb):
        raise KBError("the plain reference needs the blend errors measured on this KB as it is now "
                      "(blend_error.measure_blend_errors); measure them again after the KB changed.")
    if isinstance(items, bool) or not isinstance(items, int) or items < 1:
        raise KBError(f"items must be an integer >= 1 (KB entries sampled for the plain reference), got {items!r}.")
    if s.seed_policy != "fixed" and s.seed_policy != "per_entry":
        raise KBError(f"the KB's seed policy {s.seed_policy!r} does not say which noise made each entry; the plain "
                      "reference needs to sample entries from their own noise.")
    cs.check_model_matches(s.model_fingerprint, model)  # a different model's errors say nothing of this KB's
    n = min(items, len(measured.ids))
    ids, entries = measured.ids[:n], kb.entries
    prompts, seeds = [entries[int(i)][0] for i in ids], [int(entries[int(i)][1]) for i in ids]
    shape, k, steps = tuple(kb.latent_shape), measured.key_step, s.steps

    def plain(n_steps: int) -> torch.Tensor:
        return sample_prompts(model, encode, prompts, seeds, Recipe(s.sampler, s.scheduler, n_steps, s.cfg),
                              latent_shape=shape, negative_prompt=s.negative_prompt).latents

    say = progress or (lambda text: None)
    full = plain(steps)
    negative = encode(s.negative_prompt)
    guiders = [cfg_guider(model, encode(p), negative, s.cfg) for p in prompts]  # one each: prompts of any token length
    S = len(measured.value_steps)
    plain_rms, final_rms = np.empty((n, S)), np.empty((n, S))
    for j, v in enumerate(measured.value_steps.tolist()):
        say(f"plain reference: value step {v} ({j + 1} of {S})")
        plain_rms[:, j] = _rms(plain(k + steps - v), full)
        value = torch.from_numpy(blend_entries(kb, measured.neighbours[:n], measured.weights[:n], v))
        plan = plan_redi(steps, k, v, s.stored_steps)
        sigmas = torch.tensor(s.sigmas, dtype=torch.float32)
        resumed = torch.cat([resume_from(guiders[i], sigmas, s.sampler, plan.key_step, np.full(1, plan.value_step),
                                         value[i:i + 1], value[i:i + 1], seeds[i:i + 1])[0] for i in range(n)])
        final_rms[:, j] = _rms(resumed, full)
    return ReferenceErrors(k, measured.h, steps, ids.copy(), measured.value_steps.copy(), plain_rms,
                           measured.rms[:n].copy(), final_rms, measured.spread.copy(), math.prod(shape))
