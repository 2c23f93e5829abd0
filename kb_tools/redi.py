"""ReDi on a ComfyUI model: build a knowledge base, sample to the key step, resume from a value.

Paper: "ReDi: Efficient Learning-Free Diffusion Inference via Trajectory Retrieval",
Algorithm 1 (building the knowledge base) and Algorithm 2 (inference). The nodes and the
offline command call these functions, so both follow one code path. Retrieval and blending
themselves are plain numpy (`retrieval.py`); this module feeds them and runs the sampler.

Shapes: latents are [B, C, H, W] float32 tensors in ComfyUI's LATENT-dict space (see
`comfy_sampling`); B is the batch, one retrieval per item.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np
import torch

from . import comfy_sampling as cs
from .errors import KBError, KBMismatchError
from .kb import KBSettings, KnowledgeBase, open_or_create
from .retrieval import Neighbours, blend_values, calibrate, retrieve
from .schedule import plan_redi

log = cs.log

#: Guard threshold used when a KB is too small to calibrate one (centered residual).
FALLBACK_GUARD = 0.5
MIN_CALIBRATION_ENTRIES = 16
GUARD_AUTO = -1.0


# --------------------------------------------------------------------------- build (Algorithm 1)

@dataclass
class BuildSpec:
    """What to put in a knowledge base: prompts x seeds, sampled with one fixed recipe."""

    prompts: list[str]
    seeds: list[int]
    sampler: str
    scheduler: str
    steps: int
    cfg: float
    store_steps: list[int]
    latent_shape: tuple[int, int, int]
    negative_prompt: str = ""
    batch_size: int = 4
    dtype: str = "float16"
    index_type: str = "auto"
    #: T-Stitch keys: the key model runs steps [0, stitch_step), the main model the rest.
    stitch_step: int = 0
    #: entries gathered in memory before one atomic commit (a crash loses at most these).
    commit_every: int = 64


@dataclass
class BuildReport:
    kb: KnowledgeBase
    added: int
    already_present: int
    evaluations: int
    key_model_evaluations: int
    seconds: float

    def summary(self) -> str:
        return (f"ReDi KB {self.kb.path}: added {self.added} trajectories ({self.already_present} were already there), "
                f"{len(self.kb)} in total, {self.seconds:.1f} s")


def kb_settings_for(model, spec: BuildSpec, sigmas: torch.Tensor, key_model=None) -> KBSettings:
    """The KB manifest settings a query with this model and recipe must match."""
    if not spec.seeds:
        raise KBError("give at least one seed: every trajectory starts from the noise of a seed.")
    return KBSettings(
        model_fingerprint=cs.model_fingerprint(model),
        key_model_fingerprint=cs.model_fingerprint(key_model) if key_model is not None and spec.stitch_step > 0 else None,
        latent_shape=tuple(int(v) for v in spec.latent_shape),
        sampling_type=cs.sampling_type(model),
        sampler=spec.sampler,
        scheduler=spec.scheduler,
        steps=int(spec.steps),
        cfg=float(spec.cfg),
        denoise=1.0,
        stored_steps=sorted(int(s) for s in spec.store_steps),
        sigmas=[float(s) for s in sigmas],
        seed_policy="fixed" if len(set(spec.seeds)) == 1 else "per_entry",
        negative_prompt=spec.negative_prompt,
        extra={"stitch_step": int(spec.stitch_step)},
    )


def batch_conditioning(conds: Sequence[list]) -> list:
    """Stack per-prompt CONDITIONING (one entry each) into one CONDITIONING of batch len(conds)."""
    first = conds[0]
    if any(len(c) != len(first) for c in conds):
        raise KBError("prompts produced conditionings of different structure; build with batch size 1.")
    out = []
    for parts in zip(*conds):
        tensors = [p[0] for p in parts]
        if any(t.shape[1:] != tensors[0].shape[1:] for t in tensors):
            return []  # different token lengths: caller samples one by one
        extras = dict(parts[0][1])
        pooled = [p[1].get("pooled_output") for p in parts]
        if all(isinstance(p, torch.Tensor) for p in pooled):
            extras["pooled_output"] = torch.cat(pooled, dim=0)
        out.append([torch.cat(tensors, dim=0), extras])
    return out


def build_knowledge_base(kb_path: str, model, encode: Callable[[str], list], spec: BuildSpec, *,
                         key_model=None, key_encode: Callable[[str], list] | None = None,
                         progress: Callable[[int, int], None] | None = None,
                         check_interrupt: Callable[[], None] | None = None) -> BuildReport:
    """Sample every missing (prompt, seed) trajectory and append its stored steps (paper Algorithm 1).

    Resumable: pairs already in the KB are skipped, so rerunning an interrupted build adds only
    what is missing. Entries are committed atomically every `commit_every` trajectories, and the
    pending ones are committed before an interruption propagates.
    """
    start = time.perf_counter()
    if spec.stitch_step and key_model is None:
        raise KBError("stitch_step > 0 needs a key (small) model to run the early steps.")
    sigmas = cs.schedule_sigmas(model, spec.sampler, spec.scheduler, spec.steps)
    plan_redi(spec.steps, min(spec.store_steps), max(spec.store_steps))  # range check
    if key_model is not None and spec.stitch_step:
        from .tstitch import check_stitch_compatible
        check_stitch_compatible(cs.model_signature(key_model), cs.model_signature(model), None, None)
    settings = kb_settings_for(model, spec, sigmas, key_model)
    kb = open_or_create(kb_path, settings, dtype=spec.dtype, index_type=spec.index_type)
    pairs = [(p, int(s)) for p in spec.prompts for s in spec.seeds]
    todo = kb.missing(pairs)
    already = len(pairs) - len(todo)
    negative = encode(spec.negative_prompt)
    key_encode = key_encode or encode
    key_negative = key_encode(spec.negative_prompt) if key_model is not None else None
    c, h, w = settings.latent_shape
    stop = max(settings.stored_steps) + 1  # the sampler evaluates the model at every stored step
    pending: dict[str, list] = {"latents": [], "prompts": [], "seeds": []}
    evaluations = key_evaluations = done = 0

    def commit() -> None:
        if pending["prompts"]:
            stacked = {s: torch.cat([lat[s] for lat in pending["latents"]]) for s in settings.stored_steps}
            kb.append(stacked, pending["prompts"], pending["seeds"])
            for v in pending.values():
                v.clear()

    try:
        for b in range(0, len(todo), max(1, spec.batch_size)):
            if check_interrupt is not None:
                check_interrupt()
            chunk = todo[b:b + spec.batch_size]
            conds = [encode(p) for p, _ in chunk]
            groups = [(chunk, batch_conditioning(conds))]
            if not groups[0][1]:  # prompts of different token lengths: one at a time
                groups = [([pair], cond) for pair, cond in zip(chunk, conds)]
            for group, positive in groups:
                # Sample only as far as the last stored step: the rest of the trajectory is never stored.
                segments = [cs.Segment(model, positive, negative, min(spec.stitch_step, stop), stop)]
                if spec.stitch_step:
                    key_positive = batch_conditioning([key_encode(p) for p, _ in group])
                    segments.insert(0, cs.Segment(key_model, key_positive, key_negative, 0, min(spec.stitch_step, stop)))
                latent = torch.zeros((len(group), c, h, w))
                _, records, evals = cs.sample_stitched(
                    segments, latent=latent, noise=cs.seeded_noise(latent, [s for _, s in group]), cfg=spec.cfg,
                    sampler_name=spec.sampler, sigmas=sigmas, seed=int(group[0][1]), record_steps=settings.stored_steps)
                evaluations += evals[-1] * len(group)
                key_evaluations += (evals[0] if len(evals) > 1 else 0) * len(group)
                pending["latents"].append(records)
                pending["prompts"].extend(p for p, _ in group)
                pending["seeds"].extend(s for _, s in group)
                done += len(group)
            if len(pending["prompts"]) >= spec.commit_every:
                commit()
            if progress is not None:
                progress(done, len(todo))
    finally:
        # Whatever was sampled is kept, also when the run is interrupted or fails later.
        commit()
    return BuildReport(kb, done, already, evaluations, key_evaluations, time.perf_counter() - start)


# --------------------------------------------------------------------------- query (Algorithm 2)

@dataclass
class ReDiState:
    """What a ReDi query carries from the partial run to the resume (travels in the LATENT dict)."""

    kb: KnowledgeBase
    key_step: int
    seeds: list[int]
    query: torch.Tensor  # [B, C, H, W] latent at the key step
    warnings: list[str] = field(default_factory=list)
    key_model_evaluations: int = 0
    main_model_evaluations: int = 0
    neighbours: Neighbours | None = None
    value_step: int | None = None
    weight_mode: str | None = None
    residual: np.ndarray | None = None
    centered_residual: np.ndarray | None = None

    @property
    def settings(self) -> KBSettings:
        return self.kb.settings

    @property
    def sigmas(self) -> torch.Tensor:
        return torch.tensor(self.kb.settings.sigmas, dtype=torch.float32)


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


def check_query_model(kb: KnowledgeBase, model, latent: torch.Tensor, key_model=None) -> list[str]:
    """Refuse a model or latent size the KB was not built for; return warnings (LoRA etc.)."""
    s = kb.settings
    if cs.sampling_type(model) != s.sampling_type:
        raise KBMismatchError(f"sampling type: knowledge base has {s.sampling_type!r}, connected model has {cs.sampling_type(model)!r}. Connect the model the KB was built with.")
    warnings = cs.check_model_matches(s.model_fingerprint, model)
    if s.key_model_fingerprint is not None:
        if key_model is None:
            raise KBMismatchError(
                f"this knowledge base's keys were made by a small (T-Stitch) model for the first {s.extra.get('stitch_step')} steps; "
                "connect that model to the small_model input, or use a KB built without one."
            )
        warnings += cs.check_model_matches(s.key_model_fingerprint, key_model, what="small model")
    shape = tuple(latent.shape[1:])
    if shape != tuple(s.latent_shape):
        raise KBMismatchError(
            f"latent size: knowledge base has {list(s.latent_shape)} (C, H, W), the input latent is {list(shape)}. "
            f"Use an empty latent of {s.latent_shape[2] * 8}x{s.latent_shape[1] * 8} pixels (for 8x-downscaling VAEs) or a KB built for this size."
        )
    return warnings


def check_recipe(kb: KnowledgeBase, sampler: str | None = None, scheduler: str | None = None,
                 steps: int | None = None, cfg: float | None = None) -> None:
    """A recipe override must agree with the KB, which is the single source of truth."""
    s = kb.settings
    diffs = []
    for name, value, stored in (("sampler", sampler, s.sampler), ("scheduler", scheduler, s.scheduler), ("steps", steps, s.steps)):
        if value is not None and value != stored:
            diffs.append(f"{name}: knowledge base has {stored!r}, override asks for {value!r}")
    if cfg is not None and not math.isclose(cfg, s.cfg, rel_tol=1e-6):
        diffs.append(f"cfg: knowledge base has {s.cfg}, override asks for {cfg}")
    if diffs:
        raise KBMismatchError("; ".join(diffs) + ". Clear the override (sampler, scheduler, steps and cfg come from the knowledge base), or build a KB with those settings.")


def partial_sample(kb: KnowledgeBase, model, positive, negative, latent: torch.Tensor, seeds: list[int], key_step: int, *,
                   key_model=None, key_positive=None, key_negative=None, callback=None) -> ReDiState:
    """Sample steps [0, k) and return the query x_k (paper Algorithm 2, lines 1-4)."""
    s = kb.settings
    plan_redi(s.steps, key_step, key_step, s.stored_steps)
    warnings = check_query_model(kb, model, latent, key_model)
    stitch = int(s.extra.get("stitch_step", 0)) if s.key_model_fingerprint is not None else 0
    segments = [cs.Segment(model, positive, negative, min(stitch, key_step), key_step)]
    if stitch:
        segments.insert(0, cs.Segment(key_model, key_positive if key_positive is not None else positive,
                                      key_negative if key_negative is not None else negative, 0, min(stitch, key_step)))
    sigmas = torch.tensor(s.sigmas, dtype=torch.float32)
    query, _, evals = cs.sample_stitched(segments, latent=latent, noise=cs.seeded_noise(latent, seeds), cfg=s.cfg,
                                         sampler_name=s.sampler, sigmas=sigmas, seed=int(seeds[0]), callback=callback)
    return ReDiState(kb=kb, key_step=key_step, seeds=list(seeds), query=query.float(), warnings=warnings,
                     key_model_evaluations=evals[0] if stitch else 0, main_model_evaluations=evals[-1])


def retrieve_neighbours(state: ReDiState, h: int) -> ReDiState:
    """Top-H keys for each query and their least-squares weights (Algorithm 2, lines 5-6)."""
    neighbours = retrieve(state.kb, state.query.numpy(), state.key_step, h)
    return replace(state, neighbours=neighbours)


def blend_value(state: ReDiState, value_step: int, mode: str = "lstsq") -> tuple[torch.Tensor, ReDiState]:
    """x_v_hat = sum_i w_i value_i (Algorithm 2, line 7); returns the blended latent and the state."""
    if state.neighbours is None:
        raise KBError("no neighbours to blend: connect ReDiRetrieve's output to ReDiBlend.")
    plan_redi(state.settings.steps, state.key_step, value_step, state.settings.stored_steps)
    latent, _weights, residual, centered = blend_values(state.kb, state.neighbours, value_step, mode=mode)
    return torch.from_numpy(np.ascontiguousarray(latent)).float(), replace(
        state, value_step=value_step, weight_mode=mode, residual=residual, centered_residual=centered)


_CALIBRATION_CACHE: dict[tuple, float] = {}


def guard_threshold(kb: KnowledgeBase, key_step: int, h: int, threshold: float) -> float:
    """The centered-residual threshold: given, or (auto) the KB's leave-one-out 95th percentile.

    Auto is capped at 1.0: a fit no better than the KB's mean key is no match at all. KBs too
    small to calibrate (fewer than MIN_CALIBRATION_ENTRIES) use FALLBACK_GUARD.
    """
    if threshold >= 0:
        return float(threshold)
    stored = kb.calibration(key_step)
    if stored and stored.get("h") == h and "centered_p95" in stored:
        return min(1.0, float(stored["centered_p95"]))
    if len(kb) < max(MIN_CALIBRATION_ENTRIES, h + 2):
        return FALLBACK_GUARD
    key = (kb.path, len(kb), key_step, h)
    if key not in _CALIBRATION_CACHE:
        _CALIBRATION_CACHE[key] = min(1.0, float(calibrate(kb, key_step, h, sample=min(64, len(kb)))["centered_p95"]))
    return _CALIBRATION_CACHE[key]


@dataclass
class ResumeReport:
    latent: torch.Tensor
    accepted: list[bool]
    skipped_steps: int
    evaluations: int
    threshold: float
    centered_residual: list[float]

    def summary(self) -> str:
        """The one line a user can act on."""
        s = self.skipped_steps
        total = len(self.accepted)
        res = ", ".join(f"{r:.3f}" for r in self.centered_residual[:4]) + ("..." if total > 4 else "")
        used = sum(self.accepted)
        if used == total:
            return f"ReDi: skipped {s} steps for all {total} item(s) (residual {res} <= guard {self.threshold:.3f})"
        if used == 0:
            return (f"ReDi: guard fell back to plain sampling for all {total} item(s) (residual {res} > guard {self.threshold:.3f}): "
                    "no stored trajectory is near this query; use a KB seed (seed_mode 'kb'), add similar prompts to the KB, or raise the guard")
        return f"ReDi: skipped {s} steps for {used} of {total} items; the guard sent the rest back to plain sampling (residual {res}, guard {self.threshold:.3f})"


def _take(cond: list, idx: list[int], batch: int) -> list:
    """Select batch items from a CONDITIONING whose tensors carry the full batch."""
    out = []
    for tensor, extras in cond:
        t = tensor[idx] if tensor.shape[0] == batch and batch > 1 else tensor
        extras = dict(extras)
        pooled = extras.get("pooled_output")
        if isinstance(pooled, torch.Tensor) and pooled.shape[0] == batch and batch > 1:
            extras["pooled_output"] = pooled[idx]
        out.append([t, extras])
    return out


def resume_sample(state: ReDiState, blended: torch.Tensor, model, positive, negative, *, h: int | None = None,
                  threshold: float = GUARD_AUTO, callback=None) -> ResumeReport:
    """Sample steps [v, T) from the blended value (Algorithm 2, lines 8-10), guarded.

    Items whose centered residual exceeds the guard continue from their own query latent at
    the key step instead (steps [k, T), nothing skipped), so a bad retrieval never costs quality
    against the plain sampler.
    """
    if state.value_step is None or state.centered_residual is None:
        raise KBError("the latent has no blended value: connect ReDiBlend's output (or a ReDiPartialSample output through ReDiRetrieve and ReDiBlend).")
    s = state.settings
    batch = blended.shape[0]
    h = h if h is not None else state.neighbours.ids.shape[1]
    limit = guard_threshold(state.kb, state.key_step, h, threshold)
    accepted = [bool(r <= limit) for r in state.centered_residual]
    sigmas = state.sigmas
    out = torch.empty_like(blended)
    evaluations = 0
    for use_value in (True, False):
        idx = [i for i in range(batch) if accepted[i] == use_value]
        if not idx:
            continue
        start = state.value_step if use_value else state.key_step
        source = blended if use_value else state.query
        probe = cs.SamplingProbe()
        result = cs.sample_sigmas(model, latent=source[idx].clone(), noise=None, positive=_take(positive, idx, batch),
                                  negative=_take(negative, idx, batch), cfg=s.cfg, sampler_name=s.sampler,
                                  sigmas=sigmas[start:], seed=int(state.seeds[idx[0]]), probe=probe, callback=callback)
        out[idx] = result.to(out.dtype)
        evaluations += probe.evaluations
    return ResumeReport(out, accepted, state.value_step - state.key_step, evaluations, limit,
                        [float(r) for r in state.centered_residual])
