"""Building a knowledge base: Algorithm 1 of Zhang et al. (2023) on a ComfyUI model.

Every (prompt, seed) pair is sampled with one recipe by the plain-sampler helper
(`plain.sample_prompts`) and its latents at the stored steps are appended to the KB.
The BuildKnowledgeBase node and `python -m kb_tools build` call `build_knowledge_base`.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..comfy import model_facts as cs
from ..comfy.plain import sample_prompts
from ..core.errors import KBError
from ..core.records import Recipe
from ..core.schedule import plan_redi
from ..store import KBSettings, KnowledgeBase, open_or_create


@dataclass(frozen=True)
class BuildSpec:
    """What to put in a knowledge base: prompts x seeds, sampled with one fixed recipe."""

    prompts: Sequence[str]
    seeds: Sequence[int]
    recipe: Recipe
    store_steps: Sequence[int] = ()
    latent_shape: tuple[int, int, int] = ()
    negative_prompt: str = ""
    batch_size: int = 4
    dtype: str = "float16"
    index_type: str = "auto"
    #: T-Stitch keys: the key model runs steps [0, stitch_step), the main model the rest.
    stitch_step: int = 0
    #: entries gathered in memory before one atomic commit (a crash loses at most these).
    commit_every: int = 64
    #: explicit (prompt, seed) pairs to sample instead of prompts x seeds (one shard of a distributed
    #: build); `seeds` still names the whole build's seeds, which the KB settings record.
    pairs: Sequence[tuple[str, int]] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.recipe, Recipe):
            raise KBError(f"a build needs a recipe: give recipe=Recipe(sampler, scheduler, steps, cfg), got {self.recipe!r}.")
        if not self.seeds:
            raise KBError("give at least one seed: every trajectory starts from the noise of a seed.")
        if not self.store_steps:
            raise KBError("give the steps to store (e.g. parse_steps('auto', steps)).")
        plan_redi(self.recipe.steps, min(self.store_steps), max(self.store_steps))  # range check
        if self.stitch_step < 0:
            raise KBError(f"stitch_step must be >= 0, got {self.stitch_step}.")


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
    r = spec.recipe
    return KBSettings(
        model_fingerprint=cs.model_fingerprint(model),
        key_model_fingerprint=cs.model_fingerprint(key_model) if key_model is not None and spec.stitch_step > 0 else None,
        latent_shape=tuple(int(v) for v in spec.latent_shape),
        sampling_type=cs.sampling_type(model),
        sampler=r.sampler,
        scheduler=r.scheduler,
        steps=int(r.steps),
        cfg=float(r.cfg),
        denoise=1.0,
        stored_steps=sorted(int(s) for s in spec.store_steps),
        sigmas=[float(s) for s in sigmas],
        seed_policy="fixed" if len(set(spec.seeds)) == 1 else "per_entry",
        negative_prompt=spec.negative_prompt,
        extra={"stitch_step": int(spec.stitch_step)},
    )


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
    r = spec.recipe
    sigmas = cs.schedule_sigmas(model, r.sampler, r.scheduler, r.steps)
    if key_model is not None and spec.stitch_step:
        from ..core.stitch import check_stitch_compatible
        check_stitch_compatible(cs.model_signature(key_model), cs.model_signature(model), None, None)
    settings = kb_settings_for(model, spec, sigmas, key_model)
    kb = open_or_create(kb_path, settings, dtype=spec.dtype, index_type=spec.index_type)
    pairs = [(p, int(s)) for p, s in spec.pairs] or [(p, int(s)) for p in spec.prompts for s in spec.seeds]
    todo = kb.missing(pairs)
    already = len(pairs) - len(todo)
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
            # Sample only as far as the last stored step: the rest of the trajectory is never stored.
            run = sample_prompts(model, encode, [p for p, _ in chunk], [s for _, s in chunk], r,
                                 latent_shape=settings.latent_shape, negative_prompt=spec.negative_prompt,
                                 batch_size=len(chunk), keep_steps=settings.stored_steps, stop_step=stop,
                                 key_model=key_model if spec.stitch_step else None, key_encode=key_encode,
                                 stitch_step=spec.stitch_step)
            evaluations += run.evaluations.total("model")
            key_evaluations += run.evaluations.total("small_model")
            pending["latents"].append(run.states)
            pending["prompts"].extend(p for p, _ in chunk)
            pending["seeds"].extend(s for _, s in chunk)
            done += len(chunk)
            if len(pending["prompts"]) >= spec.commit_every:
                commit()
            if progress is not None:
                progress(done, len(todo))
    finally:
        # Whatever was sampled is kept, also when the run is interrupted or fails later.
        commit()
    return BuildReport(kb, done, already, evaluations, key_evaluations, time.perf_counter() - start)


def learning_settings(model, recipe: Recipe, store_steps: Sequence[int], latent_shape: Sequence[int],
                      negative_prompt: str = "") -> KBSettings:
    """The settings of a learning KB for this model and recipe: entries from any seed ("per_entry")."""
    spec = BuildSpec(prompts=(), seeds=(0,), recipe=recipe, store_steps=store_steps,
                     latent_shape=tuple(int(v) for v in latent_shape), negative_prompt=negative_prompt)
    sigmas = cs.schedule_sigmas(model, recipe.sampler, recipe.scheduler, recipe.steps)
    return dataclasses.replace(kb_settings_for(model, spec, sigmas), seed_policy="per_entry")
