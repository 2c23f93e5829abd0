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
import dataclasses
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
import torch

import comfy.sample
import comfy.samplers

from . import comfy_sampling as cs
from .build import BuildReport, BuildSpec, build_knowledge_base, kb_settings_for  # noqa: F401 - public API
from .errors import KBError, KBMismatchError
from .guard import FALLBACK_GUARD, GUARD_AUTO, Guard, default_tolerance, resolve_error_guard, resolve_guard  # noqa: F401 - public API
from .guiders import SwitchGuider
from .kb import KBBudget, KBSettings, KnowledgeBase, open_or_create
from .learning import LearnReport, learn
from .plain import batch_conditioning, cfg_guider, sample_counted, stitched_guider  # noqa: F401 - public API
from .records import Recipe, describe_differences, differences  # noqa: F401 - Recipe: public API (BuildSpec.recipe)
from .redi_sampler import (  # noqa: F401 - public API
    ReDiRun, check_latent, check_models, make_run, redi_ksampler, resume_items, start_steps)
from .results import Evaluations, ReDiResult
from .retrieval import NearestKeys, WeightFit, blend_entries, check_value_step, fit_weights, nearest_keys
from .schedule import ReDiPlan, Switch, plan_redi

log = logging.getLogger("ReDi")


# --------------------------------------------------------------------------- checks and seeds


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


# --------------------------------------------------------------------------- a whole generation


def generate(kb: KnowledgeBase, model, positive, negative, latent: torch.Tensor, seeds: Sequence[int], run: ReDiRun, *,
             resume_positive=None, small_model=None, small_positive=None, small_negative=None,
             callback: Callable | None = None) -> ReDiResult:
    """One ReDi generation of a batch (item i from the noise of seeds[i]); the ReDiSampler node.

    The same run as SamplerCustomAdvanced(ReDiKBNoise, CFGGuider, SamplerReDi, the KB's SIGMAS).
    """
    warnings = _empty_latent_warning(latent)
    guider = redi_guider(kb, model, positive, negative, key_step=run.plan.key_step, resume_positive=resume_positive,
                         small_model=small_model, small_positive=small_positive, small_negative=small_negative)
    latent = comfy.sample.fix_empty_latent_channels(guider.model_patcher, latent)
    sigmas = torch.tensor(kb.settings.sigmas, dtype=torch.float32)
    with torch.no_grad():
        guider.sample(cs.seeded_noise(latent, seeds), latent, redi_ksampler(run), sigmas, callback=callback,
                      disable_pbar=True, seed=int(seeds[0]))
    result = run.result
    return replace(result, warnings=tuple(warnings) + result.warnings) if warnings else result


# --------------------------------------------------------------------------- a learning KB


def learning_settings(model, recipe: Recipe, store_steps: Sequence[int], latent_shape: Sequence[int],
                      negative_prompt: str = "") -> KBSettings:
    """The settings of a learning KB for this model and recipe: entries from any seed ("per_entry")."""
    spec = BuildSpec(prompts=(), seeds=(0,), recipe=recipe, store_steps=store_steps,
                     latent_shape=tuple(int(v) for v in latent_shape), negative_prompt=negative_prompt)
    sigmas = cs.schedule_sigmas(model, recipe.sampler, recipe.scheduler, recipe.steps)
    return dataclasses.replace(kb_settings_for(model, spec, sigmas), seed_policy="per_entry")


@dataclass(frozen=True)
class LearningResult:
    """One generation against a learning KB: its output, the ReDi run (None: the KB was empty, all plain), what was learned."""

    latent: torch.Tensor  # [B, C, H, W] LATENT-dict space
    redi: ReDiResult | None
    evaluations: Evaluations
    learned: LearnReport

    def summary(self) -> str:
        first = self.redi.summary() if self.redi is not None else (
            f"ReDi learning: the KB was empty, sampled all {len(self.latent)} item(s) in full; "
            f"{self.evaluations.describe()}")
        return f"{first}. {self.learned.summary()}"


def sample_in_full(settings: KBSettings, model, positive, negative, latent: torch.Tensor, seeds: Sequence[int],
                   callback: Callable | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor], Evaluations]:
    """Every item in full with a learning KB's recipe, keeping its stored steps: (latent, {step: latent}, evaluations)."""
    guider = cfg_guider(model, positive, negative, settings.cfg)
    sigmas = torch.tensor(settings.sigmas, dtype=torch.float32)
    return sample_counted(guider, latent, seeds, sigmas, settings.sampler, keep_steps=settings.stored_steps,
                          callback=callback)


def generate_learning(path: str, settings: KBSettings, model, positive, negative, latent: torch.Tensor,
                      prompts: Sequence[str], seeds: Sequence[int], *, key_step: int, value_step: int,
                      neighbours: int = 3, weight_mode: str = "lstsq", guard: float = GUARD_AUTO,
                      tolerance: float | None = None, adaptive: bool = False, budget: KBBudget = KBBudget(),
                      dtype: str = "float16", callback: Callable | None = None) -> LearningResult:
    """Generate item i (prompts[i], the noise of seeds[i]) with ReDi against the learning KB at `path`, then learn.

    First use (no KB, or an empty one): the KB is created with `settings` and every item runs
    the KB's recipe in full. Else a ReDi run (H = min(neighbours, entries)); the items its guard
    refused ran every step from noise and are learned, the blended ones never are. `settings`
    comes from `learning_settings` for the same model and recipe.
    """
    if len(prompts) != len(latent) or len(seeds) != len(latent):
        raise KBError(f"got {len(prompts)} prompts and {len(seeds)} seeds for a batch of {len(latent)}; give one each.")
    plan_redi(settings.steps, key_step, value_step, settings.stored_steps)  # refused now, not at the second generation
    kb = open_or_create(path, settings, dtype=dtype)
    if len(kb) == 0:
        out, states, tally = sample_in_full(settings, model, positive, negative, latent, seeds, callback)
        result, full = None, np.ones(len(out), bool)
    else:
        run = make_run(kb, key_step, value_step, min(int(neighbours), len(kb)), weight_mode, guard, tolerance, adaptive)
        run.keep_steps = tuple(settings.stored_steps)
        result = generate(kb, model, positive, negative, latent, seeds, run, callback=callback)
        out, tally, states, full = result.latent, result.evaluations, run.full_states, ~result.accepted
    rows = np.flatnonzero(full)
    learned = learn(path, settings, states, [prompts[i] for i in rows], [int(seeds[i]) for i in rows], budget, dtype=dtype)
    return LearningResult(out, result, tally, learned)


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


def _sample_from_starts(model, x, sigmas, extra_args=None, callback=None, disable=None, *, values: torch.Tensor,
                        jumped: np.ndarray, starts: np.ndarray, sampler, tally: Evaluations):
    """k-diffusion sampler: x is every item's key-step state; `jumped` items continue from `values` at their start."""
    base = model.inner_model.inner_model
    states = x.clone()
    for step in sorted(set(int(s) for s in starts[jumped])):
        rows = torch.from_numpy(np.flatnonzero(jumped & (starts == step))).to(x.device)
        states[rows] = cs.from_latent_space(base, sigmas[step], values[rows.cpu()].to(x))
    return resume_items(model, states, starts, sigmas, extra_args or {}, callback, disable, sampler, tally)


def resume_from(kb: KnowledgeBase, plan: ReDiPlan, key_latent: torch.Tensor, value_latent: torch.Tensor,
                accepted: np.ndarray, guider, seeds: Sequence[int], callback: Callable | None = None
                ) -> tuple[torch.Tensor, np.ndarray, Evaluations]:
    """Lines 9-11 outside a sampler run: accepted items continue from their value at v, the others from x_k.

    Returns (latent, start step per item, evaluations).
    """
    sigmas = torch.tensor(kb.settings.sigmas, dtype=torch.float32)[plan.key_step:]
    start = np.where(accepted, plan.value_step, plan.key_step).astype(np.int64)
    tally = Evaluations(len(key_latent))
    sampler = comfy.samplers.KSAMPLER(_sample_from_starts, extra_options={
        "values": value_latent.float(), "jumped": np.asarray(accepted, bool), "starts": start - plan.key_step,
        "sampler": comfy.samplers.sampler_object(kb.settings.sampler), "tally": tally})
    with torch.no_grad():
        out = guider.sample(torch.zeros_like(key_latent), key_latent.float(), sampler, sigmas, callback=callback,
                            disable_pbar=True, seed=int(seeds[0]))
    return out.detach().float().cpu(), start, tally


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
    out, start, tally = resume_from(kb, plan, q.latent, value.latent, accepted, guider, q.seeds, callback)
    spent = Evaluations(len(out), {n: q.evaluations.of(n) + tally.of(n)
                                   for n in sorted(set(q.evaluations.per_model) | set(tally.per_model))})
    return ReDiResult(out, plan, accepted, start, value.neighbours.nearest.ids, value.neighbours.nearest.distances, fit.weights,
                      fit.mode, fit.residual, fit.centered_residual, gate, spent, q.warnings, predicted)
