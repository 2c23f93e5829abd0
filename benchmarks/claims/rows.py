"""Typed result rows of the paper-claims benchmark, and the table the experiments look them up in.

Every row's JSON record (benchmarks.report.record) keeps the keys of the results file that
tests/test_paper_claims_smoke.py, the markdown writer and README's block read.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from benchmarks.report import flatten, optional, private


@dataclasses.dataclass
class Quality:
    """Metrics of one set of generated images: FD, condition faithfulness, fidelity to a reference run."""

    fd: float                    # Frechet distance to real crops in the judge's feature space
    fd_sd: float                 # its bootstrap sd
    finite: bool
    acc: float                   # judge source accuracy, with binomial se
    acc_se: float
    geo_err: float               # mean |error| of (cx, cy, log size)
    geo_err_se: float
    sepia_err: float
    sepia_err_se: float
    geo: np.ndarray = private()  # per-sample geometry error [N]
    # against a reference run from the same noise and condition (when there is one)
    mse_mean: float | None = optional()
    mse_se: float | None = optional()
    mse_p95: float | None = optional()
    mse_worst5_mean: float | None = optional()
    mse: np.ndarray | None = private(default=None)  # per-sample MSE [N]
    # ReDi: the blended value against the query's own latent at v, and the retrieval residuals
    d_xv_mean: float | None = optional()
    d_xv_rel: float | None = optional()
    residual_rel_mean: float | None = optional()
    residual_centered_mean: float | None = optional()


@dataclasses.dataclass
class PlainRow:
    """The plain sampler at `nominal_nfe` steps on a query set."""

    method: str = dataclasses.field(default="plain", init=False)
    sampler: str
    protocol: str                # "fixed" (the KB's seed) or "foreign" (seeds not in the KB)
    nfe: float
    nominal_nfe: int
    seconds: dict                # {"total": s}
    quality: Quality = flatten()


@dataclasses.dataclass
class ReDiRow:
    """ReDi with key step k, value step v and H neighbours on a query set."""

    method: str = dataclasses.field(default="redi", init=False)
    sampler: str
    protocol: str
    k: int
    v: int
    h: int
    nominal_nfe: int             # k + T - v
    nfe: float                   # mean per item: a guard-rejected item costs T
    kb_entries: int
    guard: str | float           # "off", "auto" or the threshold given
    guard_threshold: float
    guard_source: str            # where the threshold came from: "given", "calibrated" (stored in the KB) or "fallback"
    accepted: float              # share of items that used the blend
    same_source_neighbours: float
    seconds: dict                # {"partial", "retrieve", "blend", "resume", "total"}
    tag: str                     # the experiment that ran it: equal_nfe, extra_h, kb_size, gap, key_step, guard
    quality: Quality = flatten()


@dataclasses.dataclass
class CondKeyRow:
    """ReDi with neighbours found by the condition embedding instead of the trajectory key (paper Table 3)."""

    method: str                  # the variant
    sampler: str
    protocol: str
    k: int
    v: int
    h: int
    nominal_nfe: int
    nfe: float
    same_source_neighbours: float
    quality: Quality = flatten()


@dataclasses.dataclass
class SettingRow:
    """The plain sampler at `steps` steps (is the question real?)."""

    steps: int
    quality: Quality = flatten()


@dataclasses.dataclass
class TStitchRow:
    """T-Stitch with the small model on the first `small_fraction` of the steps."""

    method: str = dataclasses.field(default="tstitch", init=False)
    sampler: str
    protocol: str
    small_fraction: float
    small_steps: int
    small_evaluations: int
    large_evaluations: int
    seconds: dict
    params: dict                 # {"small": n, "large": n} UNet parameters
    quality: Quality = flatten()
    time_vs_large_only: float | None = optional()


@dataclasses.dataclass
class StyleRow:
    """One way to get the styled caption (direct, prompt switch, ReDi stylization)."""

    method: str
    nfe: float
    seconds: float
    quality: Quality = flatten()
    layout_similarity: float = 0.0
    layout_similarity_se: float = 0.0
    sepia_reading: float = 0.0
    layout: np.ndarray = private(default=None)  # per-sample luminance correlation [N]
    v: int | None = optional()
    k: int | None = optional()
    h: int | None = optional()
    residual_centered_mean: float | None = optional()


@dataclasses.dataclass
class WallclockRow:
    """ReDi's time at one budget against the cheapest plain run of matched quality."""

    sampler: str
    redi_nfe: int
    redi_mse: float
    redi_fd: float
    redi_seconds: float
    redi_seconds_split: dict
    retrieval_blend_share: float
    plain_nfe_matching: float
    plain_mse: float
    plain_seconds: float
    speedup_at_matched_quality: float
    plain_nfe_matching_fd: float
    plain_fd: float
    speedup_at_matched_fd: float
    plain_full_seconds: float
    speedup_vs_full: float


class Table:
    """The plain and ReDi rows measured so far, in the order they were added, indexed by what defines them."""

    def __init__(self):
        self.rows: list[PlainRow | ReDiRow] = []
        self._plain: dict[tuple, PlainRow] = {}
        self._redi: dict[tuple, ReDiRow] = {}

    def add(self, rows) -> None:
        for r in rows:
            self.rows.append(r)
            if isinstance(r, PlainRow):
                self._plain.setdefault((r.sampler, r.protocol, r.nominal_nfe), r)
            else:
                self._redi.setdefault((r.sampler, r.protocol, r.k, r.v, r.h, r.tag, r.guard), r)

    def plain(self, sampler: str, protocol: str, nfe: int) -> PlainRow | None:
        """The plain run at `nfe` steps."""
        return self._plain.get((sampler, protocol, nfe))

    def redi(self, sampler: str, protocol: str, k: int, v: int, h: int, tag: str = "equal_nfe") -> ReDiRow | None:
        """The guard-off ReDi run with these settings from experiment `tag`."""
        return self._redi.get((sampler, protocol, k, v, h, tag, "off"))

    def plains(self, sampler: str, protocol: str) -> list[PlainRow]:
        """Every plain run of a sampler and protocol, cheapest first."""
        return sorted((r for r in self._plain.values() if (r.sampler, r.protocol) == (sampler, protocol)),
                      key=lambda r: r.nfe)

    def redi_rows(self, sampler: str, protocol: str, tags: tuple[str, ...], k: int) -> list[ReDiRow]:
        """ReDi runs of a sampler and protocol with key step k from the experiments `tags`."""
        return [r for r in self.rows if isinstance(r, ReDiRow) and (r.sampler, r.protocol, r.k) == (sampler, protocol, k)
                and r.tag in tags]

    def equal_nfe_rows(self) -> list[PlainRow | ReDiRow]:
        """The rows of the equal-NFE experiments (plain runs and ReDi's equal_nfe / extra_h sweeps)."""
        return [r for r in self.rows if isinstance(r, PlainRow) or r.tag in ("equal_nfe", "extra_h")]
