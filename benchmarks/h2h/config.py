"""What the head-to-head run measures, fixed before anything runs: regimes, workloads, budgets, sizes, grids.

A regime is a model and a schedule (the shipped 16x16 large model, cfg 3 as its model card
recommends). A workload is a query set (held-out captions from the KB's seed or from foreign
seeds, near-repeats of KB captions, stylization, the artist's loop from the user's own seed).
Every method runs at NFE budgets from about 25% to 100% of T. The default run is the issue's
main regime, T = 20, every method on every workload (`depth` "full"); T = 10 and T = 30 (`Regime("T10", steps=10)`, depth "core") and a
harder regime (a 32x32 model) are not in the default run yet.
"""
from __future__ import annotations

import dataclasses
import math

#: Workloads: (a) held-out captions from the KB seed (paper protocol) and from foreign seeds,
#: (b) near-repeats of KB captions from the KB seed, (c) stylization (content key, styled resume),
#: (d) the artist's loop: sessions of small prompt changes from the user's own fixed seed, in generation order.
WORKLOADS = ("heldout_fixed", "heldout_foreign", "reuse", "style", "iterate")


@dataclasses.dataclass(frozen=True)
class Regime:
    """A model and the schedule every method is measured on; its KB is built with exactly this recipe."""

    name: str
    model: str = "crops16"          # which embedded model pair (embedded.models)
    steps: int = 20                 # T
    cfg: float = 3.0
    sampler: str = "euler"          # the reference sampler (and the KB's)
    scheduler: str = "normal"
    kb_entries: int = 2000          # train captions x the one KB seed
    kb_seed: int = 7
    workloads: tuple = ("heldout_fixed",)
    depth: str = "core"             # "full": every setting of every method; "core": each method's main settings
    budget_fractions: tuple = (0.25, 0.5, 0.75, 1.0)

    @property
    def budgets(self) -> tuple[int, ...]:
        """NFE budgets: fractions of T rounded half up, at least 2."""
        return tuple(sorted({max(2, math.floor(f * self.steps + 0.5)) for f in self.budget_fractions}))

    @property
    def key_step(self) -> int:
        """ReDi's main key step: 10% of T (at least 1), as the paper's 5 of 50 scaled to T."""
        return max(1, math.floor(0.1 * self.steps + 0.5))


@dataclasses.dataclass
class Config:
    regimes: tuple = (Regime("T20", steps=20, workloads=WORKLOADS, depth="full"),)
    queries: int = 200                  # evaluation captions per workload
    reference_renders: int = 5          # real renderings per query caption in the FD reference
    floor_draws: int = 10               # real-vs-real FD draws for the noise floor
    foreign_seed_base: int = 1_000_000
    # (b) prompt reuse: a KB caption with its crop centre moved by up to `reuse_shift`, its size scaled by
    # up to exp(+-reuse_log_size), and its sepia strength moved by `reuse_sepia` (within [0, 1]).
    reuse_shift: float = 0.04
    reuse_log_size: float = 0.08
    reuse_sepia: float = 0.25
    # (d) the artist's loop: sessions of `iterate_session` generations (the reuse nudges, each from the previous
    # caption), session s from the seed iterate_seed_base + s (no KB seed, no foreign or selection seed).
    iterate_session: int = 12
    iterate_seed_base: int = 2_000_000
    # The oracle: the best plain sampler x scheduler per NFE budget, chosen on `oracle_captions` held-out
    # captions that are not evaluation captions (foreign seeds), by per-sample MSE to a converged run.
    oracle_samplers: tuple = ("euler", "heun", "dpmpp_2m", "uni_pc", "ipndm", "deis", "res_multistep")
    oracle_schedulers: tuple = ("normal", "karras", "exponential", "sgm_uniform", "simple", "beta")
    oracle_captions: int = 12
    converged: tuple = ("heun", "normal", 60)   # the selection reference: sampler, scheduler, steps
    # Native caches (applied as ComfyUI's nodes apply them) and T-Stitch.
    cache_thresholds: tuple = (0.05, 0.1, 0.2, 0.4)
    cache_core_threshold: float = 0.2   # the nodes' default
    tstitch_fractions: tuple = (0.2, 0.4, 0.6)
    tstitch_core_fraction: float = 0.4
    # ReDi grids on a depth-"full" regime: at the middle budget, these H / weight modes / key steps too.
    redi_h_main: int = 3
    redi_h_extra: tuple = (1, 16, 64)
    redi_modes_extra: tuple = ("affine", "ridge")
    redi_modes_h: int = 16
    # The error guard and the adaptive skip: tolerances on the predicted blend error, in units of
    # the KB's spread at the value step, fixed in advance; "plain" is the default tolerance, no worse than
    # plain euler at equal NFE (the KB's plain reference, measured when the KB is calibrated).
    redi_error_tolerances: tuple = ("plain", 0.05, 0.1, 0.2, 0.4)
    # The learning KB at the ReDiLearningSampler node's defaults (nodes/learning.py): residual
    # guard 0.1, H 3, lstsq, store steps "auto", a budget of 10000 entries; value steps: the node's 10 of 20 (half of T)
    # and the middle budget's.
    learning_guards: tuple = (0.1,)
    learning_max_entries: int = 10_000
    # Retrieval for any seed at the best configuration of benchmarks/results/any_seed.md on
    # foreign seeds (key source "previous", value "blend+residual", lstsq, H 3, k 2) and its value steps 6, 10, 14 of
    # T = 20, here as fractions of T.
    any_seed_value_fractions: tuple = (0.3, 0.5, 0.7)
    any_seed_h: int = 3
    methods: tuple | None = None        # a reduced run: only these registry methods (None: all)
    style_sepia: float = 1.0            # (c): the style appended to the content caption
    smoke: bool = False

    @classmethod
    def smoke_config(cls) -> Config:
        """Tiny sizes that run every method once on every workload (the numbers mean nothing).

        The caches get a high threshold, so that at T = 6 they do skip evaluations (counted, not computed); the learning
        KB also a guard no residual reaches, so that every item after the first blends (counted too)."""
        return cls(regimes=(Regime("T6", steps=6, kb_entries=24, workloads=WORKLOADS, depth="smoke",
                                   budget_fractions=(0.5, 1.0)),),
                   queries=8, reference_renders=2, floor_draws=3, oracle_samplers=("euler", "heun", "dpmpp_2m"),
                   oracle_schedulers=("normal", "karras"), oracle_captions=4, converged=("heun", "normal", 12),
                   cache_thresholds=(1.0,), cache_core_threshold=1.0, tstitch_fractions=(0.4,), redi_h_extra=(), redi_modes_extra=(),
                   redi_error_tolerances=("plain", 0.1, 10.0), learning_guards=(0.1, 1e3), iterate_session=4, smoke=True)

    def reduced(self, queries: int, kb_entries: int, workloads: tuple) -> Config:
        """This config with fewer queries / KB entries / workloads (a reduced run; the JSON records the sizes)."""
        regimes = tuple(dataclasses.replace(r, kb_entries=kb_entries, workloads=tuple(w for w in workloads if w in r.workloads))
                        for r in self.regimes)
        return dataclasses.replace(self, regimes=regimes, queries=queries)
