"""The embedded models sampled through the pack's own code: plain runs, ReDi, T-Stitch and knowledge bases.

The one module of embedded/ and benchmarks/ that calls kb_tools' sampling, retrieval and
knowledge-base code (the others use only its plain records and schedule helpers): the demo,
the training evaluation and the benchmarks sample through these functions, so moving them onto
another kb_tools entry point changes this file only. Prompts are captions of the embedded models;
every batch item has its own seed (the noise ComfyUI draws for a batch of one with that seed),
unless a function says otherwise.

Import this module after `embedded.models.setup_comfy()`: kb_tools imports ComfyUI, which reads
its settings (CPU, attention) on first import.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from kb_tools import comfy_sampling as cs
from kb_tools import redi
from kb_tools import retrieval
from kb_tools.kb import KnowledgeBase
from kb_tools.records import Recipe
from kb_tools.redi import GUARD_AUTO, BuildReport, ReDiState, ResumeReport
from kb_tools.tstitch import TStitchResult, tstitch_sample

from .rendering import LATENT_SHAPE
from .text_encoder import condition_embedding, encode

#: A guard threshold no centered residual reaches: every blend is used (the paper has no guard).
GUARD_OFF = 1e9


def conditioning(prompts: Sequence[str]) -> tuple[list, list]:
    """(positive, negative) CONDITIONING of a batch: the prompts, and the unconditional prompt per item."""
    positive = redi.batch_conditioning([encode(p) for p in prompts])
    negative = redi.batch_conditioning([encode("")] * len(prompts))
    return positive, negative


def schedule(model, recipe: Recipe) -> torch.Tensor:
    """The recipe's sigmas [steps + 1] for `model`, as KSampler builds them."""
    return cs.schedule_sigmas(model, recipe.sampler, recipe.scheduler, recipe.steps)


@dataclasses.dataclass
class PlainRun:
    """A plain sampler run of a batch."""

    latent: torch.Tensor               # float32 [B, 3, 16, 16] at the end of the schedule
    records: dict[int, torch.Tensor]   # {step: latent [B, 3, 16, 16]} for the steps asked to record
    evaluations: int                   # model evaluations (one cond + uncond pass each)


def plain(model, prompts: Sequence[str], seeds: Sequence[int], recipe: Recipe, *, record: Sequence[int] = ()) -> PlainRun:
    """The recipe's sampler over the whole schedule from each item's seed; latents at `record` steps kept."""
    latent = torch.zeros((len(prompts), *LATENT_SHAPE))
    positive, negative = conditioning(prompts)
    out, records, evaluations = cs.sample_stitched(
        [cs.Segment(model, positive, negative, 0, recipe.steps)], latent=latent, noise=cs.seeded_noise(latent, seeds),
        cfg=recipe.cfg, sampler_name=recipe.sampler, sigmas=schedule(model, recipe), seed=int(seeds[0]),
        record_steps=list(record))
    return PlainRun(out.float(), records, int(evaluations[0]))


def prompt_switch(model, prompts_before: Sequence[str], prompts_after: Sequence[str], seeds: Sequence[int],
                  recipe: Recipe, switch_step: int) -> torch.Tensor:
    """One plain run that follows `prompts_before` for steps [0, switch_step) and `prompts_after` after."""
    latent = torch.zeros((len(prompts_before), *LATENT_SHAPE))
    before, negative = conditioning(prompts_before)
    after, _ = conditioning(prompts_after)
    segments = [cs.Segment(model, before, negative, 0, switch_step),
                cs.Segment(model, after, negative, switch_step, recipe.steps)]
    out, _, _ = cs.sample_stitched(segments, latent=latent, noise=cs.seeded_noise(latent, seeds), cfg=recipe.cfg,
                                   sampler_name=recipe.sampler, sigmas=schedule(model, recipe), seed=seeds[0])
    return out.float()


def tstitch(small, large, prompts: Sequence[str], seed: int, recipe: Recipe,
            small_fraction: float) -> tuple[torch.Tensor, TStitchResult]:
    """T-Stitch: the small model runs the first `small_fraction` of the steps, the large one the rest.

    The whole batch draws its noise from the one `seed` (ComfyUI's batch noise).
    """
    positive, negative = conditioning(prompts)
    out, result = tstitch_sample(small, large, small_positive=positive, small_negative=negative,
                                 large_positive=positive, large_negative=negative,
                                 latent={"samples": torch.zeros((len(prompts), *LATENT_SHAPE))}, seed=seed,
                                 sampler_name=recipe.sampler, scheduler=recipe.scheduler, steps=recipe.steps,
                                 cfg=recipe.cfg, small_fraction=small_fraction)
    return out["samples"].float(), result


# --------------------------------------------------------------------------- knowledge bases

def build_kb(path: str | Path, model, prompts: Sequence[str], seeds: Sequence[int], recipe: Recipe,
             store_steps: Sequence[int], *, batch_size: int, commit_every: int,
             progress: Callable[[int, int], None] | None = None) -> BuildReport:
    """Build (or resume) the knowledge base of prompts x seeds at `path` (float32, flat index)."""
    spec = redi.BuildSpec(prompts=list(prompts), seeds=list(seeds), sampler=recipe.sampler, scheduler=recipe.scheduler,
                          steps=recipe.steps, cfg=recipe.cfg, store_steps=list(store_steps), latent_shape=LATENT_SHAPE,
                          batch_size=batch_size, dtype="float32", commit_every=commit_every)
    return redi.build_knowledge_base(str(path), model, encode, spec, progress=progress)


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


# --------------------------------------------------------------------------- ReDi (Algorithm 2, step by step)

def redi_partial(kb: KnowledgeBase, model, prompts: Sequence[str], seeds: Sequence[int], key_step: int) -> ReDiState:
    """Sample steps [0, k) of the KB's recipe: the query x_k of each item."""
    positive, negative = conditioning(prompts)
    zeros = torch.zeros((len(prompts), *LATENT_SHAPE))
    return redi.partial_sample(kb, model, positive, negative, zeros, list(seeds), key_step)


def redi_retrieve(state: ReDiState, h: int) -> ReDiState:
    """The top-h trajectory keys of each query and their least-squares weights."""
    return redi.retrieve_neighbours(state, h)


def redi_blend(state: ReDiState, value_step: int, mode: str = "lstsq") -> tuple[torch.Tensor, ReDiState]:
    """x_v_hat [B, 3, 16, 16] blended from the neighbours' values at v, weights solved in `mode`."""
    return redi.blend_value(state, value_step, mode)


def redi_blend_weights(state: ReDiState, value_step: int, weights: np.ndarray, mode: str) -> tuple[torch.Tensor, ReDiState]:
    """x_v_hat [B, 3, 16, 16] blended from the neighbours' values at v with given weights [B, H] (named `mode`).

    The state keeps the retrieval's residuals (the given weights were not fit to the keys).
    """
    kb, ids = state.kb, state.neighbours.ids
    values = kb.latents(value_step, ids.reshape(-1)).reshape(*ids.shape, *kb.latent_shape)
    blended = torch.from_numpy(np.stack([retrieval.blend(v, w) for v, w in zip(values, weights)]).astype(np.float32))
    return blended, dataclasses.replace(state, value_step=value_step, weight_mode=mode, residual=state.neighbours.residual,
                                        centered_residual=state.neighbours.centered_residual)


def redi_resume(state: ReDiState, blended: torch.Tensor, model, prompts: Sequence[str], h: int,
                threshold: float = GUARD_AUTO) -> ResumeReport:
    """Sample steps [v, T) from the blend; items whose residual exceeds the guard resume from x_k instead."""
    positive, negative = conditioning(prompts)
    return redi.resume_sample(state, blended, model, positive, negative, h=h, threshold=threshold)


def redi_sample(kb: KnowledgeBase, model, prompts: Sequence[str], seeds: Sequence[int], *, key_step: int,
                value_step: int, h: int, mode: str = "lstsq",
                threshold: float = GUARD_AUTO) -> tuple[ResumeReport, ReDiState]:
    """ReDi end to end (sample to k, retrieve H, blend at v, guarded resume): (report, state after the blend)."""
    state = redi_retrieve(redi_partial(kb, model, prompts, seeds, key_step), h)
    blended, state = redi_blend(state, value_step, mode)
    return redi_resume(state, blended, model, prompts, h, threshold), state


def condition_key_neighbours(state: ReDiState, h: int, query_prompts: Sequence[str]) -> ReDiState:
    """Top-h KB entries by nearest CONDITION embedding (a NIRVANA / CLIP-style key), weights fit in that space."""
    kb = state.kb
    emb_kb = condition_embedding([p for p, _ in kb.entries]).astype(np.float64)
    emb_q = condition_embedding(query_prompts).astype(np.float64)
    d2 = (emb_q ** 2).sum(1)[:, None] + (emb_kb ** 2).sum(1)[None] - 2 * emb_q @ emb_kb.T
    ids = np.argsort(d2, axis=1)[:, :h]
    dist = np.sqrt(np.maximum(np.take_along_axis(d2, ids, 1), 0))
    keys = emb_kb[ids]
    mean = emb_kb.mean(0)
    spread = float(np.sqrt(np.mean(np.sum((emb_kb - mean) ** 2, axis=1))))
    w = np.stack([retrieval.solve_weights(q, k) for q, k in zip(emb_q, keys)])
    rel = np.array([retrieval.relative_residual(q, k, wi) for q, k, wi in zip(emb_q, keys, w)])
    cen = np.array([retrieval.centered_residual(q, k, wi, spread) for q, k, wi in zip(emb_q, keys, w)])
    nb = retrieval.Neighbours(state.key_step, ids.astype(np.int64), dist.astype(np.float32), emb_q.astype(np.float32),
                              keys.astype(np.float32), mean.astype(np.float32), spread, w, rel, cen)
    return dataclasses.replace(state, neighbours=nb)


def neighbour_lstsq_weights(state: ReDiState) -> np.ndarray:
    """Least-squares weights [B, H] of each query over its neighbours' keys, in the space they were retrieved in."""
    return np.stack([retrieval.solve_weights(q, k) for q, k in zip(state.neighbours.query, state.neighbours.keys)])


def trajectory_residual(state: ReDiState, ids: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Theorem 5.3's observable term for any neighbours: ||x_k - sum w key_k|| per item (relative, centered)."""
    kb = state.kb
    q = state.query.numpy().reshape(len(ids), -1).astype(np.float64)
    keys = kb.keys_flat(state.key_step, ids.reshape(-1)).reshape(len(ids), ids.shape[1], -1).astype(np.float64)
    spread = retrieval.key_spread(kb, state.key_step)
    rel = np.array([retrieval.relative_residual(qi, ki, wi) for qi, ki, wi in zip(q, keys, weights)])
    cen = np.array([retrieval.centered_residual(qi, ki, wi, spread) for qi, ki, wi in zip(q, keys, weights)])
    return rel, cen
