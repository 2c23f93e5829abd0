"""Evidence benchmark: which claims of the ReDi and T-Stitch papers hold on the embedded crops models.

    source scripts/env.sh
    $REDI_PYTHON benchmarks/paper_claims.py              # full run (about 45 min on 2 CPU cores)
    $REDI_PYTHON benchmarks/paper_claims.py --smoke --out /tmp/pc.json   # ~1-2 min structure check

Writes benchmarks/results/paper_claims.json, paper_claims.md and paper_claims_*.png (full run).

Every sample goes through the pack's own code: `kb_tools.redi` (build_knowledge_base,
partial_sample, retrieve_neighbours, blend_value, resume_sample with its guard),
`kb_tools.comfy_sampling` (schedule_sigmas, seeded_noise, sample_sigmas, sample_stitched,
SamplingProbe), `kb_tools.tstitch.tstitch_sample` and `kb_tools.retrieval`, on the two
caption-conditional crops UNets of `embedded/` (ComfyUI's own UNet, v-prediction).

Conditions: captions "<source> at <cx> <cy> size <z> [sepia <t>]" (18 sources: 8 photographs
and 10 digit classes, continuous crop geometry and sepia strength). The KB comes from train
captions, queries from held-out captions (disjoint random draws, as COCO train / val).

Metrics (plain functions below): Frechet distance in the 128-d hidden layer of the shipped
judge CNN against real crops rendered for the query captions, with its real-vs-real noise
floor at the same sample count; condition faithfulness from the same judge (source accuracy,
crop-geometry and sepia regression errors); per-sample MSE to the full-step plain output from
the same noise and condition, and d(x_v, x_v_hat) (paper Table 3) with the retrieval residual
beside it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

PACK = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PACK))

from embedded import judge as J  # noqa: E402  (imports no ComfyUI at module level)
from embedded.captions import parse_prompt, sample_captions  # noqa: E402
from embedded.models import bf16_autocast, load_models, read_weights, setup_comfy  # noqa: E402
from embedded.rendering import LATENT_SHAPE, render  # noqa: E402
from embedded.text_encoder import condition_embedding, encode  # noqa: E402

RESULTS = PACK / "benchmarks" / "results"
SCRATCH = PACK / ".scratch" / "paper_claims"


# =========================================================================== metrics

class Judge:
    """The shipped judge CNN (embedded/weights/crops_judge.safetensors): FD features and condition readings."""

    def __init__(self):
        import torch

        self.heldout = None
        self._gen = torch.Generator().manual_seed(4321)

    def read(self, latents) -> dict:
        """{features [N, 128], source [N], geometry [N, 3] (cx, cy, log size), sepia [N]}."""
        r = J.read(latents)
        return {"features": r.features, "source": r.source, "geometry": r.geometry, "sepia": r.sepia}

    def features(self, latents) -> np.ndarray:
        return self.read(latents)["features"]

    def real(self, captions, split: str = "heldout"):
        """Real crops [N, 3, 16, 16] rendered for captions (held-out digits by default)."""
        return render(captions, self._gen, split)[0]


def frechet_distance(feat_a: np.ndarray, feat_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) between two feature sets [N, d].

    Tr((S_a S_b)^1/2) is computed as the sum of sqrt(eigenvalues) of the symmetric PSD matrix
    S_a^1/2 S_b S_a^1/2 (same eigenvalues as S_a S_b): exact, stable for singular covariances
    and ~100x faster than a general matrix square root.
    """
    a, b = np.asarray(feat_a, np.float64), np.asarray(feat_b, np.float64)
    mu = a.mean(0) - b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(sa)
    half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    ev = np.linalg.eigvalsh(half @ sb @ half)
    return float(mu @ mu + np.trace(sa) + np.trace(sb) - 2.0 * np.sqrt(np.clip(ev, 0, None)).sum())


def fd_noise_floor(judge: Judge, captions, reference: np.ndarray, draws: int = 10) -> dict:
    """FD of a fresh real rendering of the query captions against the reference, over `draws` renderings.

    What FD a perfect generator gets at this sample count: differences between methods smaller
    than about 2 sd of this are noise.
    """
    vals = [frechet_distance(judge.features(judge.real(captions)), reference) for _ in range(draws)]
    return {"n": len(captions), "draws": draws, "mean": float(np.mean(vals)), "sd": float(np.std(vals, ddof=1))}


def fd_bootstrap_sd(features: np.ndarray, reference: np.ndarray, draws: int = 10, seed: int = 0) -> float:
    """Bootstrap sd of FD(features, reference) over resamples of the generated set."""
    rng = np.random.default_rng(seed)
    vals = [frechet_distance(features[rng.integers(0, len(features), len(features))], reference) for _ in range(draws)]
    return float(np.std(vals, ddof=1))


def faithfulness(reading: dict, captions) -> dict:
    """Condition faithfulness of judge readings: source accuracy, geometry and sepia errors (with se)."""
    n = len(captions)
    truth = np.array([c.source for c in captions])
    hit = (reading["source"] == truth).astype(float)
    geo = np.abs(reading["geometry"] - J.geometry_target(list(captions))).mean(axis=1)
    sep = np.abs(reading["sepia"] - np.array([c.sepia for c in captions]))
    acc = float(hit.mean())
    return {"acc": acc, "acc_se": math.sqrt(max(acc * (1 - acc), 1.0 / n) / n),
            "geo_err": float(geo.mean()), "geo_err_se": float(geo.std(ddof=1) / math.sqrt(n)),
            "sepia_err": float(sep.mean()), "sepia_err_se": float(sep.std(ddof=1) / math.sqrt(n)),
            "_geo": geo}


def per_sample_mse(latents, reference) -> np.ndarray:
    """Mean squared difference per sample [N] (same noise, same condition)."""
    a = np.asarray(latents, np.float64).reshape(len(latents), -1)
    b = np.asarray(reference, np.float64).reshape(len(reference), -1)
    return ((a - b) ** 2).mean(axis=1)


def l2_per_sample(a, b) -> np.ndarray:
    """||a_i - b_i|| per sample [N] (paper Table 3's d(x_v, x_v_hat))."""
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    return np.linalg.norm(a - b, axis=1)


def power_law_fit(n: np.ndarray, err: np.ndarray) -> tuple[float, float]:
    """(a, b) of err ~ a * n^-b by least squares in log-log."""
    slope, intercept = np.polyfit(np.log(np.asarray(n, float)), np.log(np.asarray(err, float)), 1)
    return float(math.exp(intercept)), float(-slope)


# =========================================================================== conditions (captions)

def source_of(prompt: str) -> int:
    return parse_prompt(prompt).source


def same_source(kb, ids: np.ndarray, labels) -> float:
    """Share of retrieved neighbours whose caption names the query's source."""
    entries = kb.entries
    return float(np.mean([source_of(entries[int(i)][0]) == y for row, y in zip(ids, labels) for i in row]))


# =========================================================================== decisions

def not_worse_fd(a: dict, b: dict) -> bool:
    """FD of a not above FD of b by more than 2 combined bootstrap sd."""
    return a["fd"] <= b["fd"] + 2.0 * math.hypot(a["fd_sd"], b["fd_sd"])


def not_worse_acc(a: dict, b: dict) -> bool:
    """Accuracy of a not below b by more than 2 combined binomial standard errors."""
    return a["acc"] >= b["acc"] - 2.0 * math.hypot(a["acc_se"], b["acc_se"])


def paired_verdict(lower_is_better_a: np.ndarray, b: np.ndarray) -> str:
    """'win' / 'loss' / 'tie' for per-sample values of a vs b (paired mean difference beyond 2 se)."""
    d = np.asarray(lower_is_better_a, np.float64) - np.asarray(b, np.float64)
    se = d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else 0.0
    if d.mean() + 2 * se < 0:
        return "win"
    if d.mean() - 2 * se > 0:
        return "loss"
    return "tie"


def verdict_fd(a: dict, b: dict) -> str:
    tol = 2.0 * math.hypot(a["fd_sd"], b["fd_sd"])
    return "win" if a["fd"] < b["fd"] - tol else "loss" if a["fd"] > b["fd"] + tol else "tie"


def verdict_acc(a: dict, b: dict) -> str:
    tol = 2.0 * math.hypot(a["acc_se"], b["acc_se"])
    return "win" if a["acc"] > b["acc"] + tol else "loss" if a["acc"] < b["acc"] - tol else "tie"


def verdict_p95(a: dict, b: dict, a_mse: np.ndarray, b_mse: np.ndarray, draws: int = 200) -> str:
    """Bootstrap (paired resampling) verdict on the 95th percentile of per-sample MSE."""
    rng = np.random.default_rng(0)
    n = len(a_mse)
    diffs = []
    for _ in range(draws):
        idx = rng.integers(0, n, n)
        diffs.append(np.percentile(a_mse[idx], 95) - np.percentile(b_mse[idx], 95))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return "win" if hi < 0 else "loss" if lo > 0 else "tie"


# =========================================================================== configuration

@dataclasses.dataclass
class Config:
    steps: int = 10                      # T: the full schedule (KB trajectories, reference)
    cfg: float = 3.0
    scheduler: str = "normal"
    samplers: tuple = ("euler", "dpmpp_2m", "ipndm")
    kb_sizes: dict = dataclasses.field(default_factory=lambda: {"euler": 20000, "dpmpp_2m": 2000, "ipndm": 2000})
    queries: int = 200
    key_step: int = 2
    budgets: tuple = (3, 4, 5, 6)        # ReDi NFE = k + T - v -> v = k + T - NFE
    plain_extra: dict = dataclasses.field(default_factory=lambda: {"euler": (7, 8)})
    h_main: tuple = (1, 3, 16)
    h_extra: tuple = (2, 64)             # at the half-NFE budget only
    h_claim: int = 3                     # the pre-declared H for the goals
    half_nfe: int = 5
    kb_seed: int = 7
    foreign_seed_base: int = 1_000_000
    reference_renders: int = 5           # real renderings per query caption in the FD reference
    setting_extra_steps: tuple = (20, 40)  # plain euler beyond T: is T converged?
    kb_size_ablation: tuple = (625, 1250, 2500, 5000, 10000, 20000)
    gap_values: tuple = (2, 3, 4, 5, 6, 7, 8, 9)   # v for the k-v ablation (k = key_step)
    key_values: tuple = (1, 2, 3, 4, 5)            # k for the key-step ablation at fixed gap
    key_gap: int = 4
    cond_key_budgets: tuple = (4, 6)
    style_queries: int = 100
    style_value_steps: tuple = (3, 5)    # v for stylization (k = key_step); the prompt switches at v
    tstitch_fractions: tuple = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    soft_budget_s: float = 50 * 60       # stop adding experiments when the next would exceed this
    smoke: bool = False

    @classmethod
    def smoke_config(cls) -> Config:
        return cls(samplers=("euler",), kb_sizes={"euler": 40}, queries=20, budgets=(5,), plain_extra={},
                   h_main=(1, 3), h_extra=(), reference_renders=2, setting_extra_steps=(20,),
                   kb_size_ablation=(20, 40), gap_values=(6, 7), key_values=(2, 3), cond_key_budgets=(5,),
                   style_queries=10, style_value_steps=(4,), tstitch_fractions=(0.0, 0.4, 1.0),
                   soft_budget_s=150, smoke=True)

    def value_step(self, nfe: int, k: int | None = None) -> int:
        k = self.key_step if k is None else k
        return k + self.steps - nfe


# =========================================================================== the bench: models, runs, metrics

GUARD_OFF = 1e9


class Skip(Exception):
    """An experiment left out because the time budget would be exceeded."""


class Bench:
    def __init__(self, cfg: Config, precision: str, scratch: Path, fresh: bool, t_start: float):
        import torch

        from kb_tools import comfy_sampling as cs
        from kb_tools import redi

        self.torch, self.cs, self.redi = torch, cs, redi
        self.cfg = cfg
        self.t_start = t_start
        self.precision = precision
        large, small, _ = load_models()
        if precision == "bf16":  # the demo's --precision bf16: autocast through ComfyUI's unet wrapper
            large, small = bf16_autocast(large), bf16_autocast(small)
        self.large, self.small = large, small
        self.enc = encode
        self.scratch = scratch
        if fresh and scratch.exists():
            shutil.rmtree(scratch)
        scratch.mkdir(parents=True, exist_ok=True)
        self.judge = Judge()
        # FD reference: several real renderings (held-out digits, jittered crops) of the query captions.
        self.query_captions = sample_captions(cfg.queries, "heldout")
        self.real_features = np.concatenate([self.judge.features(self.judge.real(self.query_captions))
                                             for _ in range(cfg.reference_renders)])
        self.image_steps = 0           # UNet batch-item steps run (cost accounting)
        self.model_seconds = 0.0
        self.kbs: dict = {}
        self.refs: dict = {}
        self._warm()

    # ------------------------------------------------------------------ bookkeeping
    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def rate(self) -> float:
        """Seconds per image-step measured so far (a prior of 10 ms before anything ran)."""
        return self.model_seconds / self.image_steps if self.image_steps > 200 else 0.010

    def afford(self, image_steps: int, what: str) -> None:
        """Raise Skip if `image_steps` more model work would push the run past the soft budget."""
        need = image_steps * self.rate() * 1.15
        if self.elapsed() + need > self.cfg.soft_budget_s:
            raise Skip(f"{what}: needs ~{need:.0f} s of sampling ({image_steps} image-steps at "
                       f"{1000 * self.rate():.1f} ms each), only {self.cfg.soft_budget_s - self.elapsed():.0f} s "
                       f"of the {self.cfg.soft_budget_s / 60:.0f}-minute budget left")

    def _count(self, items: int, steps: int, seconds: float) -> None:
        self.image_steps += items * steps
        self.model_seconds += seconds

    def _warm(self) -> None:
        for model in (self.large, self.small):
            self.plain("euler", 2, ["digit 0"], [0], model=model)
        self.image_steps, self.model_seconds = 0, 0.0

    # ------------------------------------------------------------------ conditions
    def conds(self, prompts: list[str]):
        pos = self.redi.batch_conditioning([self.enc(p) for p in prompts])
        neg = self.redi.batch_conditioning([self.enc("")] * len(prompts))
        return pos, neg

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

    # ------------------------------------------------------------------ sampling through the pack's code
    def plain(self, sampler: str, steps: int, prompts: list[str], seeds: list[int], *, model=None,
              record=()) -> tuple:
        """(latent [B,3,16,16], {step: latent} for `record`, NFE per item, seconds) on an `steps`-step schedule."""
        torch, cs = self.torch, self.cs
        model = self.large if model is None else model
        latent = torch.zeros((len(prompts), *LATENT_SHAPE))
        pos, neg = self.conds(prompts)
        sigmas = cs.schedule_sigmas(model, sampler, self.cfg.scheduler, steps)
        t = time.perf_counter()
        out, records, evals = cs.sample_stitched([cs.Segment(model, pos, neg, 0, steps)], latent=latent,
                                                 noise=cs.seeded_noise(latent, seeds), cfg=self.cfg.cfg,
                                                 sampler_name=sampler, sigmas=sigmas, seed=int(seeds[0]),
                                                 record_steps=list(record))
        dt = time.perf_counter() - t
        self._count(len(prompts), steps, dt)
        return out.float(), records, int(evals[0]), dt

    def reference(self, sampler: str, protocol: str) -> dict:
        """The full-step plain run of the query set, with its trajectory at every stored step (cached)."""
        key = (sampler, protocol)
        if key not in self.refs:
            prompts, seeds, labels = self.query_set(protocol)
            out, records, nfe, dt = self.plain(sampler, self.cfg.steps, prompts, seeds,
                                               record=range(1, self.cfg.steps))
            self.refs[key] = {"out": out, "traj": records, "nfe": nfe, "seconds": dt, "prompts": prompts,
                              "seeds": seeds, "labels": labels, "captions": self.query_captions[:len(prompts)]}
        return self.refs[key]

    def kb_path(self, sampler: str, n: int | None = None, tag: str = "") -> Path:
        c = self.cfg
        name = f"kb_{sampler}_T{c.steps}_cfg{c.cfg:g}_s{c.kb_seed}_{self.precision}"
        return self.scratch / (name + (f"_sub{n}" if n is not None else "") + (f"_{tag}" if tag else ""))

    def knowledge_base(self, sampler: str, n: int) -> dict:
        """Build (or resume from the .scratch cache) the fixed-seed KB of `n` train captions."""
        name = sampler
        if name in self.kbs and len(self.kbs[name]["kb"]) >= n:
            return self.kbs[name]
        c = self.cfg
        path = self.kb_path(sampler)
        prompts = [cap.prompt() for cap in sample_captions(n, "train")]
        spec = self.redi.BuildSpec(prompts=prompts, seeds=[c.kb_seed], sampler=sampler, scheduler=c.scheduler,
                                   steps=c.steps, cfg=c.cfg, store_steps=list(range(1, c.steps)),
                                   latent_shape=LATENT_SHAPE, batch_size=250, dtype="float32", commit_every=500)
        sidecar = path.parent / (path.name + ".build.json")
        history = json.loads(sidecar.read_text()) if sidecar.exists() else {"seconds": 0.0, "added": 0}
        report = self.redi.build_knowledge_base(str(path), self.large, self.enc, spec)
        if report.added:
            self._count(report.added, c.steps, report.seconds)
            history = {"seconds": history["seconds"] + report.seconds, "added": history["added"] + report.added}
            sidecar.write_text(json.dumps(history))
        info = {"kb": report.kb, "entries": len(report.kb), "added_this_run": report.added,
                "build_seconds_this_run": round(report.seconds, 1), "build_seconds_total": round(history["seconds"], 1),
                "ms_per_trajectory": round(1000 * history["seconds"] / max(1, history["added"]), 1),
                "evaluations_this_run": report.evaluations, "cached": report.added == 0}
        self.kbs[name] = info
        return info

    def sub_kb(self, sampler: str, n: int, ids: np.ndarray | None = None, tag: str = ""):
        """A subset of the sampler's KB: n random entries, or the given ids (KnowledgeBase.create + append)."""
        from kb_tools.kb import KnowledgeBase

        big = self.kbs[sampler]["kb"]
        if ids is None and n >= len(big):
            return big
        path = self.kb_path(sampler, n, tag)
        if (path / "manifest.json").exists() or path.exists():
            shutil.rmtree(path)
        if ids is None:
            ids = np.sort(np.random.default_rng(n).choice(len(big), size=n, replace=False))
        sub = KnowledgeBase.create(str(path), big.settings, dtype=big.dtype)
        entries = big.entries
        sub.append({s: big.latents(s, ids) for s in big.stored_steps}, [entries[i][0] for i in ids],
                   [entries[i][1] for i in ids])
        return sub

    # ------------------------------------------------------------------ ReDi through the pack's code
    def partial(self, kb, prompts, seeds, k):
        torch = self.torch
        pos, neg = self.conds(prompts)
        zeros = torch.zeros((len(prompts), *LATENT_SHAPE))
        t = time.perf_counter()
        state = self.redi.partial_sample(kb, self.large, pos, neg, zeros, list(seeds), k)
        dt = time.perf_counter() - t
        self._count(len(prompts), k, dt)
        return state, dt

    def resume(self, state, blended, prompts, h, threshold):
        pos, neg = self.conds(prompts)
        t = time.perf_counter()
        rep = self.redi.resume_sample(state, blended, self.large, pos, neg, h=h, threshold=threshold)
        dt = time.perf_counter() - t
        n_acc = sum(rep.accepted)
        steps = self.cfg.steps
        self._count(len(prompts), 0, dt)
        self.image_steps += n_acc * (steps - state.value_step) + (len(prompts) - n_acc) * (steps - state.key_step)
        return rep, dt

    def redi_sweep(self, sampler: str, protocol: str, kb, k: int, hs, vs, threshold=GUARD_OFF,
                   tag: str = "") -> list[dict]:
        """partial_sample once, then for each H retrieve, for each v blend + resume; one metrics row each."""
        ref = self.reference(sampler, protocol)
        prompts, seeds, labels = ref["prompts"], ref["seeds"], ref["labels"]
        state, t_partial = self.partial(kb, prompts, seeds, k)
        rows = []
        for h in hs:
            t = time.perf_counter()
            st = self.redi.retrieve_neighbours(state, h)
            t_retr = time.perf_counter() - t
            for v in vs:
                t = time.perf_counter()
                blended, st2 = self.redi.blend_value(st, v, "lstsq")
                t_blend = time.perf_counter() - t
                rep, t_res = self.resume(st2, blended, prompts, h, threshold)
                acc_mask = np.array(rep.accepted)
                nfe = np.where(acc_mask, k + self.cfg.steps - v, self.cfg.steps)
                row = {"method": "redi", "sampler": sampler, "protocol": protocol, "k": k, "v": v, "h": h,
                       "nominal_nfe": k + self.cfg.steps - v, "nfe": float(nfe.mean()), "kb_entries": len(kb),
                       "guard": "off" if threshold >= GUARD_OFF else ("auto" if threshold < 0 else threshold),
                       "guard_threshold": float(rep.threshold), "accepted": float(acc_mask.mean()),
                       "same_source_neighbours": same_source(kb, st.neighbours.ids, labels),
                       "seconds": {"partial": t_partial, "retrieve": t_retr, "blend": t_blend, "resume": t_res,
                                   "total": t_partial + t_retr + t_blend + t_res}, "tag": tag}
                row.update(self.metrics(rep.latent, ref["captions"], ref["out"], xv_true=ref["traj"].get(v), xv_hat=blended,
                                        residual=st2.residual, centered=st2.centered_residual))
                rows.append(row)
        return rows

    # ------------------------------------------------------------------ metrics of one output set
    def metrics(self, out, captions, ref_out, *, xv_true=None, xv_hat=None, residual=None, centered=None,
                reference=None) -> dict:
        out = np.asarray(out, np.float32)
        reading = self.judge.read(out)
        feats = reading["features"]
        reference = self.real_features if reference is None else reference
        m = {"fd": frechet_distance(feats, reference), "fd_sd": fd_bootstrap_sd(feats, reference),
             "finite": bool(np.isfinite(out).all())}
        m.update(faithfulness(reading, captions))
        if ref_out is not None:
            mse = per_sample_mse(out, ref_out)
            m.update({"mse_mean": float(mse.mean()), "mse_se": float(mse.std(ddof=1) / math.sqrt(len(mse))),
                      "mse_p95": float(np.percentile(mse, 95)),
                      "mse_worst5_mean": float(np.sort(mse)[-max(1, len(mse) // 20):].mean()), "_mse": mse})
        if xv_true is not None and xv_hat is not None:
            d = l2_per_sample(np.asarray(xv_hat), np.asarray(xv_true))
            m.update({"d_xv_mean": float(d.mean()), "d_xv_rel": float((d / np.linalg.norm(
                np.asarray(xv_true, np.float64).reshape(len(d), -1), axis=1)).mean())})
        if residual is not None:
            m["residual_rel_mean"] = float(np.mean(residual))
        if centered is not None:
            m["residual_centered_mean"] = float(np.mean(centered))
        return m

    def plain_row(self, sampler: str, protocol: str, steps: int) -> dict:
        ref = self.reference(sampler, protocol)
        if steps == self.cfg.steps:
            out, nfe, dt = ref["out"], ref["nfe"], ref["seconds"]
        else:
            out, _, nfe, dt = self.plain(sampler, steps, ref["prompts"], ref["seeds"])
        row = {"method": "plain", "sampler": sampler, "protocol": protocol, "nfe": float(nfe), "nominal_nfe": steps,
               "seconds": {"total": dt}}
        row.update(self.metrics(out, ref["captions"], ref["out"]))
        return row


# =========================================================================== experiments

def exp_setting(b: Bench, sampler: str) -> dict:
    """Is the question real? The plain sampler at the reduced budgets, at T and beyond, against the FD noise floor."""
    c = b.cfg
    steps = sorted(set(c.budgets) | {c.steps} | set(c.setting_extra_steps))
    out: dict = {"sampler": sampler, "protocol": "foreign", "rows": []}
    b.afford(c.queries * sum(steps), f"setting check {sampler}")
    ref = b.reference(sampler, "foreign")
    longest = max(steps)
    runs = {}
    for n in steps:
        lat = ref["out"] if n == c.steps else b.plain(sampler, n, ref["prompts"], ref["seeds"])[0]
        runs[n] = np.asarray(lat, np.float32)
    for n in steps:
        row = {"steps": n}
        row.update(b.metrics(runs[n], ref["captions"], runs[longest]))
        out["rows"].append(row)
    # How far apart two seeds of one caption are (the diversity a caption leaves open).
    fixed = b.reference(sampler, "fixed")["out"]
    out["mse_between_seeds_same_caption"] = float(per_sample_mse(fixed, runs[c.steps]).mean())
    low = next(r for r in out["rows"] if r["steps"] == min(c.budgets))
    full = next(r for r in out["rows"] if r["steps"] == c.steps)
    out["lowest_budget_worse_fd"] = not not_worse_fd(low, full)
    out["lowest_budget_fd_gap_in_sd"] = (low["fd"] - full["fd"]) / math.hypot(low["fd_sd"], full["fd_sd"])
    return out


def exp_equal_nfe(b: Bench, sampler: str, protocol: str, hs) -> dict:
    """Plain at every budget and T, and ReDi (guard off) at every budget for each H."""
    c = b.cfg
    kb = b.kbs[sampler]["kb"]
    budgets = list(c.budgets)
    plain_steps = sorted(set(budgets) | set(c.plain_extra.get(sampler, ())) | {c.steps})
    cost = c.queries * (c.steps + sum(s for s in plain_steps if s != c.steps) + c.key_step
                        + len(hs) * sum(c.steps - c.value_step(n) for n in budgets))
    b.afford(cost, f"equal-NFE {sampler} {protocol}")
    rows = [b.plain_row(sampler, protocol, s) for s in plain_steps]
    rows += b.redi_sweep(sampler, protocol, kb, c.key_step, hs, [c.value_step(n) for n in budgets], tag="equal_nfe")
    return {"sampler": sampler, "protocol": protocol, "rows": rows}


def exp_extra_h(b: Bench, sampler: str) -> list[dict]:
    c = b.cfg
    if not c.h_extra:
        return []
    b.afford(c.queries * (c.key_step + len(c.h_extra) * (c.steps - c.value_step(c.half_nfe))), f"H {c.h_extra} {sampler}")
    return b.redi_sweep(sampler, "fixed", b.kbs[sampler]["kb"], c.key_step, c.h_extra, [c.value_step(c.half_nfe)],
                        tag="extra_h")


def cond_neighbours(b: Bench, kb, state, h: int, q_prompts: list[str]):
    """Top-h KB entries by nearest CONDITION embedding (NIRVANA / CLIP-style key), weights fit in that space."""
    import dataclasses as dc

    from kb_tools import retrieval as R

    prompts = [p for p, _ in kb.entries]
    emb_kb = condition_embedding(prompts).astype(np.float64)
    emb_q = condition_embedding(q_prompts).astype(np.float64)
    d2 = (emb_q ** 2).sum(1)[:, None] + (emb_kb ** 2).sum(1)[None] - 2 * emb_q @ emb_kb.T
    ids = np.argsort(d2, axis=1)[:, :h]
    dist = np.sqrt(np.maximum(np.take_along_axis(d2, ids, 1), 0))
    keys = emb_kb[ids]
    mean = emb_kb.mean(0)
    spread = float(np.sqrt(np.mean(np.sum((emb_kb - mean) ** 2, axis=1))))
    w = np.stack([R.solve_weights(q, k) for q, k in zip(emb_q, keys)])
    rel = np.array([R.relative_residual(q, k, wi) for q, k, wi in zip(emb_q, keys, w)])
    cen = np.array([R.centered_residual(q, k, wi, spread) for q, k, wi in zip(emb_q, keys, w)])
    nb = R.Neighbours(state.key_step, ids.astype(np.int64), dist.astype(np.float32), emb_q.astype(np.float32),
                      keys.astype(np.float32), mean.astype(np.float32), spread, w, rel, cen)
    return dc.replace(state, neighbours=nb)


def trajectory_residual(kb, state, ids: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Theorem 5.3's observable term for any neighbours: ||x_k - sum w key_k|| (relative, centered)."""
    from kb_tools import retrieval as R

    q = state.query.numpy().reshape(len(ids), -1).astype(np.float64)
    keys = kb.keys_flat(state.key_step, ids.reshape(-1)).reshape(len(ids), ids.shape[1], -1).astype(np.float64)
    spread = R.key_spread(kb, state.key_step)
    rel = np.array([R.relative_residual(qi, ki, wi) for qi, ki, wi in zip(q, keys, weights)])
    cen = np.array([R.centered_residual(qi, ki, wi, spread) for qi, ki, wi in zip(q, keys, weights)])
    return rel, cen


def exp_cond_key(b: Bench, sampler: str = "euler") -> dict:
    """Paper Table 3: trajectory key vs condition-embedding key, same KB values, guard off."""
    import dataclasses as dc

    from kb_tools import retrieval as R

    c = b.cfg
    kb = b.kbs[sampler]["kb"]
    vs = [c.value_step(n) for n in c.cond_key_budgets]
    variants = [("condition key, lstsq on embeddings", c.h_claim, "lstsq"),
                ("condition key, uniform weights", c.h_claim, "uniform"),
                ("condition key, nearest only", 1, "uniform")]
    b.afford(c.queries * (c.key_step + len(variants) * sum(c.steps - v for v in vs)), "condition-key comparison")
    ref = b.reference(sampler, "fixed")
    prompts, labels = ref["prompts"], ref["labels"]
    state, _ = b.partial(kb, prompts, ref["seeds"], c.key_step)
    rows = []
    for name, h, mode in variants:
        st = cond_neighbours(b, kb, state, h, prompts)
        for v in vs:
            if mode == "lstsq":
                blended, st2 = b.redi.blend_value(st, v, "lstsq")
                weights = np.stack([R.solve_weights(q, k) for q, k in zip(st.neighbours.query, st.neighbours.keys)])
            else:
                ids = st.neighbours.ids
                weights = np.full(ids.shape, 1.0 / ids.shape[1])
                values = kb.latents(v, ids.reshape(-1)).reshape(*ids.shape, *kb.latent_shape)
                blended = b.torch.from_numpy(np.stack([R.blend(vv, w) for vv, w in zip(values, weights)])
                                             .astype(np.float32))
                st2 = dc.replace(st, value_step=v, weight_mode="uniform", residual=st.neighbours.residual,
                                 centered_residual=st.neighbours.centered_residual)
            rel, cen = trajectory_residual(kb, state, st.neighbours.ids, weights)
            rep, dt = b.resume(st2, blended, prompts, h, GUARD_OFF)
            row = {"method": name, "sampler": sampler, "protocol": "fixed", "k": c.key_step, "v": v, "h": h,
                   "nominal_nfe": c.key_step + c.steps - v, "nfe": float(c.key_step + c.steps - v),
                   "same_source_neighbours": same_source(kb, st.neighbours.ids, labels)}
            row.update(b.metrics(rep.latent, ref["captions"], ref["out"], xv_true=ref["traj"][v], xv_hat=blended,
                                 residual=rel, centered=cen))
            rows.append(row)
    return {"sampler": sampler, "rows": rows}


def find_row(rows, **kw) -> dict | None:
    for r in rows:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def exp_ablations(b: Bench, sampler: str, have: list[dict]) -> dict:
    """KB size, k-v gap, key step (H from experiment 1), each with the residual beside the error."""
    c = b.cfg
    h = c.h_claim
    v_half = c.value_step(c.half_nfe)
    out: dict = {"sampler": sampler, "protocol": "fixed", "h": h, "k": c.key_step, "nfe": c.half_nfe}
    # --- KB size (random subsets of the full KB, as the paper's ablation)
    full = len(b.kbs[sampler]["kb"])
    sizes = [n for n in c.kb_size_ablation if n < full]
    b.afford(len(sizes) * c.queries * (c.key_step + c.steps - v_half), "KB-size ablation")
    rows = []
    for n in sizes:
        rows += b.redi_sweep(sampler, "fixed", b.sub_kb(sampler, n), c.key_step, [h], [v_half], tag="kb_size")
    rows.append(find_row(have, method="redi", sampler=sampler, protocol="fixed", k=c.key_step, v=v_half, h=h,
                         tag="equal_nfe"))
    out["kb_size"] = {"rows": rows}
    plain = find_row(have, method="plain", sampler=sampler, protocol="fixed", nominal_nfe=c.half_nfe)
    ns = np.array([r["kb_entries"] for r in rows], float)
    fits = {}
    for metric in ("mse_mean", "d_xv_mean"):
        if len(ns) >= 2:
            a, e = power_law_fit(ns, [r[metric] for r in rows])
            fits[metric] = {"a": a, "b": e}
    if "mse_mean" in fits and plain is not None:
        a, e = fits["mse_mean"]["a"], fits["mse_mean"]["b"]
        target = plain["mse_mean"]
        n_par = (a / target) ** (1.0 / e) if e > 0 else None
        beats = [int(r["kb_entries"]) for r in rows if paired_verdict(r["_mse"], plain["_mse"]) == "win"]
        fits["parity"] = {
            "plain_nfe": c.half_nfe, "plain_mse_mean": target, "kb_entries_for_parity": n_par,
            "extrapolated": n_par is None or not (min(ns) <= n_par <= max(ns)),
            "smallest_kb_tested": int(min(ns)), "kb_sizes_beating_plain_mse": beats,
            "fd_by_size": {int(r["kb_entries"]): r["fd"] for r in rows}, "plain_fd": plain["fd"],
            "fd_verdict_by_size": {int(r["kb_entries"]): verdict_fd(r, plain) for r in rows},
            "note": "KB size at which the fitted ReDi MSE-to-full equals the plain sampler's at equal NFE; "
                    "'extrapolated' when outside the sizes measured"}
    out["kb_size"]["fit"] = fits
    # --- k-v gap at fixed k (v = k means no step skipped: the retrieval error alone)
    exp1 = [r for r in have if r.get("method") == "redi" and r["sampler"] == sampler and r["protocol"] == "fixed"
            and r.get("tag") in ("equal_nfe", "extra_h") and r["k"] == c.key_step]
    vs_have = {r["v"] for r in exp1 if r["h"] == h}
    todo = [v for v in c.gap_values if v not in vs_have and c.key_step <= v < c.steps]
    b.afford(c.queries * (c.key_step + sum(c.steps - v for v in todo)), "k-v gap ablation")
    rows = b.redi_sweep(sampler, "fixed", b.kbs[sampler]["kb"], c.key_step, [h], todo, tag="gap") if todo else []
    rows += [r for r in exp1 if r["h"] == h and r["v"] in c.gap_values]
    out["gap"] = {"k": c.key_step, "rows": sorted(rows, key=lambda r: r["v"])}
    # --- key step at fixed gap
    ks = [k for k in c.key_values if k + c.key_gap < c.steps]
    todo = [k for k in ks if k != c.key_step or (k + c.key_gap) not in vs_have]
    b.afford(c.queries * sum(c.steps - c.key_gap for _ in todo), "key-step ablation")
    rows = []
    for k in todo:
        rows += b.redi_sweep(sampler, "fixed", b.kbs[sampler]["kb"], k, [h], [k + c.key_gap], tag="key_step")
    if c.key_step in ks and c.key_step not in todo:
        rows.append(find_row(have, method="redi", sampler=sampler, protocol="fixed", k=c.key_step,
                             v=c.key_step + c.key_gap, h=h, tag="equal_nfe"))
    out["key_step"] = {"gap": c.key_gap, "rows": sorted(rows, key=lambda r: r["k"])}
    # --- H (from experiment 1 at the half-NFE budget)
    out["neighbours"] = {"rows": sorted([r for r in exp1 if r["v"] == v_half], key=lambda r: r["h"])}
    return out


def exp_tstitch(b: Bench, sampler: str = "euler") -> dict:
    """Quality and wall time vs the share of steps on the small model (kb_tools.tstitch.tstitch_sample)."""
    from kb_tools.tstitch import tstitch_sample

    c = b.cfg
    torch = b.torch
    b.afford(int(len(c.tstitch_fractions) * c.queries * c.steps * 0.8), "T-Stitch sweep")
    prompts, seeds, labels = b.query_set("foreign")
    pos, neg = b.conds(prompts)
    rows, ref = [], None
    for frac in c.tstitch_fractions:
        t = time.perf_counter()
        out, res = tstitch_sample(b.small, b.large, small_positive=pos, small_negative=neg, large_positive=pos,
                                  large_negative=neg, latent={"samples": torch.zeros((len(prompts), *LATENT_SHAPE))},
                                  seed=seeds[0], sampler_name=sampler, scheduler=c.scheduler, steps=c.steps,
                                  cfg=c.cfg, small_fraction=frac)
        dt = time.perf_counter() - t
        b._count(len(prompts), c.steps, dt)
        lat = out["samples"].float()
        if ref is None:
            ref = lat  # fraction 0 = large model only
        row = {"method": "tstitch", "sampler": sampler, "protocol": "foreign", "small_fraction": frac,
               "small_steps": res.small_steps, "small_evaluations": res.small_evaluations,
               "large_evaluations": res.large_evaluations, "seconds": {"total": dt},
               "params": {"small": res.small_parameters, "large": res.large_parameters}}
        row.update(b.metrics(lat, b.query_captions[:len(prompts)], ref))
        rows.append(row)
    t0 = rows[0]["seconds"]["total"]
    for r in rows:
        r["time_vs_large_only"] = r["seconds"]["total"] / t0
    return {"sampler": sampler, "protocol": "foreign (every query its own seed)", "reference": "fraction 0 (large only)",
            "rows": rows}


def exp_guard(b: Bench, sampler: str, have_fixed: list[dict]) -> dict:
    """Guard off (threshold 1e9) vs auto at the half-NFE budget, fixed-seed and foreign-seed protocols."""
    c = b.cfg
    h, v = c.h_claim, c.value_step(c.half_nfe)
    kb = b.kbs[sampler]["kb"]
    need_foreign = ("foreign" not in [r["protocol"] for r in have_fixed])
    cost = c.queries * (2 * c.key_step + 2 * c.steps)
    if need_foreign:
        cost += c.queries * (c.steps + c.half_nfe + c.steps)
    b.afford(cost, "guard comparison")
    out = {"sampler": sampler, "h": h, "k": c.key_step, "v": v, "rows": []}
    for protocol in ("fixed", "foreign"):
        off = find_row(have_fixed, method="redi", sampler=sampler, protocol=protocol, k=c.key_step, v=v, h=h,
                       tag="equal_nfe")
        if off is None:
            off = b.redi_sweep(sampler, protocol, kb, c.key_step, [h], [v], tag="guard")[0]
        auto = b.redi_sweep(sampler, protocol, kb, c.key_step, [h], [v], threshold=-1.0, tag="guard")[0]
        p_half = find_row(have_fixed, method="plain", sampler=sampler, protocol=protocol, nominal_nfe=c.half_nfe) or \
            b.plain_row(sampler, protocol, c.half_nfe)
        p_full = find_row(have_fixed, method="plain", sampler=sampler, protocol=protocol, nominal_nfe=c.steps) or \
            b.plain_row(sampler, protocol, c.steps)
        out["rows"] += [dict(off, role="redi guard off"), dict(auto, role="redi guard auto"),
                        dict(p_half, role=f"plain {c.half_nfe} steps"), dict(p_full, role=f"plain {c.steps} steps")]
        cmp = {}
        for metric in ("fd", "acc", "mse_mean", "mse_p95"):
            if metric == "fd":
                ver = verdict_fd(auto, p_half)
            elif metric == "acc":
                ver = verdict_acc(auto, p_half)
            elif metric == "mse_mean":
                ver = paired_verdict(auto["_mse"], p_half["_mse"])
            else:
                ver = verdict_p95(auto, p_half, auto["_mse"], p_half["_mse"])
            cmp[metric] = ver
        out[f"{protocol}_auto_vs_plain_half"] = cmp
        out[f"{protocol}_worst5"] = {"guard_off": off["mse_worst5_mean"], "guard_auto": auto["mse_worst5_mean"],
                                     f"plain_{c.half_nfe}": p_half["mse_worst5_mean"],
                                     "accepted_auto": auto["accepted"], "nfe_auto": auto["nfe"],
                                     "threshold_auto": auto["guard_threshold"]}
    return out


def exp_wallclock(b: Bench, rows: list[dict], samplers) -> dict:
    """ReDi time (partial + retrieve + blend + resume) vs the cheapest plain run of matched quality, per sampler.

    Matched on MSE-to-full (plain MSE <= ReDi MSE) and on FD (plain FD not worse than ReDi's
    beyond 2 combined sd, which favours the plain sampler); the T-step run when nothing cheaper matches.
    """
    c = b.cfg
    out = {"protocol": "fixed", "h": c.h_claim, "rows": []}
    for sampler in samplers:
        plains = sorted([r for r in rows if r["method"] == "plain" and r["sampler"] == sampler and r["protocol"] == "fixed"],
                        key=lambda r: r["nfe"])
        if not plains:
            continue
        for n in c.budgets:
            r = find_row(rows, method="redi", sampler=sampler, protocol="fixed", k=c.key_step, v=c.value_step(n),
                         h=c.h_claim, tag="equal_nfe")
            if r is None:
                continue
            by_mse = next((p for p in plains if p["mse_mean"] <= r["mse_mean"]), plains[-1])
            by_fd = next((p for p in plains if not_worse_fd(p, r)), plains[-1])
            s = r["seconds"]
            out["rows"].append({
                "sampler": sampler, "redi_nfe": n, "redi_mse": r["mse_mean"], "redi_fd": r["fd"], "redi_seconds": s["total"],
                "redi_seconds_split": {k: s[k] for k in ("partial", "retrieve", "blend", "resume")},
                "retrieval_blend_share": (s["retrieve"] + s["blend"]) / s["total"],
                "plain_nfe_matching": by_mse["nfe"], "plain_mse": by_mse["mse_mean"], "plain_seconds": by_mse["seconds"]["total"],
                "speedup_at_matched_quality": by_mse["seconds"]["total"] / s["total"],
                "plain_nfe_matching_fd": by_fd["nfe"], "plain_fd": by_fd["fd"],
                "speedup_at_matched_fd": by_fd["seconds"]["total"] / s["total"],
                "plain_full_seconds": plains[-1]["seconds"]["total"],
                "speedup_vs_full": plains[-1]["seconds"]["total"] / s["total"],
            })
    return out


def luminance_correlation(a, b) -> np.ndarray:
    """Per-sample Pearson correlation of the luminance of two image sets [N, 3, 16, 16] (layout similarity)."""
    w = np.array([0.299, 0.587, 0.114]).reshape(1, 3, 1, 1)
    la = (np.asarray(a, np.float64) * w).sum(1).reshape(len(a), -1)
    lb = (np.asarray(b, np.float64) * w).sum(1).reshape(len(b), -1)
    la -= la.mean(1, keepdims=True)
    lb -= lb.mean(1, keepdims=True)
    return (la * lb).sum(1) / np.sqrt((la ** 2).sum(1) * (lb ** 2).sum(1) + 1e-12)


def exp_stylize(b: Bench, sampler: str = "euler") -> dict:
    """Paper Fig. 4: content key, then content + style; against generating the styled caption directly.

    Style-free KB (the sampler KB's sepia-0 entries, as the paper's style-free KB), held-out
    content captions (sepia 0), styled caption = the same with "sepia 1.00", fixed seed.
    Scores: layout similarity (luminance correlation with the unstyled output of the same seed),
    style adherence (judge sepia reading, target 1), content faithfulness (judge source
    accuracy and crop-geometry error), FD against real styled crops of the captions.
    """
    import torch

    c = b.cfg
    n = c.style_queries
    big = b.kbs[sampler]["kb"]
    content = [cap.with_sepia(0.0) for cap in b.query_captions[:n]]
    styled = [cap.with_sepia(1.0) for cap in content]
    pc, ps = [x.prompt() for x in content], [x.prompt() for x in styled]
    seeds = [c.kb_seed] * n
    b.afford(n * (3 * c.steps + len(c.style_value_steps) * (c.key_step + c.steps)), "stylization")
    free_ids = np.array([i for i, (p, _) in enumerate(big.entries) if parse_prompt(p).sepia == 0.0])
    kb = b.sub_kb(sampler, len(free_ids), ids=free_ids, tag="stylefree")
    real_styled = np.concatenate([b.judge.features(b.judge.real(styled)) for _ in range(c.reference_renders)])
    unstyled, _, _, t_unstyled = b.plain(sampler, c.steps, pc, seeds)
    direct, _, _, t_direct = b.plain(sampler, c.steps, ps, seeds)

    def row(name, lat, nfe, seconds, **extra):
        lat = np.asarray(lat, np.float32)
        r = {"method": name, "nfe": float(nfe), "seconds": seconds}
        r.update(b.metrics(lat, styled, None, reference=real_styled))
        lay = luminance_correlation(lat, unstyled)
        r.update({"layout_similarity": float(lay.mean()), "layout_similarity_se": float(lay.std(ddof=1) / math.sqrt(n)),
                  "_layout": lay, "sepia_reading": float(b.judge.read(lat)["sepia"].mean())})
        r.update(extra)
        return r

    rows = [row("plain, content caption (unstyled reference)", unstyled, c.steps, t_unstyled),
            row("plain, styled caption (direct)", direct, c.steps, t_direct)]
    pos_c, neg = b.conds(pc)
    pos_s, _ = b.conds(ps)
    for v in c.style_value_steps:
        # Prompt switch without retrieval: content caption for the first v steps, styled caption after.
        latent = torch.zeros((n, *LATENT_SHAPE))
        sigmas = b.cs.schedule_sigmas(b.large, sampler, c.scheduler, c.steps)
        t = time.perf_counter()
        sw, _, _ = b.cs.sample_stitched([b.cs.Segment(b.large, pos_c, neg, 0, v), b.cs.Segment(b.large, pos_s, neg, v, c.steps)],
                                        latent=latent, noise=b.cs.seeded_noise(latent, seeds), cfg=c.cfg,
                                        sampler_name=sampler, sigmas=sigmas, seed=seeds[0])
        dt = time.perf_counter() - t
        b._count(n, c.steps, dt)
        rows.append(row(f"prompt switch at step {v} (no retrieval)", sw.float(), c.steps, dt, v=v))
        # ReDi stylization: key from the content caption, blend at v, resume with the styled caption.
        t = time.perf_counter()
        state, _ = b.partial(kb, pc, seeds, c.key_step)
        st = b.redi.retrieve_neighbours(state, c.h_claim)
        blended, st2 = b.redi.blend_value(st, v, "lstsq")
        rep, _ = b.resume(st2, blended, ps, c.h_claim, GUARD_OFF)
        dt = time.perf_counter() - t
        rows.append(row(f"ReDi: content key at k={c.key_step}, styled resume from v={v}", rep.latent,
                        c.key_step + c.steps - v, dt, v=v, k=c.key_step, h=c.h_claim,
                        residual_centered_mean=float(np.mean(st2.centered_residual))))
    direct_row = rows[1]
    verdicts = {}
    for r in rows[2:]:
        lay = paired_verdict(-r["_layout"], -direct_row["_layout"])  # higher similarity is better
        verdicts[r["method"]] = {
            "layout": lay,
            "style (sepia error)": "win" if r["sepia_err"] + 2 * math.hypot(r["sepia_err_se"], direct_row["sepia_err_se"]) < direct_row["sepia_err"]
            else ("loss" if r["sepia_err"] > direct_row["sepia_err"] + 2 * math.hypot(r["sepia_err_se"], direct_row["sepia_err_se"]) else "tie"),
            "content (source acc)": verdict_acc(r, direct_row), "fd": verdict_fd(r, direct_row)}
    return {"sampler": sampler, "protocol": f"fixed seed {c.kb_seed}", "queries": n, "style_free_kb_entries": len(kb),
            "style": "sepia 1.00 appended to the content caption", "rows": rows, "verdicts_vs_direct": verdicts}


def regime_map(b: Bench, rows: list[dict]) -> list[dict]:
    """ReDi (H = h_claim, guard off) vs plain at equal NFE: win / tie / loss per metric, budget, protocol."""
    c = b.cfg
    out = []
    for sampler in c.samplers:
        for protocol in ("fixed", "foreign"):
            for n in c.budgets:
                r = find_row(rows, method="redi", sampler=sampler, protocol=protocol, k=c.key_step,
                             v=c.value_step(n), h=c.h_claim, guard="off", tag="equal_nfe")
                p = find_row(rows, method="plain", sampler=sampler, protocol=protocol, nominal_nfe=n)
                if r is None or p is None:
                    continue
                out.append({"sampler": sampler, "protocol": protocol, "nfe": n,
                            "fd": verdict_fd(r, p), "acc": verdict_acc(r, p),
                            "mse_mean": paired_verdict(r["_mse"], p["_mse"]),
                            "mse_p95": verdict_p95(r, p, r["_mse"], p["_mse"]),
                            "geo_err": paired_verdict(r["_geo"], p["_geo"]),
                            "numbers": {"redi": {k: r[k] for k in ("fd", "acc", "geo_err", "mse_mean", "mse_p95")},
                                        "plain": {k: p[k] for k in ("fd", "acc", "geo_err", "mse_mean", "mse_p95")}}})
    return out


def goals(b: Bench, rows: list[dict], cond: dict | None, guard: dict | None) -> dict:
    c = b.cfg
    g: dict = {}
    # G1: equal NFE, FD and accuracy at least as good (within noise), >= 2 of 3 samplers
    per = {}
    for sampler in c.samplers:
        checks = []
        for n in c.budgets:
            r = find_row(rows, method="redi", sampler=sampler, protocol="fixed", k=c.key_step, v=c.value_step(n),
                         h=c.h_claim, guard="off", tag="equal_nfe")
            p = find_row(rows, method="plain", sampler=sampler, protocol="fixed", nominal_nfe=n)
            if r is None or p is None:
                continue
            checks.append({"nfe": n, "redi_fd": r["fd"], "plain_fd": p["fd"], "redi_acc": r["acc"], "plain_acc": p["acc"],
                           "fd_not_worse": not_worse_fd(r, p), "acc_not_worse": not_worse_acc(r, p),
                           "strict_fd": r["fd"] <= p["fd"], "strict_acc": r["acc"] >= p["acc"]})
        if checks:
            full = find_row(rows, method="plain", sampler=sampler, protocol="fixed", nominal_nfe=c.steps)
            per[sampler] = {"budgets": checks,
                            "budgets_passing": [x["nfe"] for x in checks if x["fd_not_worse"] and x["acc_not_worse"]],
                            "plain_full_fd": full["fd"] if full else None,
                            "plain_fd_by_nfe": {str(x["nfe"]): x["plain_fd"] for x in checks},
                            "passes": all(x["fd_not_worse"] and x["acc_not_worse"] for x in checks),
                            "passes_strict": all(x["strict_fd"] and x["strict_acc"] for x in checks)}
    passing = [s for s, v in per.items() if v["passes"]]
    lowest = [v for v in per.values() if v["plain_full_fd"] is not None]
    fd_falls_not = sum(1 for v in lowest if v["budgets"][0]["plain_fd"] > v["plain_full_fd"])
    g["equal_nfe_fd_acc_2_of_3"] = {
        "claim": "ReDi at equal NFE with FD and accuracy at least as good as plain for >= 2 of 3 samplers (fixed seed, "
                 f"H={c.h_claim}, every budget {list(c.budgets)}; 'as good' = not worse beyond 2 combined sd)",
        "met": len(passing) >= 2, "samplers_passing": passing, "samplers_tested": list(per),
        "samplers_passing_strict": [s for s, v in per.items() if v["passes_strict"]], "per_sampler": per,
        "fd_reading": (f"the plain sampler's FD at the lowest budget is above its own {c.steps}-step FD for {fd_falls_not} of "
                       f"{len(lowest)} samplers in the fixed-seed protocol (where fewer steps cost quality, ReDi has "
                       "something to win)")}
    # G2: half NFE vs full NFE on FD
    per = {}
    for sampler in c.samplers:
        r = find_row(rows, method="redi", sampler=sampler, protocol="fixed", k=c.key_step,
                     v=c.value_step(c.half_nfe), h=c.h_claim, guard="off", tag="equal_nfe")
        full = find_row(rows, method="plain", sampler=sampler, protocol="fixed", nominal_nfe=c.steps)
        half = find_row(rows, method="plain", sampler=sampler, protocol="fixed", nominal_nfe=c.half_nfe)
        if r is None or full is None:
            continue
        per[sampler] = {"redi_fd": r["fd"], "redi_fd_sd": r["fd_sd"], "plain_full_fd": full["fd"], "redi_acc": r["acc"],
                        "plain_full_acc": full["acc"], "redi_acc_not_worse": not_worse_acc(r, full),
                        "plain_full_fd_sd": full["fd_sd"], "redi_not_worse": not_worse_fd(r, full),
                        "redi_mse": r["mse_mean"],
                        "control_plain_half_fd": half["fd"] if half else None,
                        "control_plain_half_not_worse": not_worse_fd(half, full) if half else None,
                        "control_plain_half_mse": half["mse_mean"] if half else None}
    g["half_nfe_vs_full_fd"] = {
        "claim": f"ReDi at NFE {c.half_nfe} as good as plain at NFE {c.steps} on FD (fixed seed, H={c.h_claim})",
        "met": bool(per) and all(v["redi_not_worse"] for v in per.values()), "per_sampler": per,
        "informative": not all(v["control_plain_half_not_worse"] for v in per.values()) if per else None,
        "note": "control: if the plain sampler at the half NFE is also 'as good' on FD, the FD claim cannot "
                "distinguish ReDi from simply running fewer steps"}
    # G3: trajectory keys vs condition keys
    if cond is not None:
        comps = []
        for rr in cond["rows"]:
            t = find_row(rows, method="redi", sampler=cond["sampler"], protocol="fixed", k=rr["k"], v=rr["v"],
                         h=c.h_claim, guard="off", tag="equal_nfe")
            if t is None:
                continue
            comps.append({"variant": rr["method"], "nfe": rr["nominal_nfe"], "traj_d_xv": t["d_xv_mean"],
                          "cond_d_xv": rr["d_xv_mean"], "traj_fd": t["fd"], "cond_fd": rr["fd"], "traj_acc": t["acc"],
                          "cond_acc": rr["acc"], "traj_mse": t["mse_mean"], "cond_mse": rr["mse_mean"],
                          "d_xv_better": t["d_xv_mean"] < rr["d_xv_mean"], "fd_not_worse": not_worse_fd(t, rr),
                          "acc_not_worse": not_worse_acc(t, rr)})
        g["trajectory_vs_condition_keys"] = {
            "claim": "trajectory keys better than condition-embedding keys (lower d(x_v, x_v_hat), FD and accuracy not worse)",
            "met": bool(comps) and all(x["d_xv_better"] and x["fd_not_worse"] and x["acc_not_worse"] for x in comps),
            "comparisons": comps}
    else:
        g["trajectory_vs_condition_keys"] = {"met": None, "note": "not measured (skipped)"}
    # G4: guard never worse than plain
    if guard is not None:
        verdicts = {p: guard.get(f"{p}_auto_vs_plain_half") for p in ("fixed", "foreign")}
        g["guard_never_worse"] = {
            "claim": f"ReDi with the automatic guard never worse than plain at the same nominal NFE ({c.half_nfe}) "
                     "on FD, accuracy, mean and p95 per-sample MSE, in either protocol",
            "met": all(v != "loss" for d in verdicts.values() if d for v in d.values()), "verdicts": verdicts,
            "worst5": {p: guard.get(f"{p}_worst5") for p in ("fixed", "foreign")},
            "fd": {p: {row["role"]: row["fd"] for row in guard["rows"] if row["protocol"] == p} for p in ("fixed", "foreign")}}
    else:
        g["guard_never_worse"] = {"met": None, "note": "not measured (skipped)"}
    return g


# =========================================================================== run

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (1-2 min): structure check for CI")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default benchmarks/results/paper_claims.json; required-by-convention for --smoke)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads; 0 = auto: 2 on an idle machine, 1 when other jobs already load the 2 cores")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                   help="bf16: both UNets under bfloat16 autocast (embedded/demo.py's wrapper), ~2.5x faster here")
    p.add_argument("--scratch", type=Path, default=SCRATCH, help="cache folder for knowledge bases (gitignored)")
    p.add_argument("--fresh", action="store_true", help="delete the cached knowledge bases first (honest build times)")
    p.add_argument("--budget-min", type=float, default=None, help="soft time budget in minutes (default 50; smoke 2.5)")
    p.add_argument("--render", type=Path, default=None, metavar="JSON",
                   help="only rewrite paper_claims.md and the plots from an existing results JSON")
    return p


def main(argv=None) -> dict:
    a = parser().parse_args(argv)
    if a.render is not None:
        res = json.loads(a.render.read_text())
        write_markdown(res, RESULTS / "paper_claims.md")
        update_readme(RESULTS / "paper_claims.md", PACK / "README.md")
        write_plots(res, RESULTS)
        return res
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    cfg = Config.smoke_config() if a.smoke else Config()
    if a.budget_min is not None:
        cfg.soft_budget_s = 60.0 * a.budget_min
    threads = a.threads or (1 if load_before[0] > 1.0 else 2)
    out_path = a.out or (RESULTS / ("paper_claims_smoke.json" if a.smoke else "paper_claims.json"))
    scratch = a.scratch / ("smoke" if a.smoke else "full")
    setup_comfy(threads)
    import warnings

    warnings.filterwarnings("ignore", message=".*sqrtm.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import logging

    logging.getLogger("ReDi").setLevel(logging.ERROR)
    import torch

    b = Bench(cfg, a.precision, scratch, a.fresh, t_start)
    log = print if not a.smoke else (lambda *x, **k: None)
    res: dict = {"benchmark": "paper_claims", "smoke": a.smoke, "skipped": [], "experiments": {}}
    judge_meta = json.loads(read_weights("judge")[1].get("embedded_crops_judge", "{}"))
    res["setting"] = {
        "models": "embedded crops UNets (ComfyUI BaseModel, v-prediction, 3x16x16 latent = RGB image), large 64 ch / small 32 ch",
        "conditions": ("captions '<source> at <cx> <cy> size <z> [sepia <t>]': 18 sources (8 photographs, 10 digit "
                       "classes), continuous crop geometry and sepia strength; KB captions from the train split, queries "
                       f"from the held-out split ({cfg.queries} captions), drawn independently from one distribution"),
        "protocols": {"fixed": f"every KB trajectory and every query starts from seed {cfg.kb_seed} (official ReDi setup)",
                      "foreign": f"queries start from seeds {cfg.foreign_seed_base}+i, not in the KB (the KB is the fixed-seed one)"},
        "schedule": {"steps_T": cfg.steps, "scheduler": cfg.scheduler, "cfg": cfg.cfg, "key_step_k": cfg.key_step,
                     "nfe_budgets": list(cfg.budgets), "value_step_for_budget": {n: cfg.value_step(n) for n in cfg.budgets},
                     "redi_nfe": "k + (T - v); a guard-rejected item costs T", "half_nfe": cfg.half_nfe},
        "queries_per_set": cfg.queries, "samplers": list(cfg.samplers), "h_for_claims": cfg.h_claim,
        "precision": a.precision, "torch_threads": threads, "kb_sizes": cfg.kb_sizes,
        "judge": {"kind": "CNN (embedded.judge.JudgeNet) trained on rendered real crops of train captions / train digits",
                  "heldout": judge_meta.get("heldout"),
                  "fd_reference": f"{len(b.real_features)} real crops: {cfg.reference_renders} renderings of each query caption "
                                  "(held-out digits, jittered geometry)"},
        "noise_floor": {"fd_real_vs_real": fd_noise_floor(b.judge, b.query_captions, b.real_features),
                        "decision_rule": "a difference counts only beyond 2 combined sd (bootstrap sd for FD, binomial "
                                         "se for accuracy, paired se for per-sample MSE, paired bootstrap for p95)"},
    }
    rows: list[dict] = []
    exps = res["experiments"]

    def attempt(name: str, fn):
        t = time.perf_counter()
        try:
            value = fn()
            log(f"[{b.elapsed():6.0f} s] {name} done in {time.perf_counter() - t:.0f} s", flush=True)
            return value
        except Skip as e:
            res["skipped"].append({"experiment": name, "reason": str(e)})
            log(f"[{b.elapsed():6.0f} s] {name} SKIPPED: {e}", flush=True)
            return None

    # 0. is the question real: plain quality against steps
    exps["setting_check"] = {"per_sampler": {}}
    for sampler in cfg.samplers:
        got = attempt(f"0. setting check {sampler}", lambda s=sampler: exp_setting(b, s))
        if got:
            exps["setting_check"]["per_sampler"][sampler] = got
    # 1. equal NFE, fixed seed, per sampler (KB first)
    kb_info = {}
    for sampler in cfg.samplers:
        def run1(sampler=sampler):
            n = cfg.kb_sizes[sampler]
            if not (b.kb_path(sampler) / "manifest.json").exists():
                b.afford(n * cfg.steps, f"KB {sampler}")
            kb_info[sampler] = {k: v for k, v in b.knowledge_base(sampler, n).items() if k != "kb"}
            r = exp_equal_nfe(b, sampler, "fixed", cfg.h_main)["rows"]
            r += exp_extra_h(b, sampler)
            return r
        got = attempt(f"1. equal NFE {sampler} (fixed seed)", run1)
        if got:
            rows += got
    res["kb"] = kb_info
    # 2. trajectory vs condition key
    cond = attempt("2. trajectory vs condition key", lambda: exp_cond_key(b, cfg.samplers[0])) \
        if cfg.samplers[0] in b.kbs else None
    exps["condition_key"] = cond
    # 3. ablations
    abl = attempt("3. ablations", lambda: exp_ablations(b, cfg.samplers[0], rows)) if cfg.samplers[0] in b.kbs else None
    if abl:
        rows += [r for part in ("kb_size", "gap", "key_step") for r in abl[part]["rows"]
                 if r is not None and r.get("tag") in ("gap", "key_step", "kb_size") and all(r is not x for x in rows)]
    exps["ablations"] = abl
    # 4. stylization
    exps["stylization"] = attempt("4. stylization", lambda: exp_stylize(b, cfg.samplers[0])) \
        if cfg.samplers[0] in b.kbs else None
    # 5. T-Stitch
    exps["tstitch"] = attempt("5. T-Stitch", lambda: exp_tstitch(b, cfg.samplers[0]))
    # 6. guard and wall clock (euler; needs the foreign protocol for the guard)
    guard = None
    if cfg.samplers[0] in b.kbs:
        def run6():
            s = cfg.samplers[0]
            got = exp_equal_nfe(b, s, "foreign", (cfg.h_claim,))["rows"]
            rows.extend(got)
            return exp_guard(b, s, rows)
        guard = attempt("6. guard (+ foreign-seed equal NFE)", run6)
        exps["wallclock"] = exp_wallclock(b, rows, [x for x in cfg.samplers if x in b.kbs])
    exps["guard"] = guard
    # 7. regime map: foreign protocol for the other samplers
    for sampler in cfg.samplers[1:]:
        if sampler in b.kbs:
            got = attempt(f"7. equal NFE {sampler} (foreign seed)",
                          lambda s=sampler: exp_equal_nfe(b, s, "foreign", (cfg.h_claim,))["rows"])
            if got:
                rows += got
    exps["regime_map"] = regime_map(b, rows)
    res["goals"] = goals(b, rows, cond, guard)
    exps["equal_nfe"] = {"rows": [r for r in rows if r.get("tag") in (None, "equal_nfe", "extra_h")]}
    res["sampling_cost"] = {"image_steps": b.image_steps, "model_seconds": round(b.model_seconds, 1),
                            "ms_per_image_step": round(1000 * b.rate(), 2)}
    res["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    res["machine"] = {"loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
                      "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                      "platform": platform.platform()}
    clean = json.loads(json.dumps(_strip(res)))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(clean, indent=1))
    if not a.smoke:
        write_markdown(clean, RESULTS / "paper_claims.md")
        update_readme(RESULTS / "paper_claims.md", PACK / "README.md")
        write_plots(clean, RESULTS)
    log(f"wrote {out_path} in {res['wall_seconds']:.0f} s", flush=True)
    return clean


def _strip(x):
    """Drop private per-sample arrays (keys starting with '_') and round floats, recursively."""
    if isinstance(x, dict):
        return {str(k): _strip(v) for k, v in x.items() if not str(k).startswith("_")}
    if isinstance(x, (list, tuple)):
        return [_strip(v) for v in x]
    if isinstance(x, np.ndarray):
        return _strip(x.tolist())
    if isinstance(x, np.generic):
        return _strip(x.item())
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, float):
        return float(f"{x:.5g}") if math.isfinite(x) else None
    return x


# =========================================================================== outputs

def _fmt(x, nd=3):
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int,)) and not isinstance(x, bool):
        return str(x)
    ax = abs(x)
    if ax != 0 and (ax < 1e-2 or ax >= 1e4):
        return f"{x:.2e}"
    return f"{x:.{nd}g}"


def _met(v):
    return "**met**" if v is True else "**not met**" if v is False else "not measured"


def payoff_paragraph(res: dict) -> str:
    """'When should a user expect ReDi to pay off', assembled from the measured verdicts only."""
    s = res["setting"]
    rm = res["experiments"].get("regime_map") or []
    lines = []
    fixed = [r for r in rm if r["protocol"] == "fixed"]
    foreign = [r for r in rm if r["protocol"] == "foreign"]

    def tally(rs, metric):
        return {k: sum(1 for r in rs if r[metric] == k) for k in ("win", "tie", "loss")}

    if fixed:
        t = tally(fixed, "mse_mean")
        lines.append(f"With the official fixed-seed protocol (queries share the KB's starting noise), ReDi's per-sample "
                     f"fidelity to the full {s['schedule']['steps_T']}-step output at equal NFE won {t['win']}, tied {t['tie']} "
                     f"and lost {t['loss']} of {len(fixed)} sampler x budget cells.")
        tf, ta = tally(fixed, "fd"), tally(fixed, "acc")
        lines.append(f"On distribution quality: FD won {tf['win']} / tied {tf['tie']} / lost {tf['loss']}, "
                     f"source accuracy won {ta['win']} / tied {ta['tie']} / lost {ta['loss']}.")
    if foreign:
        t = tally(foreign, "mse_mean")
        lines.append(f"With query seeds that are not in the KB, the same comparison won {t['win']}, tied {t['tie']} and lost "
                     f"{t['loss']} of {len(foreign)} cells: retrieval then blends trajectories of a different noise, so the "
                     "output is a different sample, not a faster copy of the plain one.")
    g = res.get("goals", {}).get("guard_never_worse", {})
    w = (g.get("worst5") or {})
    if w.get("foreign"):
        lines.append(f"The automatic guard accepted {w['foreign']['accepted_auto']:.0%} of foreign-seed queries "
                     f"(NFE {w['foreign']['nfe_auto']:.3g}) and {w['fixed']['accepted_auto']:.0%} of fixed-seed ones "
                     f"(NFE {w['fixed']['nfe_auto']:.3g}), so it turns ReDi off exactly where it would produce a different sample.")
    wc = (res["experiments"].get("wallclock") or {}).get("rows") or []
    if wc:
        parts = []
        for sampler in dict.fromkeys(r["sampler"] for r in wc):
            rs = [r for r in wc if r["sampler"] == sampler]
            bm = max(rs, key=lambda r: r["speedup_at_matched_quality"])
            bf = max(rs, key=lambda r: r["speedup_at_matched_fd"])
            parts.append(f"{sampler} {bm['speedup_at_matched_quality']:.2f}x on MSE-to-full (ReDi NFE {bm['redi_nfe']} vs plain "
                         f"{bm['plain_nfe_matching']:g}), {bf['speedup_at_matched_fd']:.2f}x on FD (ReDi NFE {bf['redi_nfe']} vs "
                         f"plain {bf['plain_nfe_matching_fd']:g})")
        share = max(r["retrieval_blend_share"] for r in wc)
        lines.append("Wall clock at matched quality, retrieval and blending included (best budget per sampler): "
                     + "; ".join(parts) + f"; retrieval + blend took at most {share:.0%} of ReDi's time.")
    kb = ((res["experiments"].get("ablations") or {}).get("kb_size") or {}).get("fit", {})
    if kb.get("mse_mean"):
        lines.append(f"The error falls with KB size as N^-{kb['mse_mean']['b']:.2f}; {_parity_text(kb)}.")
    st = res["experiments"].get("stylization")
    if st:
        red = [r for r in st["rows"] if r["method"].startswith("ReDi")]
        direct = st["rows"][1]
        if red:
            r = max(red, key=lambda x: x["layout_similarity"])
            lines.append(f"Stylization (content key, styled resume): layout similarity to the unstyled image "
                         f"{r['layout_similarity']:.3f} vs {direct['layout_similarity']:.3f} when the styled caption is "
                         f"generated directly, sepia error {r['sepia_err']:.3f} vs {direct['sepia_err']:.3f}, at "
                         f"{r['nfe']:g} vs {direct['nfe']:g} NFE.")
    per = (res["experiments"].get("setting_check") or {}).get("per_sampler") or {}
    fixed_rm = [r for r in rm if r["protocol"] == "fixed"]
    if per and fixed_rm:
        def fd_wins(names):
            rs = [r for r in fixed_rm if r["sampler"] in names]
            return f"{sum(r['fd'] == 'win' for r in rs)} of {len(rs)}"
        worse = [n for n, sc in per.items() if sc["lowest_budget_worse_fd"]]
        flat = [n for n, sc in per.items() if not sc["lowest_budget_worse_fd"]]
        if worse:
            lines.append(f"Where the plain sampler degrades at few steps ({', '.join(worse)}: FD measurably worse at the lowest "
                         f"budget than at T), ReDi won FD in {fd_wins(worse)} fixed-seed budgets"
                         + (f"; where it does not ({', '.join(flat)}), ReDi won FD in {fd_wins(flat)}." if flat else "."))
    gv = (res.get("goals", {}).get("guard_never_worse") or {}).get("verdicts") or {}
    if gv.get("fixed"):
        losses = [m for m, v in gv["fixed"].items() if v == "loss"]
        if losses:
            lines.append(f"The automatic guard does not protect against a KB that is merely too sparse: with the fixed seed it "
                         f"accepted blends that lost to plain at the same NFE on {', '.join(losses)}.")
    lines.append(RULE_OF_THUMB)
    return " ".join(lines)


RULE_OF_THUMB = (
    "So expect ReDi to pay off when (1) generations reuse the seed(s) the KB was built with, (2) the KB covers the "
    "conditions densely (the error still fell with every doubling of the KB here), and (3) the sampler loses quality at "
    "the step count you want to afford (multistep solvers at very few steps); do not expect it with fresh random "
    "seeds (there the guard sends the query to the plain sampler), and with a sampler that is already good at few "
    "steps expect ties on distribution quality rather than gains.")


def _parity_text(fit: dict) -> str:
    par = fit.get("parity") or {}
    if not par:
        return "no parity estimate"
    if par.get("kb_sizes_beating_plain_mse") and par["smallest_kb_tested"] in par["kb_sizes_beating_plain_mse"]:
        fd_losses = [n for n, v in par.get("fd_verdict_by_size", {}).items() if v == "loss"]
        txt = (f"on MSE-to-full, parity with the plain sampler at NFE {par['plain_nfe']} is already passed at the smallest KB "
               f"tested ({par['smallest_kb_tested']} entries; the fit would put it at ~{_fmt(par['kb_entries_for_parity'])}, "
               "an extrapolation)")
        if fd_losses:
            txt += (f"; on FD no KB size reached parity (FD {min(par['fd_by_size'].values()):.3g}-{max(par['fd_by_size'].values()):.3g} "
                    f"vs plain {par['plain_fd']:.3g}), and FD barely moves with KB size, so a bigger KB would not close it")
        return txt
    n = par.get("kb_entries_for_parity")
    return (f"parity with the plain sampler at NFE {par['plain_nfe']} on MSE-to-full needs ~{_fmt(n)} entries"
            + (" (extrapolated beyond the sizes measured)" if par.get("extrapolated") else ""))


def write_markdown(res: dict, path: Path) -> None:
    s = res["setting"]
    ex = res["experiments"]
    floor = s["noise_floor"]["fd_real_vs_real"]
    jq = s["judge"].get("heldout") or {}
    L = ["# ReDi / T-Stitch paper claims on the embedded crops models", "",
         f"Generated by `benchmarks/paper_claims.py` in {res['wall_seconds'] / 60:.1f} min "
         f"(load {res['machine']['loadavg_before'][0]:.1f} -> {res['machine']['loadavg_after'][0]:.1f} on "
         f"{res['machine']['cpus']} CPUs, {s['precision']}, {s['torch_threads']} thread(s)). Full numbers: `paper_claims.json`.", "",
         "**Setting.** " + s["conditions"] + f". Euler / DPM-Solver++(2M) / iPNDM, T = {s['schedule']['steps_T']} steps, "
         f"{s['schedule']['scheduler']} schedule, cfg {s['schedule']['cfg']}, key step k = {s['schedule']['key_step_k']}, "
         f"ReDi NFE = k + (T - v), H = {s['h_for_claims']} for the claims, guard off unless stated (the paper has none). "
         f"Protocols: fixed = {s['protocols']['fixed']}; foreign = {s['protocols']['foreign']}.", "",
         f"**Metrics and noise floor.** FD in the judge CNN's 128-d feature space against {s['judge']['fd_reference']}; "
         f"a fresh real rendering of the {floor['n']} query captions scores FD {floor['mean']:.2f} +- {floor['sd']:.2f} "
         f"(what a perfect generator gets). Condition faithfulness from the same judge: source accuracy (18 sources), "
         f"geometry error (mean |error| of cx, cy, log size) and sepia error; on real held-out crops the judge reads "
         f"source accuracy {_fmt(jq.get('source_accuracy'))}, cx/cy error {_fmt(jq.get('cx_cy_mae'))}, log-size error "
         f"{_fmt(jq.get('log_size_mae'))}, sepia error {_fmt(jq.get('sepia_mae'))}. " + s["noise_floor"]["decision_rule"] + ".", ""]
    per = (ex.get("setting_check") or {}).get("per_sampler") or {}
    if per:
        L += [f"**Is the question real?** The plain sampler on the {s['queries_per_set']} held-out captions (foreign seeds) "
              "at each step count; FD +- bootstrap sd, MSE to the sampler's longest run:", "",
              "| sampler | steps | FD | source acc | geometry err | sepia err | MSE to longest |", "|---|---|---|---|---|---|---|"]
        for name, sc in per.items():
            for r in sc["rows"]:
                L.append(f"| {name} | {r['steps']} | {_fmt(r['fd'])} +- {_fmt(r['fd_sd'])} | {_fmt(r['acc'])} | "
                         f"{_fmt(r['geo_err'])} | {_fmt(r['sepia_err'])} | {_fmt(r.get('mse_mean'))} |")
        L.append("")
        L.append("At the lowest budget against T steps: " + "; ".join(
            f"{name} FD {sc['lowest_budget_fd_gap_in_sd']:+.1f} combined sd "
            f"({'measurably worse' if sc['lowest_budget_worse_fd'] else 'NOT measurably worse'})" for name, sc in per.items())
            + ". Two seeds of one caption differ by MSE " + ", ".join(
            f"{_fmt(sc['mse_between_seeds_same_caption'])} ({name})" for name, sc in per.items()) + " at T steps.")
        L.append("")
    for k, v in res["kb"].items():
        L.append(f"KB `{k}`: {v['entries']} trajectories, built in {v['build_seconds_total']:.0f} s "
                 f"({v['ms_per_trajectory']:.0f} ms / trajectory){' (from cache)' if v['cached'] else ''}.")
    L += ["", "## Goals", "", "| goal | verdict | numbers |", "|---|---|---|"]
    g = res["goals"]
    x = g["equal_nfe_fd_acc_2_of_3"]
    detail = "; ".join(f"{k}: budgets passing {v['budgets_passing']} of {[b_['nfe'] for b_ in v['budgets']]}"
                       for k, v in x["per_sampler"].items())
    L.append(f"| ReDi = plain at equal NFE on FD and source accuracy, >= 2 of 3 samplers | {_met(x['met'])} | passing all budgets: "
             f"{', '.join(x['samplers_passing']) or 'none'} of {', '.join(x['samplers_tested'])}; {detail}. Reading: {x['fd_reading']} |")
    x = g["half_nfe_vs_full_fd"]
    nums = "; ".join(f"{k}: FD ReDi {_fmt(v['redi_fd'])} vs plain-full {_fmt(v['plain_full_fd'])} (plain-half "
                     f"{_fmt(v['control_plain_half_fd'])}), MSE-to-full ReDi {_fmt(v['redi_mse'])} vs plain-half "
                     f"{_fmt(v['control_plain_half_mse'])}" for k, v in x["per_sampler"].items())
    L.append(f"| ReDi at half NFE = plain at full NFE on FD | {_met(x['met'])} | {nums}; informative: "
             f"{_fmt(x['informative'])} |")
    x = g["trajectory_vs_condition_keys"]
    if x.get("comparisons"):
        nums = "; ".join(f"NFE {c['nfe']} {c['variant']}: d {_fmt(c['traj_d_xv'])} vs {_fmt(c['cond_d_xv'])}, FD "
                         f"{_fmt(c['traj_fd'])} vs {_fmt(c['cond_fd'])}" for c in x["comparisons"])
    else:
        nums = x.get("note", "")
    L.append(f"| trajectory key better than condition key | {_met(x['met'])} | {nums} |")
    x = g["guard_never_worse"]
    if x.get("verdicts"):
        nums = "; ".join(f"{p}: " + ", ".join(f"{m} {v}" for m, v in (d or {}).items()) for p, d in x["verdicts"].items())
    else:
        nums = x.get("note", "")
    if x.get("fd"):
        nums += ". FD: " + "; ".join(f"{p}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in d.items()) for p, d in x["fd"].items())
    L.append(f"| guard never worse than plain | {_met(x['met'])} | vs plain at NFE {s['schedule']['half_nfe']}: {nums} |")
    L += ["", "## ReDi vs plain at equal NFE (guard off)", "",
          "| sampler | protocol | NFE | plain FD | ReDi FD | plain acc | ReDi acc | plain geo err | ReDi geo err | plain MSE | ReDi MSE | d(x_v, x_v_hat) | residual (centered) | verdict FD / acc / MSE / p95 |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = ex["equal_nfe"]["rows"]
    for r in ex.get("regime_map") or []:
        red = find_row(rows, method="redi", sampler=r["sampler"], protocol=r["protocol"], nominal_nfe=r["nfe"],
                       h=s["h_for_claims"], guard="off", tag="equal_nfe")
        p, q = r["numbers"]["plain"], r["numbers"]["redi"]
        L.append(f"| {r['sampler']} | {r['protocol']} | {r['nfe']} | {_fmt(p['fd'])} | {_fmt(q['fd'])} | {_fmt(p['acc'])} | "
                 f"{_fmt(q['acc'])} | {_fmt(p.get('geo_err'))} | {_fmt(q.get('geo_err'))} | {_fmt(p['mse_mean'])} | {_fmt(q['mse_mean'])} | {_fmt(red and red.get('d_xv_mean'))} | "
                 f"{_fmt(red and red.get('residual_centered_mean'))} | {r['fd']} / {r['acc']} / {r['mse_mean']} / {r['mse_p95']} |")
    full = [r for r in rows if r["method"] == "plain" and r["nominal_nfe"] == s["schedule"]["steps_T"]]
    L.append("")
    L.append("MSE = mean per-sample MSE to the plain T-step output from the same noise and condition; d(x_v, x_v_hat) = L2 "
             "between the blended value and the query's own latent at v; residual = ||x_k - sum w key|| / KB key spread. "
             "Verdicts are ReDi vs plain: win / tie (within 2 sd) / loss. Reading FD: " + g["equal_nfe_fd_acc_2_of_3"]["fd_reading"] + ".")
    L.append("")
    L.append("Plain at T = " + str(s["schedule"]["steps_T"]) + ": " + "; ".join(
        f"{r['sampler']} {r['protocol']} FD {_fmt(r['fd'])} acc {_fmt(r['acc'])}" for r in full) + ".")
    abl = ex.get("ablations")
    if abl:
        L += ["", f"## Ablations (euler, fixed seed, H = {abl['h']}, k = {abl['k']}, NFE {abl['nfe']} unless varied)", "",
              "| ablation | setting | NFE | MSE to full | d(x_v, x_v_hat) | residual rel / centered | FD | acc | retrieve+blend s |",
              "|---|---|---|---|---|---|---|---|---|"]
        for name, key, rs in (("KB size", "kb_entries", abl["kb_size"]["rows"]), ("v (k=%d)" % abl["gap"]["k"], "v", abl["gap"]["rows"]),
                              ("k (v-k=%d)" % abl["key_step"]["gap"], "k", abl["key_step"]["rows"]),
                              ("H", "h", abl["neighbours"]["rows"])):
            for r in rs:
                if r is None:
                    continue
                L.append(f"| {name} | {r[key]} | {r['nominal_nfe']} | {_fmt(r['mse_mean'])} | {_fmt(r.get('d_xv_mean'))} | "
                         f"{_fmt(r.get('residual_rel_mean'))} / {_fmt(r.get('residual_centered_mean'))} | {_fmt(r['fd'])} | {_fmt(r['acc'])} | "
                         f"{_fmt(r['seconds']['retrieve'] + r['seconds']['blend'])} |")
        fit = abl["kb_size"].get("fit", {})
        if fit.get("mse_mean"):
            L.append("")
            L.append(f"Fit MSE-to-full ~ {fit['mse_mean']['a']:.3g} * N^-{fit['mse_mean']['b']:.3f} (d(x_v, x_v_hat) ~ N^-"
                     f"{fit['d_xv_mean']['b']:.3f}); plain at NFE {fit['parity']['plain_nfe']} has MSE "
                     f"{_fmt(fit['parity']['plain_mse_mean'])}: {_parity_text(fit)}.")
    st = ex.get("stylization")
    if st:
        L += ["", f"## Stylization (paper Fig. 4; {st['sampler']}, {st['protocol']}, {st['queries']} held-out content captions, "
              f"style: {st['style']}, style-free KB of {st['style_free_kb_entries']})", "",
              "| method | NFE | layout similarity | sepia reading (target 1) | sepia err | source acc | geometry err | FD vs real styled |",
              "|---|---|---|---|---|---|---|---|"]
        for r in st["rows"]:
            L.append(f"| {r['method']} | {r['nfe']:g} | {_fmt(r['layout_similarity'])} +- {_fmt(r['layout_similarity_se'])} | "
                     f"{_fmt(r['sepia_reading'])} | {_fmt(r['sepia_err'])} | {_fmt(r['acc'])} | {_fmt(r['geo_err'])} | {_fmt(r['fd'])} |")
        L += ["", "Layout similarity = per-sample correlation of luminance with the unstyled output of the same seed. "
              "Verdicts against the direct styled generation: " + "; ".join(
                  f"{k}: " + ", ".join(f"{m} {v}" for m, v in d.items()) for k, d in st["verdicts_vs_direct"].items()) + "."]
    ts = ex.get("tstitch")
    if ts:
        L += ["", "## T-Stitch (euler, foreign seeds, T = " + str(s["schedule"]["steps_T"]) + ")", "",
              "| small fraction | small steps | FD | acc | MSE to large-only | time (s) | time vs large-only |", "|---|---|---|---|---|---|---|"]
        for r in ts["rows"]:
            L.append(f"| {r['small_fraction']} | {r['small_steps']} | {_fmt(r['fd'])} | {_fmt(r['acc'])} | {_fmt(r['mse_mean'])} | "
                     f"{_fmt(r['seconds']['total'])} | {_fmt(r['time_vs_large_only'])} |")
    wc = ex.get("wallclock")
    if wc and wc["rows"]:
        L += ["", "## Wall clock at matched quality (fixed seed, H = " + str(wc["h"]) + ", retrieval and blending included)", "",
              "| sampler | ReDi NFE | ReDi s (retrieve+blend share) | ReDi MSE / FD | plain NFE matching MSE | speed-up | "
              "plain NFE matching FD | speed-up | vs plain full |", "|---|---|---|---|---|---|---|---|---|"]
        for r in wc["rows"]:
            L.append(f"| {r['sampler']} | {r['redi_nfe']} | {_fmt(r['redi_seconds'])} ({r['retrieval_blend_share']:.0%}) | "
                     f"{_fmt(r['redi_mse'])} / {_fmt(r['redi_fd'])} | {r['plain_nfe_matching']:g} | "
                     f"{_fmt(r['speedup_at_matched_quality'])}x | {r['plain_nfe_matching_fd']:g} | {_fmt(r['speedup_at_matched_fd'])}x | "
                     f"{_fmt(r['speedup_vs_full'])}x |")
        L += ["", "Matched = the cheapest plain run (same protocol, NFE up to T) whose MSE-to-full is at most ReDi's, or "
              "whose FD is not worse than ReDi's beyond 2 combined sd (lenient to the plain sampler); T steps when none is cheaper."]
    gd = ex.get("guard")
    if gd:
        L += ["", "## Guard (euler, half NFE, H = " + str(gd["h"]) + "): worst 5% per-sample MSE to full", "",
              "| protocol | guard off | guard auto | plain half NFE | accepted (auto) | NFE (auto) |", "|---|---|---|---|---|---|"]
        for p in ("fixed", "foreign"):
            w = gd[f"{p}_worst5"]
            plain_key = [k for k in w if k.startswith("plain_")][0]
            L.append(f"| {p} | {_fmt(w['guard_off'])} | {_fmt(w['guard_auto'])} | {_fmt(w[plain_key])} | {w['accepted_auto']:.0%} | {_fmt(w['nfe_auto'])} |")
    L += ["", "## Skipped", ""] + [f"- **{x['experiment']}**: {x['reason']}" for x in res["skipped"]]
    L += ["", "## When should a user expect ReDi to pay off?", "", payoff_paragraph(res), ""]
    path.write_text("\n".join(L))


README_START = "<!-- paper_claims:start (written by benchmarks/paper_claims.py) -->"
README_END = "<!-- paper_claims:end -->"


def update_readme(markdown: Path, readme: Path) -> None:
    """Copy the goals table and the pay-off paragraph of the results markdown into README's marked block."""
    md = markdown.read_text()
    goals = md[md.index("## Goals"):md.index("## ReDi vs plain at equal NFE")].replace("## Goals", "").strip()
    payoff = md[md.index("## When should a user expect ReDi to pay off?"):].split("\n", 1)[1].strip()
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return
    head, rest = text.split(README_START, 1)
    tail = rest.split(README_END, 1)[1]
    block = f"{README_START}\n{goals}\n\n**When should a user expect ReDi to pay off?** {payoff}\n{README_END}"
    readme.write_text(head + block + tail)


def write_plots(res: dict, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    s = res["setting"]
    ex = res["experiments"]
    rows = ex["equal_nfe"]["rows"]
    samplers = s["samplers"]
    floor = s["noise_floor"]["fd_real_vs_real"]
    # --- equal NFE
    fig, axes = plt.subplots(3, len(samplers), figsize=(4.6 * len(samplers), 10), squeeze=False)
    for j, sampler in enumerate(samplers):
        for i, (metric, label) in enumerate((("mse_mean", "MSE to plain T-step (log)"), ("fd", "FD vs held-out real"),
                                             ("acc", "judge accuracy"))):
            ax = axes[i][j]
            for protocol, ls in (("fixed", "-"), ("foreign", "--")):
                p = sorted([r for r in rows if r["method"] == "plain" and r["sampler"] == sampler and r["protocol"] == protocol
                            and r["nominal_nfe"] < s["schedule"]["steps_T"]], key=lambda r: r["nfe"])
                if p:
                    ax.plot([r["nfe"] for r in p], [r[metric] for r in p], "k" + ls, marker="o", label=f"plain ({protocol})")
                for h, col in ((1, "tab:blue"), (3, "tab:red"), (16, "tab:green")):
                    rr = sorted([r for r in rows if r["method"] == "redi" and r["sampler"] == sampler and r["protocol"] == protocol
                                 and r["h"] == h and r["guard"] == "off" and r["k"] == s["schedule"]["key_step_k"]],
                                key=lambda r: r["nfe"])
                    if rr:
                        ax.plot([r["nfe"] for r in rr], [r[metric] for r in rr], ls, color=col, marker="s",
                                label=f"ReDi H={h} ({protocol})")
                full = [r for r in rows if r["method"] == "plain" and r["sampler"] == sampler and r["protocol"] == protocol
                        and r["nominal_nfe"] == s["schedule"]["steps_T"]]
                if full and metric != "mse_mean":
                    ax.axhline(full[0][metric], color="gray", ls=ls, lw=1, label=f"plain T={s['schedule']['steps_T']} ({protocol})")
            if metric in ("mse_mean", "fd"):
                ax.set_yscale("log")
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            if metric == "fd":
                ax.axhspan(floor["mean"] - 2 * floor["sd"], floor["mean"] + 2 * floor["sd"], color="gold", alpha=0.3,
                           label="real-vs-real floor +-2sd")
            ax.set_xlabel("NFE")
            ax.set_ylabel(label)
            if i == 0:
                ax.set_title(sampler)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6.5)
    axes[1][0].legend(fontsize=6.5)
    fig.suptitle("ReDi vs plain sampler at equal NFE (solid: fixed seed, dashed: foreign seeds; guard off; log y for MSE and FD)")
    fig.tight_layout()
    fig.savefig(folder / "paper_claims_equal_nfe.png", dpi=90)
    plt.close(fig)
    # --- ablations
    abl = ex.get("ablations")
    if abl:
        fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
        parts = (("kb_size", "kb_entries", "KB entries"), ("gap", "v", f"value step v (k={abl['gap']['k']})"),
                 ("key_step", "k", f"key step k (v-k={abl['key_step']['gap']})"), ("neighbours", "h", "neighbours H"))
        for ax, (part, key, label) in zip(axes, parts):
            rs = [r for r in abl[part]["rows"] if r]
            xs = [r[key] for r in rs]
            ax.plot(xs, [r["mse_mean"] for r in rs], "o-", color="tab:red", label="MSE to full")
            ax.plot(xs, [r.get("d_xv_mean", np.nan) ** 2 / 768 for r in rs], "s--", color="tab:purple",
                    label="d(x_v, x_v_hat)^2 / D")
            ax.set_yscale("log")
            ax.set_xlabel(label)
            ax2 = ax.twinx()
            ax2.plot(xs, [r.get("residual_centered_mean", np.nan) for r in rs], "^:", color="tab:blue", label="centered residual")
            ax2.set_ylabel("centered residual", color="tab:blue")
            if part in ("kb_size", "neighbours"):
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
                ax.set_xticks(xs)
                ax.set_xticklabels([str(x) for x in xs])
            if part == "kb_size" and abl["kb_size"]["fit"].get("mse_mean"):
                f = abl["kb_size"]["fit"]
                n = np.geomspace(min(xs), max(xs) * 4, 50)
                ax.plot(n, f["mse_mean"]["a"] * n ** -f["mse_mean"]["b"], color="gray", lw=1,
                        label=f"fit N^-{f['mse_mean']['b']:.2f}")
                ax.axhline(f["parity"]["plain_mse_mean"], color="k", lw=1, ls="-.", label=f"plain NFE {f['parity']['plain_nfe']}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="upper right" if part != "gap" else "upper left")
        axes[0].set_ylabel("error (log)")
        fig.suptitle(f"ReDi ablations (euler, fixed seed, H={abl['h']}, k={abl['k']}, NFE {abl['nfe']} unless varied); "
                     "red/purple: error (left, log), blue: centered residual (right)")
        fig.tight_layout()
        fig.savefig(folder / "paper_claims_kb_size.png", dpi=90)
        plt.close(fig)
    # --- T-Stitch
    ts = ex.get("tstitch")
    if ts:
        rs = ts["rows"]
        fr = [r["small_fraction"] for r in rs]
        fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
        for ax, (metric, label) in zip(axes, (("fd", "FD vs held-out real"), ("acc", "judge accuracy"),
                                              ("mse_mean", "MSE to large-only"), ("time", "wall time (s)"))):
            ys = [r["seconds"]["total"] if metric == "time" else r[metric] for r in rs]
            err = {"fd": [2 * r["fd_sd"] for r in rs], "acc": [2 * r["acc_se"] for r in rs]}.get(metric)
            ax.errorbar(fr, ys, yerr=err, fmt="o-", capsize=3)
            if metric == "fd":
                ax.axhspan(floor["mean"] - 2 * floor["sd"], floor["mean"] + 2 * floor["sd"], color="gold", alpha=0.3,
                           label="real-vs-real floor +-2sd")
                ax.legend(fontsize=7)
            ax.set_xlabel("fraction of steps on the small model")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        fig.suptitle(f"T-Stitch (euler, T={s['schedule']['steps_T']}, {s['queries_per_set']} foreign-seed queries; error bars 2 sd)")
        fig.tight_layout()
        fig.savefig(folder / "paper_claims_tstitch.png", dpi=90)
        plt.close(fig)
    # --- setting check and stylization
    per, st = (ex.get("setting_check") or {}).get("per_sampler") or {}, ex.get("stylization")
    if per or st:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for name, sc in per.items():
            xs = [r["steps"] for r in sc["rows"]]
            axes[0].errorbar(xs, [r["fd"] for r in sc["rows"]], yerr=[2 * r["fd_sd"] for r in sc["rows"]], fmt="o-", capsize=3,
                             label=f"plain {name} (foreign seeds)")
        if per:
            axes[0].axhspan(floor["mean"] - 2 * floor["sd"], floor["mean"] + 2 * floor["sd"], color="gold", alpha=0.3,
                            label="real-vs-real floor +-2sd")
            axes[0].set_xscale("log")
            axes[0].set_yscale("log")
            axes[0].set_xticks(xs)
            axes[0].set_xticklabels([str(x) for x in xs])
            axes[0].set_xlabel("steps")
            axes[0].set_ylabel("FD (log)")
            axes[0].set_title("Is the question real? FD against steps")
            axes[0].legend(fontsize=7)
            axes[0].grid(alpha=0.3)
        if st:
            names = [r["method"].replace(" (no retrieval)", "").replace("content key at ", "").replace(", styled resume from", "")
                     for r in st["rows"]]
            ys = np.arange(len(names))
            axes[1].barh(ys, [r["layout_similarity"] for r in st["rows"]], xerr=[2 * r["layout_similarity_se"] for r in st["rows"]])
            axes[1].set_yticks(ys)
            axes[1].set_yticklabels(names, fontsize=7)
            axes[1].set_xlabel("layout similarity to the unstyled image")
            axes[2].barh(ys, [r["sepia_err"] for r in st["rows"]], xerr=[2 * r["sepia_err_se"] for r in st["rows"]], color="tab:brown")
            axes[2].set_yticks(ys)
            axes[2].set_yticklabels([])
            axes[2].set_xlabel("sepia error (judge reading vs 1.0)")
            axes[1].set_title("Stylization: layout kept?")
            axes[2].set_title("Stylization: style reached?")
        fig.tight_layout()
        fig.savefig(folder / "paper_claims_setting_stylization.png", dpi=90)
        plt.close(fig)


if __name__ == "__main__":
    main()
