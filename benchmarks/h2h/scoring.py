"""How every head-to-head run is scored, the same way for every method: plain numpy over the judge's readings.

- FD in the judge's 128-d features against real renderings of the query captions, with its
  bootstrap sd (the workload's real-vs-real noise floor is measured once per query set);
- faithfulness: source accuracy (binomial se), crop-geometry and sepia errors;
- per-sample MSE to the plain full-step output from the same noise and prompt (0 for that run).
Shapes: latents [N, 3, 16, 16]; per-sample arrays [N].
"""
from __future__ import annotations

import dataclasses

import numpy as np

from benchmarks import metrics as M
from benchmarks.report import private
from embedded.judge import faithfulness


@dataclasses.dataclass
class Quality:
    """What one output set looks like to the judge and how far it is from the full-step plain output."""

    fd: float
    fd_sd: float
    acc: float
    acc_se: float
    geo_err: float
    sepia_err: float
    mse_mean: float
    mse_se: float
    mse_p95: float
    finite: bool
    mse: np.ndarray = private()  # [N] per-sample MSE, for paired verdicts


def score(judge, latents, captions, real_features: np.ndarray, reference) -> Quality:
    """Quality of latents [N, ...] made for `captions`, against real features and the full-step reference."""
    x = np.asarray(latents, np.float32)
    finite = bool(np.isfinite(x).all())
    reading = judge.read(np.nan_to_num(x))
    faith = faithfulness(reading, list(captions))
    mse = M.per_sample_mse(x, np.asarray(reference, np.float32))
    mse_mean, mse_se = M.mean_se(mse) if len(mse) > 1 else (float(mse.mean()), 0.0)
    return Quality(M.frechet_distance(reading.features, real_features),
                   M.fd_bootstrap_sd(reading.features, real_features), faith.acc, faith.acc_se, faith.geo_err,
                   faith.sepia_err, mse_mean, mse_se, float(np.percentile(mse, 95)), finite, mse)


#: Per-sample MSE differences this small are float rounding, not a verdict: the same sampler run on a batch of one
#: (a learning KB's generations) and on the whole query set differs in the last bits (about 1e-14 here).
MSE_ROUNDING = 1e-9


def mse_verdict(mse: np.ndarray, base: np.ndarray) -> str:
    """Paired per-sample MSE verdict (2 se); a tie where every item's difference is float rounding."""
    if len(mse) < 2 or np.abs(np.asarray(mse) - np.asarray(base)).max() <= MSE_ROUNDING:
        return M.TIE
    return M.paired_verdict(mse, base)


def verdicts(row: dict, q: Quality, base: dict, bq: Quality) -> dict:
    """win / tie / loss of a row against a baseline row: FD and accuracy beyond 2 sd, MSE by paired se."""
    return {"fd": M.interval_verdict(row["fd"], row["fd_sd"], base["fd"], base["fd_sd"], higher_is_better=False),
            "acc": M.interval_verdict(row["acc"], row["acc_se"], base["acc"], base["acc_se"], higher_is_better=True),
            "mse": mse_verdict(q.mse, bq.mse)}


def record_quality(q: Quality) -> dict:
    """The JSON fields of a Quality (per-sample arrays left out)."""
    return {f.name: getattr(q, f.name) for f in dataclasses.fields(q) if not f.metadata.get("private")}
