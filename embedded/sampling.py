"""The embedded models sampled through the pack's own code: plain runs, ReDi, T-Stitch and knowledge bases.

The one module of embedded/ and benchmarks/ that calls kb_tools' sampling, retrieval and
knowledge-base code (the others use only its plain records and schedule helpers, and the
typed values these functions return). Each function is the kb_tools entry point a node or
the offline command uses, given the embedded text encoder and latent shape:
- plain runs: `kb_tools.comfy.plain.sample_prompts` (and `sample_counted` for the prompt switch);
- ReDi: `kb_tools.samplers.redi_chain.generate` (Algorithm 2 in one sampler run, the ReDiSampler node; with a
  learning KB `generate_learning`) or,
  to sweep H and v on one query, its documented parts `sample_to_key` -> `find_neighbours` ->
  `blend_at` -> `resume` (the four-node chain);
- T-Stitch: `kb_tools.samplers.tstitch.tstitch_sample` (the TStitchSampler node);
- the KB-corrected coarse Euler solver: `kb_tools.samplers.corrected.generate` (the SamplerReDiCorrected node),
  and against a learning KB `kb_tools.samplers.learning.generate_learning_corrected`;
- knowledge bases: `kb_tools.build.builder.build_knowledge_base` and `retrieval.calibrate` (what
  `python -m kb_tools calibrate` stores for the auto guard), `kb_tools.calibrate_sampler` (the sampler calibration);
- a run over given sigmas with a sampler name or a calibrated choice (`sample_on`, what ReDiCalibratedSampler runs).
Every batch item has its own seed (the noise ComfyUI draws for a batch of one with that seed).

Import this module after `embedded.models.setup_comfy()`: kb_tools imports ComfyUI, which reads
its settings (CPU, attention) on first import.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

import kb_tools as redi  # the public names: generate, make_run, generate_learning, sample_to_key, resume, ...
from kb_tools.comfy.counted import resume_from
from kb_tools.samplers import corrected as corrected_solver
from kb_tools.samplers import learning as learning_corrected
from kb_tools.calibration.blend_error import fit_error_model, measure_blend_errors, store_error_model
from kb_tools.calibration.plain_reference import fit_plain_reference, store_plain_reference
from kb_tools.calibration.reference_runs import DEFAULT_ITEMS, measure_reference
from kb_tools.build.builder import BuildReport, BuildSpec, build_knowledge_base
from kb_tools.comfy.model_facts import schedule_sigmas
from kb_tools.calibration.guard import GUARD_AUTO
from kb_tools.comfy.guiders import SwitchGuider
from kb_tools.store import KBBudget, KBSettings, KnowledgeBase
from kb_tools.comfy.plain import PlainSamples, batch_conditioning, cfg_guider, sample_prompts
from kb_tools.comfy.counted import sample_counted
from kb_tools.core.records import Recipe
from kb_tools.samplers.learning import LearningResult
from kb_tools.samplers.redi_chain import BlendedValue, KeyQuery, blend_at, find_neighbours  # noqa: F401 - line 6 and 7-8, for callers
from kb_tools.samplers.result import ReDiResult
from kb_tools.store.retrieval import blend_entries  # noqa: F401 - line 8 for any ids and weights, for callers
from kb_tools.calibration.residuals import calibrate
from kb_tools.core.weights import centered_residual, fit_weights, relative_residual
from kb_tools.core.schedule import Switch, plan_redi
from kb_tools.samplers.tstitch import TStitchResult, tstitch_sample

from .rendering import LATENT_SHAPE
from .text_encoder import condition_embedding, encode

#: A guard threshold no centered residual reaches: every blend is used (the paper has no guard).
GUARD_OFF = 1e9


def conditioning(prompts: Sequence[str]) -> tuple[list, list]:
    """(positive, negative) CONDITIONING of a batch: the prompts, and the unconditional prompt per item."""
    positive = batch_conditioning([encode(p) for p in prompts])
    negative = batch_conditioning([encode("")] * len(prompts))
    return positive, negative


def empty_latents(n: int) -> torch.Tensor:
    """The empty LATENT [n, 3, 16, 16] every run starts from (what EmptyLatentImage gives)."""
    return torch.zeros((n, *LATENT_SHAPE))


def plain(model, prompts: Sequence[str], seeds: Sequence[int], recipe: Recipe, *,
          record: Sequence[int] = ()) -> PlainSamples:
    """The recipe's sampler over the whole schedule, item i from seeds[i], one batch; latents at `record` steps kept."""
    return sample_prompts(model, encode, prompts, seeds, recipe, latent_shape=LATENT_SHAPE, batch_size=len(prompts),
                          keep_steps=record)


def prompt_switch(model, prompts_before: Sequence[str], prompts_after: Sequence[str], seeds: Sequence[int],
                  recipe: Recipe, switch_step: int) -> torch.Tensor:
    """One plain run that follows `prompts_before` for steps [0, switch_step) and `prompts_after` after."""
    before, negative = conditioning(prompts_before)
    after, _ = conditioning(prompts_after)
    guider = SwitchGuider(cfg_guider(model, before, negative, recipe.cfg), cfg_guider(model, after, negative, recipe.cfg),
                          Switch("step", switch_step), names=("model", "model"))
    sigmas = schedule_sigmas(model, recipe.sampler, recipe.scheduler, recipe.steps)
    out, _, _ = sample_counted(guider, empty_latents(len(prompts_before)), seeds, sigmas, recipe.sampler)
    return out


def tstitch(small, large, prompts: Sequence[str], seeds: Sequence[int], recipe: Recipe,
            small_fraction: float) -> tuple[torch.Tensor, TStitchResult]:
    """T-Stitch in one sampler run: the small model runs the first `small_fraction` of the steps, the large one the rest."""
    positive, negative = conditioning(prompts)
    out, result = tstitch_sample(small, large, small_positive=positive, small_negative=negative,
                                 large_positive=positive, large_negative=negative,
                                 latent={"samples": empty_latents(len(prompts))}, seed=int(seeds[0]), seeds=list(seeds),
                                 sampler_name=recipe.sampler, scheduler=recipe.scheduler, steps=recipe.steps,
                                 cfg=recipe.cfg, small_fraction=small_fraction)
    return out["samples"].float(), result


def sample_on(model, prompts: Sequence[str], seeds: Sequence[int], sigmas: torch.Tensor, cfg: float,
              sampler) -> tuple[torch.Tensor, np.ndarray]:
    """(latents [N, C, H, W], counted evaluations per item [N]) of one run over exactly `sigmas`.

    sampler: a ComfyUI sampler name, or a CalibratedChoice (its KSAMPLER, what ReDiCalibratedSampler runs).
    """
    positive, negative = conditioning(prompts)
    guider = cfg_guider(model, positive, negative, cfg)
    sigmas = torch.as_tensor(sigmas).float()
    if not isinstance(sampler, str) and sampler.kind == "builtin":
        sampler = sampler.sampler_name  # the built-in sampler on the choice's sigmas, counted like any plain run
    if isinstance(sampler, str):
        out, _, tally = sample_counted(guider, empty_latents(len(prompts)), seeds, sigmas, sampler)
        return out, tally.per_item()
    tally = redi.Evaluations(len(prompts))
    latent = empty_latents(len(prompts))
    with torch.no_grad():
        out = guider.sample(redi.seeded_noise(latent, seeds), latent, sampler.ksampler(tally), sigmas, disable_pbar=True,
                            seed=int(seeds[0]))
    return out.detach().float().cpu(), tally.per_item()


# --------------------------------------------------------------------------- knowledge bases

def build_kb(path: str | Path, model, prompts: Sequence[str], seeds: Sequence[int], recipe: Recipe,
             store_steps: Sequence[int], *, batch_size: int, commit_every: int,
             progress: Callable[[int, int], None] | None = None) -> BuildReport:
    """Build (or resume) the knowledge base of prompts x seeds at `path` (float32, flat index)."""
    spec = BuildSpec(prompts=list(prompts), seeds=list(seeds), recipe=recipe, store_steps=list(store_steps),
                     latent_shape=LATENT_SHAPE, batch_size=batch_size, dtype="float32", commit_every=commit_every)
    return build_knowledge_base(str(path), model, encode, spec, progress=progress)


def calibrate_guard(kb: KnowledgeBase, key_step: int, h: int, *, sample: int = 256) -> dict:
    """Store the auto guard's calibration and the blend-error model for key step and H (`python -m kb_tools calibrate`).

    The guard never calibrates during a generation: without a stored calibration GUARD_AUTO
    uses the documented fallback threshold.
    """
    result = calibrate(kb, key_step, h, sample=sample)
    kb.set_calibration(key_step, result)
    if any(s > key_step for s in kb.stored_steps):  # the error model needs a value step after the key step
        store_error_model(kb, key_step, fit_error_model(measure_blend_errors(kb, key_step, h, sample=sample)))
    return result


def calibrate_plain_reference(kb: KnowledgeBase, model, key_step: int, h: int, *, sample: int = 256,
                              items: int = DEFAULT_ITEMS) -> dict:
    """Store the plain reference for key step and H (`python -m kb_tools calibrate ... --ckpt`): the error guard's "plain" tolerance."""
    measured = measure_blend_errors(kb, key_step, h, sample=sample)
    reference = fit_plain_reference(measure_reference(kb, model, encode, measured, items=items))
    store_plain_reference(kb, key_step, reference)
    return reference


def calibrated_sampler(kb: KnowledgeBase, model, *, nfe: int, cfg: float, teachers: int, fine_steps: int = 100,
                       search_sweeps: int = 2, progress: Callable[[int, int], None] | None = None):
    """(SamplerCalibration, reused) for `nfe` at `cfg`: the one stored with the KB, else calibrated on `teachers` of its
    entries and stored (`kb_tools.calibrate_sampler`, the ReDiCalibrateSampler node)."""
    try:
        calibration = redi.load_sampler_calibration(kb)
        calibration.choice(model, cfg, LATENT_SHAPE, nfe)
        return calibration, True
    except redi.KBError:
        pass
    # The common built-in grid (ReDiCalibrateSampler's 'common choices'): the full grid's held-out check would make the
    # demo several times longer on a CPU.
    return redi.calibrate_sampler(kb, model, encode, nfe=(int(nfe),), cfgs=(float(cfg),), teachers=int(teachers),
                                  fine_steps=int(fine_steps), search_sweeps=int(search_sweeps),
                                  samplers=redi.COMMON_SAMPLERS, schedules=redi.COMMON_SCHEDULES,
                                  progress=progress), False


def kb_subset(kb: KnowledgeBase, path: str | Path, ids: np.ndarray) -> KnowledgeBase:
    """A new knowledge base at `path` holding the entries `ids` of `kb` (same settings, every stored step)."""
    sub = KnowledgeBase.create(str(path), kb.settings, dtype=kb.dtype)
    entries = kb.entries
    sub.append({s: kb.latents(s, ids) for s in kb.stored_steps}, [entries[i][0] for i in ids],
               [entries[i][1] for i in ids])
    return sub


def foreign_seeds(kb: KnowledgeBase, n: int, base: int) -> tuple[list[int], list[str]]:
    """Seeds base .. base + n - 1 and the warnings a query gets where the KB never saw them."""
    return redi.query_seeds(kb, n, "custom", base)


# --------------------------------------------------------------------------- ReDi

def redi_sample(kb: KnowledgeBase, model, prompts: Sequence[str], seeds: Sequence[int], *, key_step: int,
                value_step: int, h: int, mode: str = "lstsq", guard: float = GUARD_AUTO,
                resume_prompts: Sequence[str] | None = None, tolerance: float | None = None,
                adaptive: bool = False) -> ReDiResult:
    """ReDi end to end, Algorithm 2 in one sampler run (`kb_tools.samplers.redi_chain.generate`, the ReDiSampler node).

    resume_prompts: stylization, the key from `prompts` and the steps after the key step from these.
    tolerance / adaptive: the error guard and the adaptive skip instead of the residual guard (`make_run`).
    """
    positive, negative = conditioning(prompts)
    styled = conditioning(resume_prompts)[0] if resume_prompts is not None else None
    run = redi.make_run(kb, key_step, value_step, h, mode, guard, tolerance, adaptive)
    return redi.generate(kb, model, positive, negative, empty_latents(len(prompts)), seeds, run, resume_positive=styled)


def corrected_sample(kb: KnowledgeBase, model, prompts: Sequence[str], seeds: Sequence[int], grid: Sequence[int], *,
                     h: int = 3, mode: str = "lstsq", correct: bool = True) -> tuple[torch.Tensor, corrected_solver.CorrectedRun]:
    """Euler on the coarse `grid` of the KB's schedule, each segment the KB stores corrected by its neighbours'
    blended truncation error (`correct` False: the same grid uncorrected, the plain baseline). Returns (latents, run)."""
    positive, negative = conditioning(prompts)
    run = corrected_solver.make_corrected_run(kb, grid, h, mode)
    if not correct:
        run.corrected = ()
    out = corrected_solver.generate(kb, model, positive, negative, empty_latents(len(prompts)), seeds, run)
    return out, run


def learning_settings(model, recipe: Recipe, store_steps: Sequence[int]) -> KBSettings:
    """The settings of a learning KB of the embedded model for `recipe` (`kb_tools.samplers.redi_chain.learning_settings`)."""
    return redi.learning_settings(model, recipe, store_steps, LATENT_SHAPE)


def redi_learning(path: str | Path, settings: KBSettings, model, prompts: Sequence[str], seeds: Sequence[int], *,
                  key_step: int, value_step: int, h: int, guard: float = GUARD_AUTO, tolerance: float | None = None,
                  adaptive: bool = False, budget: KBBudget | None = None) -> LearningResult:
    """One generation against the learning KB at `path`, then learning what was sampled in full
    (`kb_tools.samplers.redi_chain.generate_learning`, the ReDiLearningSampler node)."""
    positive, negative = conditioning(prompts)
    return redi.generate_learning(str(path), settings, model, positive, negative, empty_latents(len(prompts)),
                                  list(prompts), list(seeds), key_step=key_step, value_step=value_step, neighbours=h,
                                  guard=guard, tolerance=tolerance, adaptive=adaptive, budget=budget or KBBudget())


def corrected_learning(path: str | Path, settings: KBSettings, model, prompts: Sequence[str], seeds: Sequence[int], *,
                       nfe: int, h: int, guard: float = GUARD_AUTO, budget: KBBudget | None = None
                       ) -> learning_corrected.LearningCorrectedResult:
    """One generation against the learning KB at `path` with the KB-corrected solver at `nfe` where the KB fits,
    in full (and learned) elsewhere (`kb_tools.samplers.learning.generate_learning_corrected`)."""
    positive, negative = conditioning(prompts)
    return learning_corrected.generate_learning_corrected(
        str(path), settings, model, positive, negative, empty_latents(len(prompts)), list(prompts), list(seeds), nfe=nfe,
        neighbours=h, guard=guard, budget=budget or KBBudget())


def redi_key(kb: KnowledgeBase, model, prompts: Sequence[str], seeds: Sequence[int], key_step: int) -> KeyQuery:
    """Lines 1-5: sample steps [0, k) of the KB's recipe, the query x_k of each item (ReDiPartialSample)."""
    positive, negative = conditioning(prompts)
    return redi.sample_to_key(kb, model, positive, negative, empty_latents(len(prompts)), seeds, key_step)


def redi_resume(value: BlendedValue, model, prompts: Sequence[str], guard: float = GUARD_AUTO) -> ReDiResult:
    """The guard and lines 9-11: accepted items resume from the blend at v, the others from x_k (ReDiResumeSample)."""
    positive, negative = conditioning(prompts)
    return redi.resume(value, model, positive, negative, guard)


def resume_blend(query: KeyQuery, model, prompts: Sequence[str], value_step: int, value: np.ndarray) -> torch.Tensor:
    """Lines 9-11 from any blend x_v_hat [B, 3, 16, 16] (`retrieval.blend_entries`): every item resumes at v."""
    kb = query.kb
    positive, negative = conditioning(prompts)
    plan = plan_redi(kb.settings.steps, query.key_step, value_step, kb.settings.stored_steps)
    out, _ = resume_from(cfg_guider(model, positive, negative, kb.settings.cfg), torch.tensor(kb.settings.sigmas, dtype=torch.float32),
                         kb.settings.sampler, plan.key_step, np.full(len(prompts), plan.value_step), query.latent,
                         torch.from_numpy(value), query.seeds)
    return out


def condition_key_neighbours(kb: KnowledgeBase, query_prompts: Sequence[str], h: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-h KB entries by nearest CONDITION embedding (a NIRVANA / CLIP-style key) and their least-squares
    weights in that space: (ids int64 [B, h], weights float64 [B, h])."""
    emb_kb = condition_embedding([p for p, _ in kb.entries]).astype(np.float64)
    emb_q = condition_embedding(query_prompts).astype(np.float64)
    d2 = (emb_q ** 2).sum(1)[:, None] + (emb_kb ** 2).sum(1)[None] - 2 * emb_q @ emb_kb.T
    ids = np.argsort(d2, axis=1)[:, :h].astype(np.int64)
    return ids, fit_weights(emb_q, emb_kb[ids], 1.0, "lstsq").weights


def trajectory_residual(query: KeyQuery, ids: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Theorem 5.3's observable term for any neighbours: ||x_k - sum w key_k|| per item (relative, centered)."""
    kb, k = query.kb, query.key_step
    keys = kb.keys_flat(k, ids.reshape(-1)).reshape(len(ids), ids.shape[1], -1)
    spread = kb.key_spread(k)
    rel = np.array([relative_residual(q, ki, wi) for q, ki, wi in zip(query.query, keys, weights)])
    cen = np.array([centered_residual(q, ki, wi, spread) for q, ki, wi in zip(query.query, keys, weights)])
    return rel, cen
