"""Evidence benchmark: which claims of the ReDi and T-Stitch papers hold on the embedded digits models.

    source scripts/env.sh
    $REDI_PYTHON benchmarks/paper_claims.py              # full run (<= 25 min on 2 shared CPU cores)
    $REDI_PYTHON benchmarks/paper_claims.py --smoke --out /tmp/pc.json   # < 60 s structure check

Writes benchmarks/results/paper_claims.json, paper_claims.md and paper_claims_*.png (full run).

Every sample goes through the pack's own code: `kb_tools.redi` (build_knowledge_base,
partial_sample, retrieve_neighbours, blend_value, resume_sample with its guard),
`kb_tools.comfy_sampling` (schedule_sigmas, seeded_noise, sample_sigmas, sample_stitched,
SamplingProbe), `kb_tools.tstitch.tstitch_sample` and `kb_tools.retrieval`, on the two
class-conditional digits UNets of `embedded/` (ComfyUI's own UNet, v-prediction).

Conditions: the models know 10 classes only. The paper's knowledge base has ~82k distinct
captions with a train / held-out split; we emulate continuous, diverse conditions
("caption variations") by perturbing the class context: every token t of encode("digit c")
becomes t + alpha * ||t|| * u_t with u a fixed random unit direction per token. KB
conditions and query conditions use disjoint random directions (train / held-out). This is
a stand-in for captions, not a text encoder.

Metrics (plain functions below): Frechet distance in the hidden layer of a small MLP judge
trained on the digits train split (against held-out real digits, with its real-vs-real noise
floor at the same sample count), judge accuracy against the condition's class, per-sample
MSE to the full-step plain output from the same noise and condition, and d(x_v, x_v_hat)
(paper Table 3) with the retrieval residual beside it.
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

from embedded import digits as D  # noqa: E402  (imports no ComfyUI at module level)

RESULTS = PACK / "benchmarks" / "results"
SCRATCH = PACK / ".scratch" / "paper_claims"


# =========================================================================== metrics

class Judge:
    """Small MLP classifier on the 8x8 (2x2-pooled) digits train split; its hidden layer is the FD feature space."""

    def __init__(self, hidden: int = 64, seed: int = 0):
        from sklearn.neural_network import MLPClassifier

        images, labels = D.digits_8x8("train")
        x = D.to_judge_space(D.to_model_space(images)) / 16.0
        self.clf = MLPClassifier(hidden_layer_sizes=(hidden,), activation="relu", alpha=1e-3, max_iter=2000,
                                 random_state=seed).fit(x, labels)
        test_x, test_y = D.digits_8x8("test")
        self.test_accuracy = float((self.predict(D.to_model_space(test_x)) == test_y).mean())

    @staticmethod
    def _inputs(latents) -> np.ndarray:
        return D.to_judge_space(latents) / 16.0

    def features(self, latents) -> np.ndarray:
        """Hidden-layer activations [N, hidden] (ReLU) of latents [N, 1, 16, 16]."""
        x = self._inputs(latents)
        return np.maximum(x @ self.clf.coefs_[0] + self.clf.intercepts_[0], 0.0)

    def predict(self, latents) -> np.ndarray:
        return self.clf.predict(self._inputs(latents))


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


def fd_noise_floor(judge: Judge, n: int, reference: np.ndarray, draws: int = 10, seed: int = 0) -> dict:
    """FD of n real TRAIN digits against the held-out reference features, over `draws` random draws.

    What FD a perfect generator gets at this sample count: differences between methods smaller
    than about 2 sd of this are noise.
    """
    images, _ = D.digits_8x8("train")
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(draws):
        idx = rng.choice(len(images), size=min(n, len(images)), replace=False)
        vals.append(frechet_distance(judge.features(D.to_model_space(images[idx])), reference))
    return {"n": int(n), "draws": draws, "mean": float(np.mean(vals)), "sd": float(np.std(vals, ddof=1))}


def fd_bootstrap_sd(features: np.ndarray, reference: np.ndarray, draws: int = 10, seed: int = 0) -> float:
    """Bootstrap sd of FD(features, reference) over resamples of the generated set."""
    rng = np.random.default_rng(seed)
    vals = [frechet_distance(features[rng.integers(0, len(features), len(features))], reference) for _ in range(draws)]
    return float(np.std(vals, ddof=1))


def accuracy(judge: Judge, latents, labels) -> float:
    """Share of samples the judge assigns to their condition's class."""
    return float((judge.predict(latents) == np.asarray(labels)).mean())


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


# =========================================================================== conditions ("caption variations")

class VariedEncoder:
    """encode(prompt) -> CONDITIONING for prompts "digit C" or "digit C|SPLIT|IDX|ALPHA".

    The variation adds alpha * ||t|| * u_t to every context token t of encode("digit C"), with
    u a unit direction per token drawn from a generator seeded by (SPLIT, IDX): KB conditions
    use split "kb", queries split "q", so the two sets of directions are disjoint draws.
    The prompt string is what the knowledge base stores, so each entry's condition can be
    rebuilt from it (the condition-embedding key of experiment 2 does).
    """

    SPLIT_SEEDS = {"kb": 1, "q": 2}

    def __init__(self, base):
        self.base = base

    @staticmethod
    def prompt(cls: int, split: str, idx: int, alpha: float) -> str:
        return f"digit {cls}|{split}|{idx}|{alpha:g}"

    def context(self, prompt: str):
        import torch

        parts = prompt.split("|")
        ctx = self.base(parts[0])[0][0].clone()
        if len(parts) == 1:
            return ctx
        split, idx, alpha = parts[1], int(parts[2]), float(parts[3])
        rng = np.random.default_rng([self.SPLIT_SEEDS[split], idx])
        u = rng.standard_normal(tuple(ctx.shape)).astype(np.float32)
        u /= np.linalg.norm(u, axis=-1, keepdims=True)
        norm = ctx.norm(dim=-1, keepdim=True)
        return ctx + alpha * norm * torch.from_numpy(u)

    def __call__(self, prompt: str) -> list:
        return [[self.context(prompt), {}]]

    def flat(self, prompts) -> np.ndarray:
        """Condition embeddings [N, tokens * dim] (the 'CLIP-style' key of experiment 2)."""
        return np.stack([self.context(p).reshape(-1).numpy() for p in prompts]).astype(np.float32)


def class_of(prompt: str) -> int:
    return D.parse_prompt(prompt.split("|")[0])


def same_class(kb, ids: np.ndarray, labels) -> float:
    """Share of retrieved neighbours whose condition has the query's class."""
    entries = kb.entries
    return float(np.mean([class_of(entries[int(i)][0]) == y for row, y in zip(ids, labels) for i in row]))


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
    cfg: float = 1.0
    alpha: float = 0.5
    scheduler: str = "normal"
    samplers: tuple = ("euler", "dpmpp_2m", "ipndm")
    kb_sizes: dict = dataclasses.field(default_factory=lambda: {"euler": 2000, "dpmpp_2m": 1000, "ipndm": 1000})
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
    alpha_check: tuple = (0.0, 0.25, 0.5, 1.0)
    alpha_check_n: int = 50
    kb_size_ablation: tuple = (125, 250, 500, 1000, 2000)
    gap_values: tuple = (2, 3, 4, 5, 6, 7, 8, 9)   # v for the k-v ablation (k = key_step)
    key_values: tuple = (1, 2, 3, 4, 5)            # k for the key-step ablation at fixed gap
    key_gap: int = 4
    cond_key_budgets: tuple = (4, 6)
    alpha_spread: float = 1.0             # robustness check with more diverse conditions (lowest priority)
    alpha_spread_kb: int = 1000
    tstitch_fractions: tuple = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    soft_budget_s: float = 22 * 60        # stop adding experiments when the next would exceed this
    smoke: bool = False

    @classmethod
    def smoke_config(cls) -> Config:
        return cls(samplers=("euler",), kb_sizes={"euler": 40}, queries=20, budgets=(5,), plain_extra={},
                   h_main=(1, 3), h_extra=(), alpha_check=(0.0, 0.5), alpha_check_n=10, kb_size_ablation=(20, 40),
                   gap_values=(6, 7), key_values=(2, 3), cond_key_budgets=(5,), tstitch_fractions=(0.0, 0.4, 1.0),
                   alpha_spread_kb=20,
                   soft_budget_s=120, smoke=True)

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

        from embedded.demo import _bf16_wrapper
        from kb_tools import comfy_sampling as cs
        from kb_tools import redi

        self.torch, self.cs, self.redi = torch, cs, redi
        self.cfg = cfg
        self.t_start = t_start
        self.precision = precision
        large, small, encode = D.load_models()
        if precision == "bf16":  # the demo's --precision bf16: autocast through ComfyUI's unet wrapper
            large, small = large.clone(), small.clone()
            large.set_model_unet_function_wrapper(_bf16_wrapper)
            small.set_model_unet_function_wrapper(_bf16_wrapper)
        self.large, self.small = large, small
        self.enc = VariedEncoder(encode)
        self.scratch = scratch
        if fresh and scratch.exists():
            shutil.rmtree(scratch)
        scratch.mkdir(parents=True, exist_ok=True)
        self.judge = Judge()
        tx, ty = D.digits_8x8("test")
        self.real_features = self.judge.features(D.to_model_space(tx))
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

    def query_set(self, protocol: str, n: int | None = None, alpha: float | None = None) -> tuple[list[str], list[int], np.ndarray]:
        """Held-out conditions (class i mod 10, query direction i) and their seeds."""
        n = self.cfg.queries if n is None else n
        alpha = self.cfg.alpha if alpha is None else alpha
        labels = np.arange(n) % 10
        prompts = [VariedEncoder.prompt(int(c), "q", i, alpha) for i, c in enumerate(labels)]
        if protocol == "fixed":
            seeds = [self.cfg.kb_seed] * n
        elif protocol == "foreign":
            seeds = [self.cfg.foreign_seed_base + i for i in range(n)]
        else:
            raise ValueError(protocol)
        return prompts, seeds, labels

    # ------------------------------------------------------------------ sampling through the pack's code
    def plain(self, sampler: str, steps: int, prompts: list[str], seeds: list[int], *, model=None,
              record=()) -> tuple:
        """(latent [B,1,16,16], {step: latent} for `record`, NFE per item, seconds) on an `steps`-step schedule."""
        torch, cs = self.torch, self.cs
        model = self.large if model is None else model
        latent = torch.zeros((len(prompts), *D.LATENT_SHAPE))
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

    def reference(self, sampler: str, protocol: str, alpha: float | None = None) -> dict:
        """The full-step plain run of the query set, with its trajectory at every stored step (cached)."""
        key = (sampler, protocol, alpha)
        if key not in self.refs:
            prompts, seeds, labels = self.query_set(protocol, alpha=alpha)
            out, records, nfe, dt = self.plain(sampler, self.cfg.steps, prompts, seeds,
                                               record=range(1, self.cfg.steps))
            self.refs[key] = {"out": out, "traj": records, "nfe": nfe, "seconds": dt, "prompts": prompts,
                              "seeds": seeds, "labels": labels}
        return self.refs[key]

    def kb_path(self, sampler: str, n: int | None = None, alpha: float | None = None) -> Path:
        c = self.cfg
        alpha = c.alpha if alpha is None else alpha
        tag = f"kb_{sampler}_T{c.steps}_cfg{c.cfg:g}_a{alpha:g}_s{c.kb_seed}_{self.precision}"
        return self.scratch / (tag if n is None else f"{tag}_sub{n}")

    def knowledge_base(self, sampler: str, n: int, alpha: float | None = None) -> dict:
        """Build (or resume from the .scratch cache) the fixed-seed KB of `n` trajectories."""
        name = sampler if alpha is None else f"{sampler}@alpha{alpha:g}"
        if name in self.kbs and len(self.kbs[name]["kb"]) >= n:
            return self.kbs[name]
        c = self.cfg
        path = self.kb_path(sampler, alpha=alpha)
        prompts = [VariedEncoder.prompt(j % 10, "kb", j, c.alpha if alpha is None else alpha) for j in range(n)]
        spec = self.redi.BuildSpec(prompts=prompts, seeds=[c.kb_seed], sampler=sampler, scheduler=c.scheduler,
                                   steps=c.steps, cfg=c.cfg, store_steps=list(range(1, c.steps)),
                                   latent_shape=D.LATENT_SHAPE, batch_size=250, dtype="float32", commit_every=500)
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

    def sub_kb(self, sampler: str, n: int):
        """A random n-entry subset of the sampler's KB (KnowledgeBase.create + append of stored latents)."""
        from kb_tools.kb import KnowledgeBase

        big = self.kbs[sampler]["kb"]
        if n >= len(big):
            return big
        path = self.kb_path(sampler, n)
        if (path / "manifest.json").exists() or path.exists():
            shutil.rmtree(path)
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
        zeros = torch.zeros((len(prompts), *D.LATENT_SHAPE))
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
                   tag: str = "", alpha: float | None = None) -> list[dict]:
        """partial_sample once, then for each H retrieve, for each v blend + resume; one metrics row each."""
        ref = self.reference(sampler, protocol, alpha)
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
                       "same_class_neighbours": same_class(kb, st.neighbours.ids, labels),
                       "seconds": {"partial": t_partial, "retrieve": t_retr, "blend": t_blend, "resume": t_res,
                                   "total": t_partial + t_retr + t_blend + t_res}, "tag": tag}
                row.update(self.metrics(rep.latent, labels, ref["out"], xv_true=ref["traj"].get(v), xv_hat=blended,
                                        residual=st2.residual, centered=st2.centered_residual))
                rows.append(row)
        return rows

    # ------------------------------------------------------------------ metrics of one output set
    def metrics(self, out, labels, ref_out, *, xv_true=None, xv_hat=None, residual=None, centered=None) -> dict:
        out = np.asarray(out, np.float32)
        feats = self.judge.features(out)
        mse = per_sample_mse(out, ref_out)
        acc = accuracy(self.judge, out, labels)
        m = {"fd": frechet_distance(feats, self.real_features), "fd_sd": fd_bootstrap_sd(feats, self.real_features),
             "acc": acc, "acc_se": math.sqrt(max(acc * (1 - acc), 1.0 / len(out)) / len(out)),
             "mse_mean": float(mse.mean()), "mse_se": float(mse.std(ddof=1) / math.sqrt(len(mse))),
             "mse_p95": float(np.percentile(mse, 95)),
             "mse_worst5_mean": float(np.sort(mse)[-max(1, len(mse) // 20):].mean()),
             "finite": bool(np.isfinite(out).all()), "_mse": mse}
        if xv_true is not None and xv_hat is not None:
            d = l2_per_sample(np.asarray(xv_hat), np.asarray(xv_true))
            m.update({"d_xv_mean": float(d.mean()), "d_xv_rel": float((d / np.linalg.norm(
                np.asarray(xv_true, np.float64).reshape(len(d), -1), axis=1)).mean())})
        if residual is not None:
            m["residual_rel_mean"] = float(np.mean(residual))
        if centered is not None:
            m["residual_centered_mean"] = float(np.mean(centered))
        return m

    def plain_row(self, sampler: str, protocol: str, steps: int, alpha: float | None = None) -> dict:
        ref = self.reference(sampler, protocol, alpha)
        if steps == self.cfg.steps:
            out, nfe, dt = ref["out"], ref["nfe"], ref["seconds"]
        else:
            out, _, nfe, dt = self.plain(sampler, steps, ref["prompts"], ref["seeds"])
        row = {"method": "plain", "sampler": sampler, "protocol": protocol, "nfe": float(nfe), "nominal_nfe": steps,
               "seconds": {"total": dt}}
        row.update(self.metrics(out, ref["labels"], ref["out"]))
        return row


# =========================================================================== experiments

def exp_setting(b: Bench) -> dict:
    """Do perturbed conditions still give recognisable digits of their class, and how much do they vary?"""
    c = b.cfg
    n = c.alpha_check_n
    b.afford(len(c.alpha_check) * 2 * n * c.steps, "condition check")
    out = {"n": n, "sampler": "euler", "rows": []}
    base = {}
    for alpha in c.alpha_check:
        labels = np.arange(n) % 10
        prompts = [VariedEncoder.prompt(int(y), "q", i, alpha) for i, y in enumerate(labels)]
        for protocol, seeds in (("fixed", [c.kb_seed] * n), ("foreign", [c.foreign_seed_base + i for i in range(n)])):
            lat, _, _, _ = b.plain("euler", c.steps, prompts, seeds)
            lat = lat.numpy()
            if alpha == 0.0:
                base[protocol] = lat
            row = {"alpha": alpha, "protocol": protocol, "acc": accuracy(b.judge, lat, labels)}
            if protocol in base and alpha != 0.0:
                row["mse_to_alpha0_same_seed"] = float(per_sample_mse(lat, base[protocol]).mean())
            out["rows"].append(row)
    if "fixed" in base and "foreign" in base:
        out["mse_between_seeds_alpha0"] = float(per_sample_mse(base["fixed"], base["foreign"]).mean())
    chosen = [r for r in out["rows"] if r["alpha"] == c.alpha]
    out["chosen_alpha_accuracy"] = {r["protocol"]: r["acc"] for r in chosen}
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
    emb_kb = b.enc.flat(prompts).astype(np.float64)
    emb_q = b.enc.flat(q_prompts).astype(np.float64)
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
                   "same_class_neighbours": same_class(kb, st.neighbours.ids, labels)}
            row.update(b.metrics(rep.latent, labels, ref["out"], xv_true=ref["traj"][v], xv_hat=blended,
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
                                  large_negative=neg, latent={"samples": torch.zeros((len(prompts), *D.LATENT_SHAPE))},
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
        row.update(b.metrics(lat, labels, ref))
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


def exp_wallclock(b: Bench, rows: list[dict], sampler: str) -> dict:
    """ReDi time (partial + retrieve + blend + resume) vs the plain sampler at matched MSE-to-full."""
    c = b.cfg
    plains = sorted([r for r in rows if r["method"] == "plain" and r["sampler"] == sampler and r["protocol"] == "fixed"],
                    key=lambda r: r["nfe"])
    out = {"sampler": sampler, "protocol": "fixed", "h": c.h_claim, "quality": "mean per-sample MSE to the "
           f"plain {c.steps}-step output (FD and accuracy do not separate the step counts here)", "rows": []}
    for n in c.budgets:
        r = find_row(rows, method="redi", sampler=sampler, protocol="fixed", k=c.key_step, v=c.value_step(n),
                     h=c.h_claim, tag="equal_nfe")
        if r is None:
            continue
        match = next((p for p in plains if p["mse_mean"] <= r["mse_mean"]), plains[-1])
        s = r["seconds"]
        out["rows"].append({
            "redi_nfe": n, "redi_mse": r["mse_mean"], "redi_seconds": s["total"],
            "redi_seconds_split": {k: s[k] for k in ("partial", "retrieve", "blend", "resume")},
            "retrieval_blend_share": (s["retrieve"] + s["blend"]) / s["total"],
            "plain_nfe_matching": match["nfe"], "plain_mse": match["mse_mean"], "plain_seconds": match["seconds"]["total"],
            "speedup_at_matched_quality": match["seconds"]["total"] / s["total"],
            "plain_full_seconds": plains[-1]["seconds"]["total"],
            "speedup_vs_full": plains[-1]["seconds"]["total"] / s["total"],
        })
    return out


def exp_condition_spread(b: Bench, sampler: str, have: list[dict]) -> dict:
    """Robustness: the same equal-NFE comparison with more diverse conditions (alpha_spread, own KB)."""
    c = b.cfg
    alpha, n = c.alpha_spread, c.alpha_spread_kb
    v = c.value_step(c.half_nfe)
    path = b.kb_path(sampler, alpha=alpha)
    cost = c.queries * (c.steps + c.half_nfe + c.key_step + c.steps - v)
    if not (path / "manifest.json").exists():
        cost += n * c.steps
    b.afford(cost, f"condition-spread check (alpha {alpha})")
    info = b.knowledge_base(sampler, n, alpha=alpha)
    rows = [b.plain_row(sampler, "fixed", c.half_nfe, alpha=alpha)]
    rows += b.redi_sweep(sampler, "fixed", info["kb"], c.key_step, [c.h_claim], [v], tag="spread", alpha=alpha)
    base_plain = find_row(have, method="plain", sampler=sampler, protocol="fixed", nominal_nfe=c.half_nfe)
    base_redi = find_row(have, method="redi", sampler=sampler, protocol="fixed", k=c.key_step, v=v, h=c.h_claim,
                         kb_entries=n, tag="kb_size") or find_row(have, method="redi", sampler=sampler, protocol="fixed",
                                                                  k=c.key_step, v=v, h=c.h_claim, tag="equal_nfe")
    out = {"sampler": sampler, "alpha": alpha, "kb_entries": n, "nfe": c.half_nfe, "h": c.h_claim,
           "kb_build_seconds": info["build_seconds_total"], "rows": rows,
           "verdict_vs_plain": {"fd": verdict_fd(rows[1], rows[0]), "acc": verdict_acc(rows[1], rows[0]),
                                "mse_mean": paired_verdict(rows[1]["_mse"], rows[0]["_mse"])}}
    if base_plain and base_redi:
        out["baseline_alpha"] = {"alpha": c.alpha, "kb_entries": base_redi["kb_entries"],
                                 "redi_mse": base_redi["mse_mean"], "plain_mse": base_plain["mse_mean"],
                                 "redi_residual_centered": base_redi.get("residual_centered_mean")}
    return out


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
                            "numbers": {"redi": {k: r[k] for k in ("fd", "acc", "mse_mean", "mse_p95")},
                                        "plain": {k: p[k] for k in ("fd", "acc", "mse_mean", "mse_p95")}}})
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
    fd_falls = sum(1 for v in lowest if v["budgets"][0]["plain_fd"] < v["plain_full_fd"])
    g["equal_nfe_fd_acc_2_of_3"] = {
        "claim": "ReDi at equal NFE with FD and accuracy at least as good as plain for >= 2 of 3 samplers (fixed seed, "
                 f"H={c.h_claim}, every budget {list(c.budgets)}; 'as good' = not worse beyond 2 combined sd)",
        "met": len(passing) >= 2, "samplers_passing": passing, "samplers_tested": list(per),
        "samplers_passing_strict": [s for s, v in per.items() if v["passes_strict"]], "per_sampler": per,
        "fd_reading": (f"in the fixed-seed protocol the plain sampler's FD at the lowest budget is below its own {c.steps}-step FD "
                       f"for {fd_falls} of {len(lowest)} samplers: with one shared noise, fewer steps give smoother digits "
                       "that sit closer to the real-digit statistics, so FD there does not measure sampler error; ReDi "
                       "reproduces the full-step output and inherits the full-step FD")}
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

STYLIZATION_SKIP = (
    "skipped: paper Fig. 4 keys the trajectory with a content prompt and resumes with content + style prompt. "
    "The digits models have no style conditioning (10 class embeddings and the empty prompt), so there is no "
    "style to add and no style-consistency or layout score to measure; perturbing the class context is not a style "
    "(it does not change how the digit is drawn in a consistent, nameable way). No honest proxy was found, so no "
    "stylization claim is evaluated. A real test needs a style-conditioned model (e.g. SD1.5 with style prompts).")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (< 60 s): structure check for CI")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default benchmarks/results/paper_claims.json; required-by-convention for --smoke)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads; 0 = auto: 2 on an idle machine, 1 when other jobs already load the 2 cores")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                   help="bf16: both UNets under bfloat16 autocast (embedded/demo.py's wrapper), ~2.5x faster here")
    p.add_argument("--scratch", type=Path, default=SCRATCH, help="cache folder for knowledge bases (gitignored)")
    p.add_argument("--fresh", action="store_true", help="delete the cached knowledge bases first (honest build times)")
    p.add_argument("--budget-min", type=float, default=None, help="soft time budget in minutes (default 22; smoke 2)")
    p.add_argument("--render", type=Path, default=None, metavar="JSON",
                   help="only rewrite paper_claims.md and the plots from an existing results JSON")
    return p


def main(argv=None) -> dict:
    a = parser().parse_args(argv)
    if a.render is not None:
        res = json.loads(a.render.read_text())
        write_markdown(res, RESULTS / "paper_claims.md")
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
    D.setup_comfy(threads)
    import warnings

    warnings.filterwarnings("ignore", message=".*sqrtm.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import logging

    logging.getLogger("ReDi").setLevel(logging.ERROR)
    import torch

    b = Bench(cfg, a.precision, scratch, a.fresh, t_start)
    log = print if not a.smoke else (lambda *x, **k: None)
    res: dict = {"benchmark": "paper_claims", "smoke": a.smoke, "skipped": [], "experiments": {}}
    res["setting"] = {
        "models": "embedded digits UNets (ComfyUI BaseModel, v-prediction, 16x16x1 latent = image), large 64 ch / small 32 ch",
        "conditions": (f"class context perturbed per token by alpha * ||token|| * u (u a fixed random unit direction), "
                       f"alpha = {cfg.alpha}; KB directions and query directions are disjoint draws (train / held-out "
                       "split). A stand-in for caption variations, not a text encoder."),
        "protocols": {"fixed": f"every KB trajectory and every query starts from seed {cfg.kb_seed} (official ReDi setup)",
                      "foreign": f"queries start from seeds {cfg.foreign_seed_base}+i, not in the KB (the KB is the fixed-seed one)"},
        "schedule": {"steps_T": cfg.steps, "scheduler": cfg.scheduler, "cfg": cfg.cfg, "key_step_k": cfg.key_step,
                     "nfe_budgets": list(cfg.budgets), "value_step_for_budget": {n: cfg.value_step(n) for n in cfg.budgets},
                     "redi_nfe": "k + (T - v); a guard-rejected item costs T", "half_nfe": cfg.half_nfe},
        "queries_per_set": cfg.queries, "samplers": list(cfg.samplers), "h_for_claims": cfg.h_claim,
        "precision": a.precision, "torch_threads": threads, "kb_sizes": cfg.kb_sizes,
        "judge": {"kind": "sklearn MLPClassifier, 64 ReLU hidden units, on 2x2-pooled 8x8 digits (train split)",
                  "heldout_accuracy": b.judge.test_accuracy, "fd_reference": f"{len(b.real_features)} held-out real digits"},
        "why_cfg_1": "cfg 1.0: one UNet pass per step (half the cost); at cfg 2.5 every method's judge accuracy was 1.00 "
                     "(no room to measure a difference) and samples were less diverse",
        "why_T_10": "plain at 10 steps is within MSE 5e-4 (euler) of 20 steps, while 3-6 steps are 5-40x further: the "
                    "reduced-NFE budgets 3..6 are where a skipped step costs fidelity",
        "noise_floor": {"fd_real_vs_real": fd_noise_floor(b.judge, cfg.queries, b.real_features),
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

    # 0. condition check
    exps["condition_check"] = attempt("condition check", lambda: exp_setting(b))
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
    exps["stylization"] = {"status": "skipped", "reason": STYLIZATION_SKIP}
    res["skipped"].append({"experiment": "4. stylization", "reason": STYLIZATION_SKIP})
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
        exps["wallclock"] = exp_wallclock(b, rows, cfg.samplers[0])
    exps["guard"] = guard
    # 7. regime map: foreign protocol for the other samplers
    for sampler in cfg.samplers[1:]:
        if sampler in b.kbs:
            got = attempt(f"7. equal NFE {sampler} (foreign seed)",
                          lambda s=sampler: exp_equal_nfe(b, s, "foreign", (cfg.h_claim,))["rows"])
            if got:
                rows += got
    exps["regime_map"] = regime_map(b, rows)
    # 8. robustness: more diverse conditions (lowest priority)
    exps["condition_spread"] = attempt("8. condition-spread check", lambda: exp_condition_spread(b, cfg.samplers[0], rows)) \
        if cfg.samplers[0] in b.kbs else None
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
        lines.append(f"On distribution quality the picture is flatter: FD won {tf['win']} / tied {tf['tie']} / lost {tf['loss']}, "
                     f"accuracy won {ta['win']} / tied {ta['tie']} / lost {ta['loss']}, because on this model the plain "
                     "sampler's FD and accuracy barely move between 3 and 10 steps (see the plain rows).")
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
        best = max(wc, key=lambda r: r["speedup_at_matched_quality"])
        lines.append(f"Wall clock at matched fidelity, retrieval and blending included: best {best['speedup_at_matched_quality']:.2f}x "
                     f"(ReDi NFE {best['redi_nfe']} vs plain NFE {best['plain_nfe_matching']:g}); retrieval + blend took "
                     f"{best['retrieval_blend_share']:.0%} of ReDi's time.")
    kb = ((res["experiments"].get("ablations") or {}).get("kb_size") or {}).get("fit", {})
    if kb.get("mse_mean"):
        lines.append(f"The error falls with KB size as N^-{kb['mse_mean']['b']:.2f}; {_parity_text(kb)}.")
    sp = res["experiments"].get("condition_spread")
    if sp and sp.get("baseline_alpha"):
        r = [x for x in sp["rows"] if x["method"] == "redi"][0]
        p = [x for x in sp["rows"] if x["method"] == "plain"][0]
        lines.append(f"With conditions twice as spread (alpha {sp['alpha']:g}) the fidelity advantage at NFE {sp['nfe']} "
                     f"went from {sp['baseline_alpha']['plain_mse'] / sp['baseline_alpha']['redi_mse']:.1f}x to "
                     f"{p['mse_mean'] / r['mse_mean']:.1f}x lower MSE than plain (KB of {sp['kb_entries']}).")
    lines.append("So expect ReDi to pay off when (1) generations reuse the seed(s) the KB was built with, (2) the KB covers "
                 "the conditions densely, and (3) what matters is reproducing the full-step result at fewer steps; do not "
                 "expect it with fresh random seeds, and on a model whose few-step samples are already as good as its "
                 "many-step ones (as here, by FD and accuracy) there is little distribution quality for it to win back.")
    return " ".join(lines)


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
    L = ["# ReDi / T-Stitch paper claims on the embedded digits models", "",
         f"Generated by `benchmarks/paper_claims.py` in {res['wall_seconds'] / 60:.1f} min "
         f"(load {res['machine']['loadavg_before'][0]:.1f} -> {res['machine']['loadavg_after'][0]:.1f} on "
         f"{res['machine']['cpus']} CPUs, {s['precision']}, {s['torch_threads']} thread(s)). Full numbers: `paper_claims.json`.", "",
         "**Setting.** " + s["conditions"] + f" Euler / DPM-Solver++(2M) / iPNDM, T = {s['schedule']['steps_T']} steps, "
         f"{s['schedule']['scheduler']} schedule, cfg {s['schedule']['cfg']}, key step k = {s['schedule']['key_step_k']}, "
         f"ReDi NFE = k + (T - v), H = {s['h_for_claims']} for the claims, guard off unless stated (the paper has none). "
         f"{s['queries_per_set']} queries per set (held-out conditions, 10 classes balanced). "
         f"Protocols: fixed = {s['protocols']['fixed']}; foreign = {s['protocols']['foreign']}.", "",
         f"**Noise floor.** FD of {s['noise_floor']['fd_real_vs_real']['n']} real train digits vs the held-out digits: "
         f"{s['noise_floor']['fd_real_vs_real']['mean']:.2f} +- {s['noise_floor']['fd_real_vs_real']['sd']:.2f}. "
         f"Judge held-out accuracy {s['judge']['heldout_accuracy']:.3f}. " + s["noise_floor"]["decision_rule"] + ".", ""]
    cc = ex.get("condition_check")
    if cc:
        acc = cc["chosen_alpha_accuracy"]
        per = "; ".join(f"alpha {r['alpha']:g} {r['protocol']}: acc {r['acc']:.2f}"
                        + (f", MSE to alpha-0 output {_fmt(r['mse_to_alpha0_same_seed'])}" if "mse_to_alpha0_same_seed" in r else "")
                        for r in cc["rows"])
        L += [f"**Condition check** (euler, plain {s['schedule']['steps_T']} steps, {cc['n']} samples per row): chosen alpha "
              f"gives judge accuracy {acc.get('fixed', float('nan')):.2f} (fixed seed) / {acc.get('foreign', float('nan')):.2f} "
              f"(foreign seeds). {per}. For scale: two different seeds of the same class differ by MSE "
              f"{_fmt(cc.get('mse_between_seeds_alpha0'))}, so these caption variations move a sample far less than a new seed does.", ""]
    for k, v in res["kb"].items():
        L.append(f"KB `{k}`: {v['entries']} trajectories, built in {v['build_seconds_total']:.0f} s "
                 f"({v['ms_per_trajectory']:.0f} ms / trajectory){' (from cache)' if v['cached'] else ''}.")
    L += ["", "## Goals", "", "| goal | verdict | numbers |", "|---|---|---|"]
    g = res["goals"]
    x = g["equal_nfe_fd_acc_2_of_3"]
    detail = "; ".join(f"{k}: budgets passing {v['budgets_passing']} of {[b_['nfe'] for b_ in v['budgets']]}"
                       for k, v in x["per_sampler"].items())
    L.append(f"| ReDi = plain at equal NFE on FD and accuracy, >= 2 of 3 samplers | {_met(x['met'])} | passing all budgets: "
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
          "| sampler | protocol | NFE | plain FD | ReDi FD | plain acc | ReDi acc | plain MSE | ReDi MSE | d(x_v, x_v_hat) | residual (centered) | verdict FD / acc / MSE / p95 |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = ex["equal_nfe"]["rows"]
    for r in ex.get("regime_map") or []:
        red = find_row(rows, method="redi", sampler=r["sampler"], protocol=r["protocol"], nominal_nfe=r["nfe"],
                       h=s["h_for_claims"], guard="off", tag="equal_nfe")
        p, q = r["numbers"]["plain"], r["numbers"]["redi"]
        L.append(f"| {r['sampler']} | {r['protocol']} | {r['nfe']} | {_fmt(p['fd'])} | {_fmt(q['fd'])} | {_fmt(p['acc'])} | "
                 f"{_fmt(q['acc'])} | {_fmt(p['mse_mean'])} | {_fmt(q['mse_mean'])} | {_fmt(red and red.get('d_xv_mean'))} | "
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
    sp = ex.get("condition_spread")
    if sp:
        L += ["", f"## Condition spread check (euler, fixed seed, alpha {sp['alpha']:g}, own KB of {sp['kb_entries']}, NFE {sp['nfe']}, H = {sp['h']})", "",
              "| method | FD | acc | MSE to full | d(x_v, x_v_hat) | residual centered |", "|---|---|---|---|---|---|"]
        for r in sp["rows"]:
            L.append(f"| {r['method']} | {_fmt(r['fd'])} | {_fmt(r['acc'])} | {_fmt(r['mse_mean'])} | {_fmt(r.get('d_xv_mean'))} | "
                     f"{_fmt(r.get('residual_centered_mean'))} |")
        if sp.get("baseline_alpha"):
            ba = sp["baseline_alpha"]
            L.append("")
            L.append(f"Verdicts ReDi vs plain: {sp['verdict_vs_plain']}. At alpha {ba['alpha']:g} with a KB of {ba['kb_entries']}: "
                     f"ReDi MSE {_fmt(ba['redi_mse'])} vs plain {_fmt(ba['plain_mse'])}.")
    ts = ex.get("tstitch")
    if ts:
        L += ["", "## T-Stitch (euler, foreign seeds, T = " + str(s["schedule"]["steps_T"]) + ")", "",
              "| small fraction | small steps | FD | acc | MSE to large-only | time (s) | time vs large-only |", "|---|---|---|---|---|---|---|"]
        for r in ts["rows"]:
            L.append(f"| {r['small_fraction']} | {r['small_steps']} | {_fmt(r['fd'])} | {_fmt(r['acc'])} | {_fmt(r['mse_mean'])} | "
                     f"{_fmt(r['seconds']['total'])} | {_fmt(r['time_vs_large_only'])} |")
    wc = ex.get("wallclock")
    if wc and wc["rows"]:
        L += ["", "## Wall clock at matched fidelity (euler, fixed seed)", "",
              "| ReDi NFE | ReDi s (retrieve+blend share) | ReDi MSE | plain NFE matching | plain s | speed-up | vs plain full |", "|---|---|---|---|---|---|---|"]
        for r in wc["rows"]:
            L.append(f"| {r['redi_nfe']} | {_fmt(r['redi_seconds'])} ({r['retrieval_blend_share']:.0%}) | {_fmt(r['redi_mse'])} | "
                     f"{r['plain_nfe_matching']:g} | {_fmt(r['plain_seconds'])} | {_fmt(r['speedup_at_matched_quality'])}x | {_fmt(r['speedup_vs_full'])}x |")
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
            ax.plot(xs, [r.get("d_xv_mean", np.nan) ** 2 / 256 for r in rs], "s--", color="tab:purple",
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
            if metric == "acc":
                ax.set_ylim(0.8, 1.01)
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


if __name__ == "__main__":
    main()
