"""ReDi queries on a ComfyUI model: what the nodes and the offline command call.

- `generate`: a whole ReDi generation (Algorithm 2, `redi_sampler.sample_redi`) through
  ComfyUI's own CFGGuider, exactly what SamplerCustomAdvanced runs with ReDiKBNoise and
  SamplerReDi; the ReDiSampler node.
- The four-node chain, one documented part of Algorithm 2 each: `sample_to_key` (lines 1-5),
  `find_neighbours` (line 6), `blend_at` (lines 7-8), `resume` (guard and lines 9-11).
- `KBNoise`: the NOISE object that gives every batch item the KB's seed noise.
- `generate_learning`: a generation against a learning KB that then stores what was sampled in
  full (`learning.learn`); the ReDiLearningSampler node.

Building a knowledge base (Algorithm 1) lives in `build`. The nodes, the offline command, the
demo and the benchmarks (through `embedded/sampling.py`) all call these functions.
Shapes: latents are [B, C, H, W] float32 in ComfyUI's LATENT-dict space; B is the batch.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import comfy.sample
import comfy.samplers
import numpy as np
import torch

from ..calibration.guard import GUARD_AUTO, resolve_error_guard, resolve_guard
from ..comfy.counted import resume_from, sample_counted
from ..comfy.plain import cfg_guider
from ..core.evaluations import Evaluations
from ..core.schedule import ReDiPlan, plan_redi
from ..core.weights import WeightFit, check_value_step, fit_weights
from ..store import KnowledgeBase
from ..store.retrieval import NearestKeys, blend_entries, nearest_keys
from .entry import _empty_latent_warning, check_latent, check_models, planned_model_at, redi_guider
from .redi import start_steps
from .result import ReDiResult

log = logging.getLogger("ReDi")




# --------------------------------------------------------------------------- the four-node chain


@dataclass(frozen=True)
class KeyQuery:
    """The query of each item (Algorithm 2, line 5) and how it was made; ReDiPartialSample's LATENT carries it."""

    kb: KnowledgeBase
    key_step: int
    seeds: tuple[int, ...]
    latent: torch.Tensor  # [B, C, H, W] x_k, LATENT-dict space
    query: np.ndarray  # float32 [B, D]: the same x_k flattened, converted once
    evaluations: Evaluations
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class QueryNeighbours:
    """A query and its top-H stored neighbours (line 6): what the REDI_NEIGHBOURS type carries."""

    query: KeyQuery
    nearest: NearestKeys

    def summary(self) -> str:
        b, h = self.nearest.ids.shape
        return (f"ReDi retrieve: step {self.nearest.key_step}, {b} quer{'y' if b == 1 else 'ies'}, H={h}, nearest id "
                f"{int(self.nearest.ids[0, 0])} at {float(self.nearest.distances[0, 0]):.4g}")


@dataclass(frozen=True)
class BlendedValue:
    """The blended value x_v_hat of each item (lines 7-8) and its weights; ReDiBlend's LATENT carries it."""

    neighbours: QueryNeighbours
    plan: ReDiPlan
    fit: WeightFit
    latent: torch.Tensor  # [B, C, H, W] x_v_hat, LATENT-dict space


def sample_to_key(kb: KnowledgeBase, model, positive, negative, latent: torch.Tensor, seeds: Sequence[int],
                  key_step: int, *, small_model=None, small_positive=None, small_negative=None,
                  callback: Callable | None = None) -> KeyQuery:
    """Lines 1-5: x_T -> x_k with the KB's recipe, then the query q = x_k (ReDiPartialSample)."""
    s = kb.settings
    plan_redi(s.steps, key_step, key_step, s.stored_steps)
    warnings = _empty_latent_warning(latent)
    guider = redi_guider(kb, model, positive, negative, small_model=small_model, small_positive=small_positive,
                         small_negative=small_negative)
    warnings += check_models(kb, planned_model_at(guider, s.sigmas))
    latent = comfy.sample.fix_empty_latent_channels(guider.model_patcher, latent)
    check_latent(kb, latent.shape[1:])
    sigmas = torch.tensor(s.sigmas, dtype=torch.float32)
    x_k, _, tally = sample_counted(guider, latent, seeds, sigmas[:key_step + 1], s.sampler, callback=callback)
    return KeyQuery(kb, int(key_step), tuple(int(v) for v in seeds), x_k, kb.as_queries(x_k), tally, tuple(warnings))


def find_neighbours(query: KeyQuery, h: int) -> QueryNeighbours:
    """Line 6: the top-H stored keys nearest each query (ReDiRetrieve)."""
    return QueryNeighbours(query, nearest_keys(query.kb, query.query, query.key_step, h))


def blend_at(neighbours: QueryNeighbours, value_step: int, weight_mode: str = "lstsq") -> BlendedValue:
    """Lines 7-8: the weights, solved once in `weight_mode`, and the blend of the neighbours' values (ReDiBlend)."""
    q, kb = neighbours.query, neighbours.query.kb
    check_value_step(q.key_step, value_step)
    plan = plan_redi(kb.settings.steps, q.key_step, value_step, kb.settings.stored_steps)
    fit = fit_weights(q.query, neighbours.nearest.keys, kb.key_spread(q.key_step), weight_mode)
    value = torch.from_numpy(blend_entries(kb, neighbours.nearest.ids, fit.weights, value_step))
    return BlendedValue(neighbours, plan, fit, value)


def resume(value: BlendedValue, model, positive, negative, guard: float = GUARD_AUTO,
           callback: Callable | None = None, tolerance: float | None = None) -> ReDiResult:
    """The guard, then lines 9-11: accepted items resume at v, the others at k (ReDiResumeSample).

    tolerance: None for the residual guard `guard`; a number for the error guard at the blend's
    value step (the blend-error model the KB stores; refused here, before sampling, if it has none).
    """
    q, plan, fit = value.neighbours.query, value.plan, value.fit
    kb, h = q.kb, value.neighbours.nearest.ids.shape[1]
    calibration = kb.calibration(plan.key_step)
    gate = resolve_guard(calibration, plan.key_step, h, guard) if tolerance is None else \
        resolve_error_guard(calibration, plan.key_step, h, plan.value_step, tolerance)
    _, accepted, predicted = start_steps(gate, fit, plan)  # the sampler's own guard step
    guider = cfg_guider(model, positive, negative, kb.settings.cfg)
    start = np.where(accepted, plan.value_step, plan.key_step).astype(np.int64)
    out, tally = resume_from(guider, torch.tensor(kb.settings.sigmas, dtype=torch.float32), kb.settings.sampler,
                             plan.key_step, start, q.latent, value.latent, q.seeds, callback)
    spent = Evaluations(len(out), {n: q.evaluations.of(n) + tally.of(n)
                                   for n in sorted(set(q.evaluations.per_model) | set(tally.per_model))})
    return ReDiResult(out, plan, accepted, start, value.neighbours.nearest.ids, value.neighbours.nearest.distances, fit.weights,
                      fit.mode, fit.residual, fit.centered_residual, gate, spent, q.warnings, predicted)
