"""The head-to-head run's knowledge bases: built with the pack (Algorithm 1), cached in the scratch folder across runs.

A KB holds the trajectories of `regime.kb_entries` train captions from the one KB seed, sampled
with the regime's recipe, every step 1..T-1 stored. What building it cost (wall and CPU
seconds, summed over every run that added entries) is kept in a sidecar JSON next to it, so a
run that reuses the cache still reports it.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np

from embedded import sampling as S
from embedded.captions import parse_prompt, sample_captions
from kb_tools.calibration.blend_error import stored_error_model
from kb_tools.calibration.plain_reference import reference_of
from kb_tools.store import KnowledgeBase
from kb_tools.core.records import Recipe

from .config import Regime
from .timing import Timer


@dataclasses.dataclass
class KBInfo:
    """A benchmark KB and what it cost to build (all runs that filled the cache together)."""

    name: str
    entries: int
    stored_steps: list
    build_wall_seconds: float
    build_cpu_seconds: float
    timed_entries: int  # entries the build seconds cover (an interrupted build's entries are kept but not timed)
    added_this_run: int
    calibration: dict | None
    kb: KnowledgeBase = dataclasses.field(repr=False, metadata={"private": True})


def _sidecar(path: Path) -> Path:
    return path.parent / (path.name + ".build.json")


def build(path: Path, model, regime: Regime, batch_size: int = 50) -> KBInfo:
    """Build (or complete, from the cache) the KB of the regime's train captions at `path`."""
    prompts = [c.prompt() for c in sample_captions(regime.kb_entries, "train")]
    side = _sidecar(path)
    history = json.loads(side.read_text()) if side.is_file() else {"wall_seconds": 0.0, "cpu_seconds": 0.0, "added": 0}
    with Timer() as t:
        report = S.build_kb(path, model, prompts, [regime.kb_seed], Recipe(regime.sampler, regime.scheduler,
                            regime.steps, regime.cfg), range(1, regime.steps), batch_size=batch_size, commit_every=500)
    if report.added:
        history = {"wall_seconds": history["wall_seconds"] + t.wall, "cpu_seconds": history["cpu_seconds"] + t.cpu,
                   "added": history["added"] + report.added}
        side.write_text(json.dumps(history))
    kb = report.kb
    return KBInfo(path.name, len(kb), list(kb.stored_steps), round(history["wall_seconds"], 1),
                  round(history["cpu_seconds"], 1), history["added"], report.added, None, kb)


def calibrated(info: KBInfo, key_step: int, h: int, model) -> KBInfo:
    """The KB with a stored guard calibration, blend-error model and plain reference for (key_step, h).

    Computed once with `model` (the regime's large model) and kept in the KB's manifest, as
    `python -m kb_tools calibrate ... --ckpt` does; never during a method's run.
    """
    kb = info.kb
    sample = min(64, len(kb))
    have = kb.calibration(key_step)
    if not have or have.get("h") != h or stored_error_model(kb, key_step, h) is None:
        S.calibrate_guard(kb, key_step, h, sample=sample)
    if reference_of(kb.calibration(key_step), key_step, h) is None:
        S.calibrate_plain_reference(kb, model, key_step, h, sample=sample)
    have = {k: v for k, v in kb.calibration(key_step).items() if k not in ("blend_error", "plain_reference")}
    calibration = kb.calibration(key_step)  # the error model and the reference go in the report once, by themselves
    return dataclasses.replace(info, calibration={"key_step": key_step, **have, "blend_error": stored_error_model(kb, key_step, h),
                                                  "plain_reference": reference_of(calibration, key_step, h)})


def style_free(info: KBInfo, path: Path) -> KBInfo:
    """A KB at `path` with the sepia-0 entries of `info.kb`: the style-free KB of stylization (rebuilt when stale)."""
    kb = info.kb
    entries = kb.entries
    ids = np.array([i for i, (p, _) in enumerate(entries) if parse_prompt(p).sepia == 0.0], np.int64)
    name = info.name + "_stylefree"
    if (path / "manifest.json").is_file():
        sub = KnowledgeBase.open(str(path))
        if len(sub) == len(ids) and sub.settings.to_dict() == kb.settings.to_dict():
            return dataclasses.replace(info, name=name, entries=len(sub), added_this_run=0, calibration=None, kb=sub)
        shutil.rmtree(path)
    sub = S.kb_subset(kb, path, ids)
    return dataclasses.replace(info, name=name, entries=len(sub), added_this_run=0, calibration=None, kb=sub)
