"""Calibrating a few-step sampler for a model on a KB's teachers, per cfg: what kb_tools.calibrate_sampler runs.

Per cfg value:
  1. teachers (teacher.py) for the (prompt, seed) items, stored one file each as they finish
     (store/sampler_calibration.py): a rerun after a stop computes only the missing ones;
  2. the split: a quarter of the items HELD OUT, the rest halved into FIT and SELECT items;
  3. per N, the calibrated sampler's schedule and table on fit + select items (schedule_fit.py);
  4. per N, the held-out check against every built-in sampler x schedule (heldout.py), and the
     doubling check of the teachers on a few held-out items (a teacher on twice the fine grid);
  5. one record (JSON) with everything measured, committed after each cfg.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from ..comfy import model_facts as facts
from ..comfy.schedules import PLAIN_SAMPLERS, PLAIN_SCHEDULES
from ..core.errors import KBError
from ..store import sampler_calibration as stored
from .heldout import EULER_NORMAL, builtin_grid, choose_winner, heldout_mse, paired_se
from .live_model import CalibrationStopped, conditionings_match, with_live_batch
from .schedule_fit import calibrate_steps
from .schedule_search import KARRAS_RHOS
from .teacher import DEFAULT_FINE_STEPS, TEACHER_SAMPLER, TEACHER_SCHEDULE, doubling_gap, fine_sigmas, run_teacher

RECORD_VERSION = 1
#: The doubling check passes when the teachers move by less than this share of the smallest error compared.
GAP_SHARE = 1 / 20


@dataclass(frozen=True)
class CalibrationSettings:
    """What one calibration runs: step counts, cfg values, teachers and the sizes of its searches."""

    nfe: tuple[int, ...]
    cfgs: tuple[float, ...]
    latent_shape: tuple[int, ...]
    negative_prompt: str = ""
    fine_steps: int = DEFAULT_FINE_STEPS
    samplers: tuple[str, ...] = PLAIN_SAMPLERS
    schedules: tuple[str, ...] = PLAIN_SCHEDULES
    chunk: int = 16                 # items per model call
    doubling_items: int = 8         # held-out items the doubling check runs on
    search_sweeps: int = 2          # coordinate-descent sweeps of the schedule search (0: none)
    refine_iterations: int = 2      # final-state refinement of the table (0: the stepwise rollout fit alone)
    rhos: tuple[float, ...] = KARRAS_RHOS  # karras rho values tried besides the built-in schedules
    split_seed: int = 0

    def __post_init__(self) -> None:
        if not self.nfe or any(not isinstance(n, int) or not 2 <= n <= 100 for n in self.nfe) or len(set(self.nfe)) != len(self.nfe):
            raise KBError(f"nfe {list(self.nfe)} must be distinct whole step counts from 2 to 100, e.g. 4,5,6,8,10.")
        if not self.cfgs or any(not math.isfinite(c) or not 0 < c <= 100 for c in self.cfgs):
            raise KBError(f"cfg values {list(self.cfgs)} must be finite guidance scales in (0, 100], e.g. 3,7.5.")
        if len(self.latent_shape) != 3 or any(int(s) < 1 for s in self.latent_shape):
            raise KBError(f"latent shape {list(self.latent_shape)} must be [C, H, W]; give the size you sample at.")


def cfg_key(cfg: float) -> str:
    """The record's key of a cfg value: '3', '7.5'."""
    return f"{float(cfg):g}"


def split_items(n: int, seed: int = 0) -> dict[str, list[int]]:
    """A quarter of n items held out, the rest alternately FIT and SELECT (a fixed permutation of `seed`)."""
    if n < 4:
        raise KBError(f"{n} teacher items are too few to calibrate (a quarter are held out and the rest split in two); "
                      "give at least 4, 64 or more for a stable choice.")
    perm = np.random.default_rng(seed).permutation(n).tolist()
    held = max(1, n // 4)
    rest = perm[held:]
    return {"fit": sorted(rest[0::2]), "select": sorted(rest[1::2]), "heldout": sorted(perm[:held])}


def pick_items(entries: Sequence[tuple[str, int]], teachers: int, seed: int = 0) -> list[tuple[str, int]]:
    """`teachers` of the KB's (prompt, seed) entries, a fixed random sample in KB order (all when fewer)."""
    if len(entries) <= teachers:
        return list(entries)
    idx = np.sort(np.random.default_rng(seed).choice(len(entries), size=int(teachers), replace=False))
    return [entries[i] for i in idx]


class _Progress:
    def __init__(self, total: int, progress: Callable[[int, int], None] | None):
        self.done, self.total, self.progress = 0, total, progress

    def tick(self, k: int = 1) -> None:
        self.done += k
        if self.progress is not None:
            self.progress(min(self.done, self.total), self.total)


def _teachers(root, model, conds, negative, items, cfg, s: CalibrationSettings, fine, fingerprint, bar, should_stop, log):
    """Every item's teacher: (states [T, M+1, ...], denoised [T, M, ...], files, evaluations spent now)."""
    fields = [stored.teacher_fields(fingerprint, p, sd, cfg, s.negative_prompt, s.latent_shape, s.fine_steps) for p, sd in items]
    data, files, spent = {}, {}, 0
    for i, f in enumerate(fields):
        got = stored.load_teacher(root, f)
        if got is not None:
            data[i], files[i] = got[:2], got[2]
    todo = [i for i in range(len(items)) if i not in data]
    bar.tick(len(items) - len(todo))
    if todo:
        log(f"cfg {cfg:g}: {len(items) - len(todo)} teachers stored, running {len(todo)} ({s.fine_steps} steps each)")
    for c in range(0, len(todo), s.chunk):
        if should_stop():
            raise CalibrationStopped
        part = todo[c:c + s.chunk]
        states, denoised, evals = with_live_batch(
            model, [conds[i] for i in part], negative, [items[i][1] for i in part], cfg, s.latent_shape, fine,
            lambda live: (*run_teacher(live, fine), live.tally.total()), chunk=s.chunk)
        spent += evals
        for j, i in enumerate(part):
            stored.save_teacher(root, fields[i], states[j], denoised[j])
            states_i, denoised_i, files[i] = stored.load_teacher(root, fields[i])  # what a resumed run would read
            data[i] = (states_i, denoised_i)
        bar.tick(len(part))
    order = range(len(items))
    names = [stored.teacher_name(f) for f in fields]
    return (torch.stack([data[i][0] for i in order]), torch.stack([data[i][1] for i in order]),
            [{"prompt": items[i][0], "seed": int(items[i][1]), "file": names[i], "sha256": files[i]} for i in order], spent)


def _heldout_block(cal: np.ndarray, builtin: dict, grid: dict) -> dict:
    verdict = choose_winner(cal, builtin)
    euler = builtin.get(EULER_NORMAL)
    return {**verdict, "euler_normal_mse": None if euler is None else float(np.mean(euler)),
            "euler_normal_diff_se": None if euler is None else paired_se(euler, cal),
            "best_builtin_sigmas": [float(v) for v in grid[verdict["best_builtin"]]],
            "grid": {k: float(np.mean(v)) if np.isfinite(v).all() else None for k, v in sorted(builtin.items())}}


def _search_settings(s: CalibrationSettings) -> dict:
    """What decides an N's fit and held-out check besides the teachers: a stored N is reused only when these match."""
    return {"samplers": list(s.samplers), "schedules": list(s.schedules), "search_sweeps": s.search_sweeps,
            "rhos": [float(r) for r in s.rhos], "split_seed": s.split_seed, "fine_steps": s.fine_steps,
            "refine_iterations": s.refine_iterations}


def calibrate_cfg(root: str, model, conds, negative, items, cfg: float, s: CalibrationSettings, fingerprint: dict,
                  bar: _Progress, should_stop: Callable[[], bool], log: Callable[[str], None],
                  previous: dict | None = None, commit: Callable[[dict], None] | None = None) -> dict:
    """The record's block for one cfg value (see the module doc), passed to `commit` after each N.

    previous: this cfg's stored block; its N blocks (and doubling figure) are kept when its teachers and search
    settings are the same, so a rerun with more N, or one stopped after some N, computes only the missing ones."""
    start = time.perf_counter()
    fine = fine_sigmas(model, s.fine_steps)
    states, denoised, teachers, spent = _teachers(root, model, conds, negative, items, cfg, s, fine, fingerprint, bar,
                                                  should_stop, log)
    settings = _search_settings(s)
    stored_settings = (previous or {}).get("settings")
    if isinstance(stored_settings, dict):
        stored_settings = {"refine_iterations": 0, **stored_settings}  # recorded before the refinement existed: none
    same = previous is not None and previous.get("teachers") == teachers and stored_settings == settings
    blocks = dict(previous.get("nfe", {})) if same else {}
    split = split_items(len(items), s.split_seed)
    cal = split["fit"] + split["select"]
    held = split["heldout"]
    fit_local, select_local = list(range(len(split["fit"]))), list(range(len(split["fit"]), len(cal)))
    cost = {"teacher_evaluations": len(items) * s.fine_steps, "teacher_evaluations_this_run": spent,
            "fit_evaluations": 0, "heldout_evaluations": 0}

    def live_on(part, job):
        return with_live_batch(model, [conds[i] for i in part], negative, [items[i][1] for i in part], cfg,
                               s.latent_shape, fine, job, chunk=s.chunk)

    if same and isinstance(previous.get("doubling"), dict):
        gap = float(previous["doubling"]["mse"])
        doubling = {k: previous["doubling"][k] for k in ("items", "fine_steps", "doubled_steps", "mse")}
    else:
        k = list(range(min(s.doubling_items, len(held))))
        gaps, evals = live_on(held, lambda live: (doubling_gap(live, fine_sigmas(model, 2 * s.fine_steps),
                                                               states[held][k, -1], k), live.tally.total()))
        gap = float(gaps.mean())
        doubling = {"items": len(gaps), "fine_steps": s.fine_steps, "doubled_steps": 2 * s.fine_steps, "mse": gap}
        cost["heldout_evaluations"] += evals

    def block() -> dict:
        smallest = min(min(v for v in (b["heldout"]["calibrated_mse"], b["heldout"]["best_builtin_mse"]) if v is not None)
                       for b in blocks.values())
        return {"cfg": float(cfg), "teachers": teachers, "split": split, "settings": settings,
                "doubling": {**doubling, "smallest_error": smallest, "share": gap / smallest if smallest > 0 else None,
                             "ok": bool(gap < GAP_SHARE * smallest)},
                "cost": {**cost, "evaluations_this_run": spent + cost["fit_evaluations"] + cost["heldout_evaluations"],
                         "seconds": time.perf_counter() - start},
                "nfe": dict(sorted(blocks.items(), key=lambda kv: int(kv[0])))}

    for n in s.nfe:
        if str(n) in blocks:
            log(f"cfg {cfg:g}, N={n}: calibrated before on the same teachers and settings; kept")
            bar.tick(2)
            continue
        fitted, evals = live_on(cal, lambda live: (
            calibrate_steps(live, model, states[cal], denoised[cal], fine, n, fit_local, select_local,
                            schedules=s.schedules, rhos=s.rhos, search_sweeps=s.search_sweeps,
                            refine_iterations=s.refine_iterations, should_stop=should_stop),
            live.tally.total()))
        cost["fit_evaluations"] += evals
        log(f"cfg {cfg:g}, N={n}: schedule {fitted['schedule']} (select MSE {fitted['select_mse']:.3g}, "
            f"{fitted['trials']} candidates fitted)")
        bar.tick()

        def check(live):
            grid = builtin_grid(model, n, s.samplers, s.schedules)
            sig, coeffs = (torch.tensor(fitted[k], dtype=torch.float64) for k in ("sigmas", "coeffs"))
            cal_mse, builtin = heldout_mse(live, live.to_latent(0.0, states[held, -1]), n, (sig, coeffs), grid,
                                           should_stop)
            return _heldout_block(cal_mse, builtin, grid), live.tally.total()

        checked, evals = live_on(held, check)
        cost["heldout_evaluations"] += evals
        log(f"cfg {cfg:g}, N={n}: held-out MSE calibrated {checked['calibrated_mse']:.3g} vs "
            f"{checked['best_builtin']} {checked['best_builtin_mse']:.3g} (n={len(held)}): {checked['kind']}")
        bar.tick()
        blocks[str(n)] = {**fitted, "heldout": checked}
        if commit is not None:
            commit(block())  # a stop after this N keeps it
    return block()


def _compatible(old: dict, fresh: dict) -> bool:
    """Whether an existing record's other cfg blocks may stay next to the new ones (same model, size, prompt, teacher)."""
    try:
        errors, _ = facts.compare_fingerprints(old["model_fingerprint"], fresh["model_fingerprint"])
    except (KeyError, TypeError, AttributeError):
        return False
    return not errors and all(old.get(k) == fresh[k] for k in ("latent_shape", "negative_prompt", "teacher", "version"))


def run_calibration(root: str, model, encode: Callable[[str], list], items: Sequence[tuple[str, int]],
                    s: CalibrationSettings, *, progress: Callable[[int, int], None] | None = None,
                    should_stop: Callable[[], bool] | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Calibrate every cfg of `s` on teachers for `items` and commit the record to the KB folder `root`; returns it.

    Raises CalibrationStopped when should_stop() says so (the finished teachers and cfg values stay stored)."""
    should_stop = should_stop or (lambda: False)
    log = log or (lambda message: None)
    fingerprint = facts.model_fingerprint(model)
    conds = [encode(p) for p, _ in items]
    keep = conditionings_match(conds)
    if not keep.all():
        log(f"{int((~keep).sum())} teacher prompts encode to another token length than the first; left out")
        items, conds = [it for it, k in zip(items, keep) if k], [c for c, k in zip(conds, keep) if k]
    negative = encode(s.negative_prompt)
    record = {"version": RECORD_VERSION, "model_fingerprint": fingerprint, "latent_shape": [int(v) for v in s.latent_shape],
              "negative_prompt": s.negative_prompt, "cfgs": {},
              "teacher": {"sampler": TEACHER_SAMPLER, "schedule": TEACHER_SCHEDULE, "fine_steps": s.fine_steps,
                          "storage": "states and predictions float16, first and converged state float32"}}
    try:
        old = stored.read_record(root)
    except KBError:
        old = None
    if old is not None and _compatible(old, record):
        record["cfgs"] = dict(old.get("cfgs", {}))
    bar = _Progress(len(s.cfgs) * (len(items) + 2 * len(s.nfe)), progress)
    for cfg in s.cfgs:
        def commit(block: dict, key: str = cfg_key(cfg)) -> None:
            record["cfgs"][key] = block
            stored.write_record(root, record)

        commit(calibrate_cfg(root, model, conds, negative, items, cfg, s, fingerprint, bar, should_stop, log,
                             previous=record["cfgs"].get(cfg_key(cfg)), commit=commit))
    return record
