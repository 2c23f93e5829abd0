"""The head-to-head run's knowledge bases: built with the pack (Algorithm 1), cached under .scratch across runs.

A KB holds the trajectories of `regime.kb_entries` train captions from the one KB seed, sampled
with the regime's recipe. What building it cost (wall and CPU seconds, summed over every run
that added entries) is kept in a sidecar JSON next to it, so a run that reuses the cache still
reports it. Only the KB library's public methods are used.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np

from kb_tools.build import BuildSpec, build_knowledge_base
from kb_tools.kb import KnowledgeBase
from kb_tools.records import Recipe
from kb_tools.retrieval import calibrate

from embedded.captions import parse_prompt, sample_captions

from .config import Regime
from .timing import Timer


@dataclasses.dataclass
class KBInfo:
    """A benchmark KB and what it cost to build (all runs that filled the cache together)."""

    name: str
    entries: int
    stored_steps: list
    stitch_step: int
    build_wall_seconds: float
    build_cpu_seconds: float
    added_this_run: int
    calibration: dict | None
    kb: KnowledgeBase = dataclasses.field(repr=False, metadata={"private": True})


def _sidecar(path: Path) -> Path:
    return path.parent / (path.name + ".build.json")


def _is_kb(path: Path) -> bool:
    return (path / "manifest.json").is_file()


def build(path: Path, model, encode, regime: Regime, latent_shape, *, store_steps, stitch_step: int = 0,
          key_model=None, batch_size: int = 100) -> KBInfo:
    """Build (or complete, from the cache) the KB of the regime's train captions at `path`."""
    prompts = [c.prompt() for c in sample_captions(regime.kb_entries, "train")]
    spec = BuildSpec(prompts=prompts, seeds=[regime.kb_seed],
                     recipe=Recipe(regime.sampler, regime.scheduler, regime.steps, regime.cfg),
                     store_steps=list(store_steps), latent_shape=tuple(latent_shape), batch_size=batch_size,
                     stitch_step=stitch_step, commit_every=500)
    side = _sidecar(path)
    history = json.loads(side.read_text()) if side.is_file() else {"wall_seconds": 0.0, "cpu_seconds": 0.0, "added": 0}
    with Timer() as t:
        report = build_knowledge_base(str(path), model, encode, spec, key_model=key_model if stitch_step else None,
                                      key_encode=encode)
    if report.added:
        history = {"wall_seconds": history["wall_seconds"] + t.wall, "cpu_seconds": history["cpu_seconds"] + t.cpu,
                   "added": history["added"] + report.added}
        side.write_text(json.dumps(history))
    kb = report.kb
    return KBInfo(path.name, len(kb), list(kb.stored_steps), stitch_step, round(history["wall_seconds"], 1),
                  round(history["cpu_seconds"], 1), report.added, None, kb)


def calibrated(info: KBInfo, key_step: int, h: int) -> KBInfo:
    """The KB with a stored guard calibration for (key_step, h) (computed once, kept in its manifest)."""
    kb = info.kb
    have = kb.calibration(key_step)
    if not have or have.get("h") != h:
        kb.set_calibration(key_step, calibrate(kb, key_step, h, sample=min(256, len(kb))))
        have = kb.calibration(key_step)
    return dataclasses.replace(info, calibration={"key_step": key_step, **have})


def subset(info: KBInfo, path: Path, keep, name: str) -> KBInfo:
    """A KB at `path` holding the entries of `info.kb` whose prompt passes `keep` (rebuilt when stale)."""
    kb = info.kb
    entries = kb.entries
    ids = np.array([i for i, (p, _) in enumerate(entries) if keep(p)], np.int64)
    if _is_kb(path):
        sub = KnowledgeBase.open(str(path))
        if len(sub) == len(ids) and sub.settings.to_dict() == kb.settings.to_dict():
            return dataclasses.replace(info, name=name, entries=len(sub), added_this_run=0, calibration=None, kb=sub)
        shutil.rmtree(path)
    sub = KnowledgeBase.create(str(path), kb.settings, dtype=kb.dtype)
    sub.append({s: kb.latents(s, ids) for s in kb.stored_steps}, [entries[i][0] for i in ids],
               [entries[i][1] for i in ids])
    return dataclasses.replace(info, name=name, entries=len(sub), added_this_run=0, calibration=None, kb=sub)


def style_free(info: KBInfo, path: Path) -> KBInfo:
    """The KB's sepia-0 entries: the style-free KB of stylization (the paper's setting)."""
    return subset(info, path, lambda p: parse_prompt(p).sepia == 0.0, info.name + "_stylefree")
