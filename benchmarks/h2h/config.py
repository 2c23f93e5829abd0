"""What the head-to-head benchmark measures, fixed before anything runs: regimes, workloads, budgets, sizes, grids.

A regime is a model, a schedule and a guidance scale: the shipped 16x16 large model at T = 20
with cfg 3 ("cfg3", its model card's) and cfg 7.5 ("cfg7.5", Stable Diffusion's usual guidance).
A workload is a query set (workloads.py). Every verdict is against the converged reference
(converged.py) at NFE budgets 4..20, so the oracle's frontier can be read at any method's NFE.
Sizes are per item: a run adds items to the results store (store.py) until each cell has
`items` of them (`wider_items` for the settings beyond each method's default).
"""
from __future__ import annotations

import dataclasses
import math

#: Workloads, most important first: (a) held-out captions, a fresh seed each (the everyday user); (b) the artist's
#: loop (sessions of one user seed, one change per generation, in order); (c) prompt reuse (KB captions nudged, KB
#: seed); (d) the paper's protocol (KB seed, held-out captions).
WORKLOADS = ("heldout_foreign", "iterate", "reuse", "heldout_fixed")
#: The NFE budgets of the T = 20 regimes: dense enough below 10 to read the oracle's frontier at a method's NFE.
BUDGETS_T20 = (4, 5, 6, 8, 10, 12, 16, 20)


@dataclasses.dataclass(frozen=True)
class Regime:
    """A model, a guidance scale and the schedule every method is measured on; its KB is built with exactly this recipe."""

    name: str
    cfg: float = 3.0
    model: str = "crops16"          # which embedded model pair (embedded.models)
    steps: int = 20                 # T
    sampler: str = "euler"          # the user's own full-step recipe (and the KB's)
    scheduler: str = "normal"
    kb_entries: int = 800           # train captions x the one KB seed
    kb_seed: int = 7
    budgets: tuple = BUDGETS_T20

    @property
    def key_step(self) -> int:
        """ReDi's key step on the wider grids: 10% of T (at least 1), as the paper's 5 of 50 scaled to T."""
        return max(1, math.floor(0.1 * self.steps + 0.5))

    @property
    def default_key_step(self) -> int:
        """The ReDiSampler node's default key step (5 of 20) scaled to T."""
        return max(1, math.floor(0.25 * self.steps + 0.5))

    @property
    def default_value_step(self) -> int:
        """The nodes' default value step (10 of 20): half of T."""
        return self.steps // 2

    @property
    def default_corrected_nfe(self) -> int:
        """SamplerReDiCorrected's default nfe (6 at T = 20) scaled to T, at least 2."""
        return max(2, math.floor(0.3 * self.steps + 0.5))

    def settings(self) -> dict:
        """The regime as the summary records it."""
        return {"model": self.model, "steps": self.steps, "cfg": self.cfg, "sampler": self.sampler,
                "scheduler": self.scheduler, "kb_entries": self.kb_entries, "kb_seed": self.kb_seed,
                "budgets": list(self.budgets)}


@dataclasses.dataclass
class Config:
    regimes: tuple = (Regime("cfg3", 3.0), Regime("cfg7.5", 7.5))
    workloads: tuple = WORKLOADS
    queries: int = 200                  # items per headline cell the run fills (--items)
    wider_items: int = 64               # items per cell beyond each method's default
    chunk: int = 16                     # items computed and committed together
    foreign_seed_base: int = 1_000_000
    # (c) prompt reuse: a KB caption with its crop centre moved by up to `reuse_shift`, its size scaled by
    # up to exp(+-reuse_log_size), and its sepia strength moved by `reuse_sepia` (within [0, 1]).
    reuse_shift: float = 0.04
    reuse_log_size: float = 0.08
    reuse_sepia: float = 0.25
    # (b) the artist's loop: sessions of `iterate_session` generations (the reuse nudges, each from the previous
    # caption), session s from the seed iterate_seed_base + s (no KB seed, no foreign or selection seed).
    iterate_session: int = 12
    iterate_seed_base: int = 2_000_000
    # The oracle: the best plain sampler x schedule per budget against the converged reference, chosen on held-out
    # selection captions (never evaluation queries): every choice on `oracle_screen_captions`, then the
    # `oracle_finalists` best of each budget on `oracle_captions`. None: kb_tools' PLAIN_SAMPLERS / PLAIN_SCHEDULES.
    oracle_samplers: tuple | None = None
    oracle_schedules: tuple | None = None
    oracle_screen_captions: int = 2
    oracle_finalists: int = 5
    oracle_captions: int = 12
    converged: tuple | None = None      # the reference solver (sampler, scheduler, N); None: converged.DEFAULT_SOLVER
    # Native caches (applied as ComfyUI's nodes apply them) and T-Stitch.
    cache_thresholds: tuple = (0.05, 0.1, 0.2, 0.4)
    cache_core_threshold: float = 0.2   # the nodes' default
    tstitch_fractions: tuple = (0.2, 0.4, 0.6)
    tstitch_core_fraction: float = 0.4
    # ReDi grids (wider settings): at the middle budget, these H / weight modes / key steps too.
    redi_h_main: int = 3
    redi_h_extra: tuple = (1, 16, 64)
    redi_modes_extra: tuple = ("affine", "ridge")
    redi_modes_h: int = 16
    # The error guard and the adaptive skip: tolerances on the predicted blend error, in units of the KB's spread;
    # "plain" (the default tolerance) is no worse than plain euler at equal NFE (the KB's plain reference).
    redi_error_tolerances: tuple = ("plain", 0.05, 0.1, 0.2, 0.4)
    # The learning KB at the ReDiLearningSampler node's defaults (nodes/learning.py): residual guard 0.1, H 3, lstsq,
    # store steps "auto", a budget of 10000 entries.
    learning_guards: tuple = (0.1,)
    learning_max_entries: int = 10_000
    # Retrieval for any seed (an experiment in no node) at its best configuration (benchmarks/results/any_seed.md).
    any_seed_value_fractions: tuple = (0.3, 0.5, 0.7)
    any_seed_h: int = 3
    # The KB-calibrated sampler: its NFE budgets and teachers (taken from the regime KB's entries).
    calibrated_nfe: tuple = (4, 5, 6, 8, 10)
    calibrated_teachers: int = 128
    # 0: the tables as the calibration first fitted them (the cfg-3 calibration began before the final-state refinement
    # existed, and its N continue so); 2 is the node's default now: set it to measure that (recalibrates every N).
    calibrated_refine_iterations: int = 0
    methods: tuple | None = None        # only these registry methods (None: all)
    smoke: bool = False

    @classmethod
    def smoke_config(cls) -> Config:
        """Tiny sizes that run every method once (the numbers mean nothing): T = 6, one regime, a small oracle grid.

        The caches get a high threshold, so that at T = 6 they do skip evaluations (counted, not computed)."""
        return cls(regimes=(Regime("smoke", 3.0, steps=6, kb_entries=24, budgets=(3, 4, 6)),),
                   workloads=("heldout_fixed", "iterate"), queries=4, wider_items=4, chunk=2,
                   oracle_samplers=("euler", "heun", "dpmpp_2m"), oracle_schedules=("normal", "karras", "ays_sd1"),
                   oracle_screen_captions=1, oracle_finalists=2, oracle_captions=2, converged=("dpmpp_2m", "karras", 12),
                   cache_thresholds=(1.0,), cache_core_threshold=1.0, tstitch_fractions=(0.4,), redi_h_extra=(),
                   redi_modes_extra=(), redi_error_tolerances=("plain",), calibrated_nfe=(4,), calibrated_teachers=4, calibrated_refine_iterations=1,
                   iterate_session=3,
                   smoke=True)
