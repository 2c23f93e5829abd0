"""One paper-claims run's models, judge, query sets and knowledge bases; runs plain / ReDi / T-Stitch and scores them.

Every sample goes through `embedded.sampling` (the pack's kb_tools code path on the embedded
crops UNets); this module adds what a benchmark needs around it: cached reference runs and
knowledge bases, timings, a count of the sampling work done, and the metrics of each output
set against real crops (FD in the judge's feature space, condition faithfulness) and against
the full-step plain run from the same noise.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import metrics as M
from benchmarks.claims.config import Config
from benchmarks.claims.rows import PlainRow, Quality, ReDiRow
from benchmarks.report import private
from embedded import sampling as S
from embedded.captions import Caption, parse_prompt, sample_captions
from embedded.judge import Judge, faithfulness
from embedded.models import bf16_autocast, load_models


class Skip(Exception):
    """An experiment left out because it would end the run past the time budget (--budget-min)."""


@dataclasses.dataclass
class Reference:
    """The full-step plain run of a query set, with its trajectory at every step."""

    out: torch.Tensor                 # [N, 3, 16, 16]
    traj: dict[int, torch.Tensor]     # {step: latent [N, 3, 16, 16]} for steps 1 .. T-1
    nfe: float                        # model evaluations per item
    seconds: float
    prompts: list[str]
    seeds: list[int]
    labels: np.ndarray                # source index per query
    captions: list[Caption]


@dataclasses.dataclass
class KBBuild:
    """A benchmark knowledge base and what building it cost (this run and all runs that filled the cache)."""

    kb: object = private()
    entries: int = 0
    added_this_run: int = 0
    build_seconds_this_run: float = 0.0
    build_seconds_total: float = 0.0
    ms_per_trajectory: float = 0.0
    evaluations_this_run: int = 0
    cached: bool = False
    #: what the auto guard reads (stored after the build, as `python -m kb_tools calibrate` would)
    guard_calibration: dict = dataclasses.field(default_factory=dict)


class Bench:
    """The shared state of a run: what every experiment samples with and scores against."""

    def __init__(self, cfg: Config, precision: str, scratch: Path, fresh: bool, t_start: float):
        self.cfg = cfg
        self.t_start = t_start
        self.precision = precision
        large, small, _ = load_models()
        if precision == "bf16":  # the demo's --precision bf16: autocast through ComfyUI's unet wrapper
            large, small = bf16_autocast(large), bf16_autocast(small)
        self.large, self.small = large, small
        self.scratch = scratch
        if fresh and scratch.exists():
            shutil.rmtree(scratch)
        scratch.mkdir(parents=True, exist_ok=True)
        self.judge = Judge()
        # FD reference: several real renderings (held-out digits, jittered crops) of the query captions.
        self.query_captions = sample_captions(cfg.queries, "heldout")
        self.real_features = self.judge.real_features(self.query_captions, cfg.reference_renders)
        self.image_steps = 0           # UNet batch-item steps run (cost accounting)
        self.model_seconds = 0.0
        self.kbs: dict[str, KBBuild] = {}
        self.refs: dict[tuple[str, str], Reference] = {}
        self._warm()

    # ------------------------------------------------------------------ bookkeeping
    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def rate(self) -> float:
        """Seconds per image-step measured so far (a prior of 10 ms before anything ran)."""
        return self.model_seconds / self.image_steps if self.image_steps > 200 else 0.010

    def afford(self, image_steps: int, what: str) -> None:
        """With a time budget, raise Skip if `image_steps` more model work would end the run past it."""
        budget = self.cfg.soft_budget_s
        if budget is None:
            return
        need = image_steps * self.rate() * 1.15
        if self.elapsed() + need > budget:
            raise Skip(f"{what}: needs ~{need:.0f} s of sampling ({image_steps} image-steps at "
                       f"{1000 * self.rate():.1f} ms each), only {budget - self.elapsed():.0f} s "
                       f"of the {budget / 60:.0f}-minute budget left")

    def count(self, items: int, steps: int, seconds: float) -> None:
        """Book `items` x `steps` UNet batch-item steps that took `seconds`."""
        self.image_steps += items * steps
        self.model_seconds += seconds

    def _warm(self) -> None:
        for model in (self.large, self.small):
            self.plain("euler", 2, ["digit 0"], [0], model=model)
        self.image_steps, self.model_seconds = 0, 0.0

    # ------------------------------------------------------------------ query sets
    def recipe(self, sampler: str, steps: int | None = None) -> S.Recipe:
        return S.Recipe(sampler, self.cfg.scheduler, self.cfg.steps if steps is None else steps, self.cfg.cfg)

    def query_set(self, protocol: str, n: int | None = None) -> tuple[list[str], list[int], np.ndarray]:
        """Held-out captions and their seeds: (prompts, seeds, source labels)."""
        n = self.cfg.queries if n is None else n
        caps = self.query_captions[:n]
        if protocol == "fixed":
            seeds = [self.cfg.kb_seed] * n
        elif protocol == "foreign":
            seeds = [self.cfg.foreign_seed_base + i for i in range(n)]
        else:
            raise ValueError(protocol)
        return [c.prompt() for c in caps], seeds, np.array([c.source for c in caps])

    def plain(self, sampler: str, steps: int, prompts: list[str], seeds: list[int], *, model=None,
              record=()) -> tuple[S.PlainSamples, float]:
        """(the plain run on an `steps`-step schedule, its seconds); the large model unless `model`."""
        model = self.large if model is None else model
        t = time.perf_counter()
        run = S.plain(model, prompts, seeds, self.recipe(sampler, steps), record=record)
        dt = time.perf_counter() - t
        self.count(len(prompts), steps, dt)
        return run, dt

    def reference(self, sampler: str, protocol: str) -> Reference:
        """The full-step plain run of the query set, with its trajectory at every stored step (cached)."""
        key = (sampler, protocol)
        if key not in self.refs:
            prompts, seeds, labels = self.query_set(protocol)
            run, dt = self.plain(sampler, self.cfg.steps, prompts, seeds, record=range(1, self.cfg.steps))
            self.refs[key] = Reference(run.latents, run.states, float(run.evaluations.per_item().mean()), dt, prompts,
                                       seeds, labels, self.query_captions[:len(prompts)])
        return self.refs[key]

    # ------------------------------------------------------------------ knowledge bases
    def kb_path(self, sampler: str, n: int | None = None, tag: str = "") -> Path:
        c = self.cfg
        name = f"kb_{sampler}_T{c.steps}_cfg{c.cfg:g}_s{c.kb_seed}_{self.precision}"
        return self.scratch / (name + (f"_sub{n}" if n is not None else "") + (f"_{tag}" if tag else ""))

    def knowledge_base(self, sampler: str, n: int) -> KBBuild:
        """Build (or resume from the .scratch cache) the fixed-seed KB of `n` train captions."""
        if sampler in self.kbs and self.kbs[sampler].entries >= n:
            return self.kbs[sampler]
        c = self.cfg
        path = self.kb_path(sampler)
        prompts = [cap.prompt() for cap in sample_captions(n, "train")]
        sidecar = path.parent / (path.name + ".build.json")
        history = json.loads(sidecar.read_text()) if sidecar.exists() else {"seconds": 0.0, "added": 0}
        report = S.build_kb(path, self.large, prompts, [c.kb_seed], self.recipe(sampler), list(range(1, c.steps)),
                            batch_size=250, commit_every=500)
        if report.added:
            self.count(report.added, c.steps, report.seconds)
            history = {"seconds": history["seconds"] + report.seconds, "added": history["added"] + report.added}
            sidecar.write_text(json.dumps(history))
        # The auto guard reads a stored calibration (a generation never calibrates): store the one the claims' H
        # uses, on 64 entries as the pack's guard measured it before calibration became an explicit step.
        calibration = S.calibrate_guard(report.kb, c.key_step, c.h_claim, sample=min(64, len(report.kb)))
        info = KBBuild(kb=report.kb, entries=len(report.kb), added_this_run=report.added,
                       build_seconds_this_run=round(report.seconds, 1), build_seconds_total=round(history["seconds"], 1),
                       ms_per_trajectory=round(1000 * history["seconds"] / max(1, history["added"]), 1),
                       evaluations_this_run=report.evaluations, cached=report.added == 0,
                       guard_calibration={k: calibration[k] for k in ("step", "h", "n", "kb_count", "centered_p95")})
        self.kbs[sampler] = info
        return info

    def sub_kb(self, sampler: str, n: int, ids: np.ndarray | None = None, tag: str = ""):
        """A subset of the sampler's KB: n random entries, or the given ids."""
        big = self.kbs[sampler].kb
        if ids is None and n >= len(big):
            return big
        path = self.kb_path(sampler, n, tag)
        if path.exists():
            shutil.rmtree(path)
        if ids is None:
            ids = np.sort(np.random.default_rng(n).choice(len(big), size=n, replace=False))
        return S.kb_subset(big, path, ids)

    def same_source(self, kb, ids: np.ndarray, labels) -> float:
        """Share of retrieved neighbours whose caption names the query's source."""
        entries = kb.entries
        return float(np.mean([parse_prompt(entries[int(i)][0]).source == y for row, y in zip(ids, labels) for i in row]))

    # ------------------------------------------------------------------ ReDi
    def book_redi(self, result, seconds: float) -> None:
        """Book a ReDi run's model work: k steps per item, then T minus each item's start step."""
        plan = result.plan
        self.count(len(result.start_steps), plan.key_step, seconds)
        self.image_steps += int((plan.steps - result.start_steps).sum())

    def redi(self, kb, prompts, seeds, k, v, h, guard, resume_prompts=None) -> tuple[S.ReDiResult, float]:
        """(one whole ReDi generation, Algorithm 2 in one sampler run; its seconds)."""
        t = time.perf_counter()
        result = S.redi_sample(kb, self.large, prompts, seeds, key_step=k, value_step=v, h=h, guard=guard,
                               resume_prompts=resume_prompts)
        dt = time.perf_counter() - t
        self.book_redi(result, dt)
        return result, dt

    def key(self, kb, prompts, seeds, k) -> tuple[S.KeyQuery, float]:
        """(the query x_k of each item, lines 1-5; its seconds)."""
        t = time.perf_counter()
        query = S.redi_key(kb, self.large, prompts, seeds, k)
        dt = time.perf_counter() - t
        self.count(len(prompts), k, dt)
        return query, dt

    def resume(self, value, prompts, guard) -> tuple[S.ReDiResult, float]:
        """(the guard and lines 9-11 from a blend; seconds)."""
        t = time.perf_counter()
        result = S.redi_resume(value, self.large, prompts, guard)
        dt = time.perf_counter() - t
        self.count(len(prompts), 0, dt)
        self.image_steps += int((result.plan.steps - result.start_steps).sum())
        return result, dt

    def redi_sweep(self, sampler: str, protocol: str, kb, k: int, hs, vs, guard=S.GUARD_OFF,
                   tag: str = "") -> list[ReDiRow]:
        """Sample to k once, then for each H retrieve, for each v blend and resume; one row each."""
        ref = self.reference(sampler, protocol)
        prompts, seeds, labels = ref.prompts, ref.seeds, ref.labels
        query, t_partial = self.key(kb, prompts, seeds, k)
        rows = []
        for h in hs:
            t = time.perf_counter()
            found = S.find_neighbours(query, h)
            t_retr = time.perf_counter() - t
            for v in vs:
                t = time.perf_counter()
                value = S.blend_at(found, v, "lstsq")
                t_blend = time.perf_counter() - t
                result, t_res = self.resume(value, prompts, guard)
                nfe = np.where(result.accepted, k + self.cfg.steps - v, self.cfg.steps)
                quality = self.quality(result.latent, ref.captions, ref.out, xv_true=ref.traj.get(v), xv_hat=value.latent,
                                       residual=value.fit.residual, centered=value.fit.centered_residual)
                rows.append(ReDiRow(
                    sampler=sampler, protocol=protocol, k=k, v=v, h=h, nominal_nfe=k + self.cfg.steps - v,
                    nfe=float(nfe.mean()), kb_entries=len(kb),
                    guard="off" if guard >= S.GUARD_OFF else ("auto" if guard < 0 else guard),
                    guard_threshold=float(result.guard.threshold), guard_source=result.guard.source,
                    accepted=float(result.accepted.mean()),
                    same_source_neighbours=self.same_source(kb, result.neighbour_ids, labels),
                    seconds={"partial": t_partial, "retrieve": t_retr, "blend": t_blend, "resume": t_res,
                             "total": t_partial + t_retr + t_blend + t_res},
                    tag=tag, quality=quality))
        return rows

    # ------------------------------------------------------------------ metrics of one output set
    def quality(self, out, captions, ref_out, *, xv_true=None, xv_hat=None, residual=None, centered=None,
                reference=None) -> Quality:
        """FD and faithfulness against real crops; MSE to `ref_out` and d(x_v, x_v_hat) when given."""
        out = np.asarray(out, np.float32)
        reading = self.judge.read(out)
        reference = self.real_features if reference is None else reference
        faith = faithfulness(reading, captions)
        q = Quality(fd=M.frechet_distance(reading.features, reference),
                    fd_sd=M.fd_bootstrap_sd(reading.features, reference), finite=bool(np.isfinite(out).all()),
                    acc=faith.acc, acc_se=faith.acc_se, geo_err=faith.geo_err, geo_err_se=faith.geo_err_se,
                    sepia_err=faith.sepia_err, sepia_err_se=faith.sepia_err_se, geo=faith.geo_per_sample)
        if ref_out is not None:
            mse = M.per_sample_mse(out, ref_out)
            q.mse_mean, q.mse_se = M.mean_se(mse)
            q.mse_p95, q.mse_worst5_mean, q.mse = float(np.percentile(mse, 95)), M.worst_mean(mse), mse
        if xv_true is not None and xv_hat is not None:
            d = M.l2_per_sample(np.asarray(xv_hat), np.asarray(xv_true))
            q.d_xv_mean = float(d.mean())
            q.d_xv_rel = float((d / np.linalg.norm(np.asarray(xv_true, np.float64).reshape(len(d), -1), axis=1)).mean())
        if residual is not None:
            q.residual_rel_mean = float(np.mean(residual))
        if centered is not None:
            q.residual_centered_mean = float(np.mean(centered))
        return q

    def plain_row(self, sampler: str, protocol: str, steps: int) -> PlainRow:
        ref = self.reference(sampler, protocol)
        if steps == self.cfg.steps:
            out, nfe, dt = ref.out, ref.nfe, ref.seconds
        else:
            run, dt = self.plain(sampler, steps, ref.prompts, ref.seeds)
            out, nfe = run.latents, float(run.evaluations.per_item().mean())
        return PlainRow(sampler=sampler, protocol=protocol, nfe=float(nfe), nominal_nfe=steps, seconds={"total": dt},
                        quality=self.quality(out, ref.captions, ref.out))

    def fd_noise_floor(self, draws: int = 10) -> dict:
        """FD of fresh real renderings of the query captions against the reference: {n, draws, mean, sd}."""
        floor = M.fd_noise_floor(lambda: self.judge.features(self.judge.real(self.query_captions)), self.real_features,
                                 draws)
        return {"n": len(self.query_captions), **floor}

