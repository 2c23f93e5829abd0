"""`calibrate_sampler`: the entry point of the sampler calibration (the command line, the node and the benchmark call it).

It resolves the teachers' (prompt, seed) items (a sample of the KB's entries, or the prompts
given), creates a KB with the normal builder when the folder holds none (so a user can calibrate
without a ReDi KB), runs calibration.sampler_calibration.run_calibration and returns the stored
calibration (samplers.calibrated.SamplerCalibration).

KB made from prompts: build_knowledge_base with euler/normal at 20 steps, the first cfg value,
the automatic stored steps and the given negative prompt, one trajectory per (prompt, seed); it
serves ReDi later like any KB, and its folder holds the calibration.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

from ..calibration.live_model import CalibrationStopped
from ..calibration.sampler_calibration import CalibrationSettings, pick_items, run_calibration
from ..calibration.schedule_search import KARRAS_RHOS
from ..calibration.teacher import DEFAULT_FINE_STEPS
from ..comfy.schedules import PLAIN_SAMPLERS, PLAIN_SCHEDULES
from ..core.errors import KBError
from ..core.records import Recipe
from ..core.schedule import parse_steps
from ..samplers.calibrated import SamplerCalibration, load_sampler_calibration
from ..store import MANIFEST, KnowledgeBase, check_kb_path
from .builder import BuildSpec, build_knowledge_base

#: The recipe of a KB created from prompts (the builder's usual defaults).
PROMPT_KB_RECIPE = ("euler", "normal", 20)


def _items(prompts: Sequence[str], seeds: Sequence[int] | None, teachers: int) -> list[tuple[str, int]]:
    prompts = [str(p) for p in prompts]
    if seeds is None:
        seeds = list(range(len(prompts)))
    elif len(seeds) == 1:
        seeds = [int(seeds[0])] * len(prompts)
    if len(seeds) != len(prompts):
        raise KBError(f"got {len(prompts)} prompts and {len(seeds)} seeds; give one seed per prompt, one for all, or none "
                      "(seed i for prompt i).")
    return pick_items(list(zip(prompts, (int(s) for s in seeds))), teachers)


def calibrate_sampler(kb, model, encode: Callable[[str], list], *, nfe: Sequence[int] = (4, 5, 6, 8, 10),
                      cfgs: Sequence[float] = (3.0,), teachers: int = 128, negative_prompt: str = "",
                      latent_shape: Sequence[int] | None = None, prompts: Sequence[str] | None = None,
                      seeds: Sequence[int] | None = None, progress: Callable[[int, int], None] | None = None,
                      should_stop: Callable[[], bool] | None = None, log: Callable[[str], None] | None = None,
                      fine_steps: int = DEFAULT_FINE_STEPS, samplers: Sequence[str] = PLAIN_SAMPLERS,
                      schedules: Sequence[str] = PLAIN_SCHEDULES, search_sweeps: int = 2, refine_iterations: int = 2,
                      rhos: Sequence[float] = KARRAS_RHOS, chunk: int = 16) -> SamplerCalibration | None:
    """Calibrate the few-step sampler of `model` on a KB's teachers and store it with the KB (see the module doc).

    kb: a KB folder path or an open KnowledgeBase. Returns the stored calibration, or None when
    should_stop() stopped the run (the finished teachers and cfg values are stored: a rerun resumes).
    fine_steps: the teachers' karras grid; samplers x schedules: the built-in choices the held-out
    check compares with; search_sweeps, rhos: the schedule candidates; refine_iterations: the final table's refinement
    for the final state (0: none); chunk: items per model call.
    """
    if not isinstance(teachers, int) or isinstance(teachers, bool) or not 4 <= teachers <= 100_000:
        raise KBError(f"teachers must be a whole number from 4 to 100000, got {teachers!r}; 64 to 128 is a good size.")
    root = kb.path if isinstance(kb, KnowledgeBase) else check_kb_path(kb)
    log = log or (lambda message: None)
    if os.path.lexists(os.path.join(root, MANIFEST)):
        opened = kb if isinstance(kb, KnowledgeBase) else KnowledgeBase.open(root, verify="size")
        items = _items(prompts, seeds, teachers) if prompts else pick_items(opened.entries, teachers)
        shape = tuple(int(v) for v in latent_shape) if latent_shape is not None else tuple(opened.latent_shape)
    else:
        if not prompts:
            raise KBError(f"{root} holds no knowledge base, and no prompts were given: give prompts (--prompts FILE) to "
                          "calibrate from, or point at a KB built with python -m kb_tools build.")
        if latent_shape is None:
            raise KBError("a calibration from prompts needs the latent size [C, H, W] you will sample at (--width/--height).")
        items = _items(prompts, seeds, teachers)
        shape = tuple(int(v) for v in latent_shape)
        sampler, scheduler, steps = PROMPT_KB_RECIPE
        log(f"no KB at {root}: building one from {len(items)} prompts ({sampler}/{scheduler}, {steps} steps)")
        spec = BuildSpec(prompts=[p for p, _ in items], seeds=sorted({s for _, s in items}), pairs=items,
                         recipe=Recipe(sampler, scheduler, steps, float(cfgs[0])), store_steps=parse_steps("auto", steps),
                         latent_shape=shape, negative_prompt=negative_prompt, batch_size=chunk)
        build_knowledge_base(root, model, encode, spec, check_interrupt=_interrupt(should_stop))
    if not items:
        raise KBError(f"the knowledge base at {root} has no entries to take teachers from; build it first or give prompts.")
    settings = CalibrationSettings(nfe=tuple(int(n) for n in nfe), cfgs=tuple(float(c) for c in cfgs), latent_shape=shape,
                                   negative_prompt=str(negative_prompt), fine_steps=int(fine_steps),
                                   samplers=tuple(samplers), schedules=tuple(schedules), chunk=int(chunk),
                                   search_sweeps=int(search_sweeps), rhos=tuple(float(r) for r in rhos),
                                   refine_iterations=int(refine_iterations))
    try:
        run_calibration(root, model, encode, items, settings, progress=progress, should_stop=should_stop, log=log)
    except CalibrationStopped:
        log("stopped: the finished teacher runs are stored; run the calibration again to resume")
        return None
    return load_sampler_calibration(root)


def _interrupt(should_stop: Callable[[], bool] | None) -> Callable[[], None] | None:
    """The builder's check_interrupt from a should_stop predicate (it raises to stop; the entries so far are kept)."""
    if should_stop is None:
        return None

    def check() -> None:
        if should_stop():
            raise CalibrationStopped
    return check
