"""What the paper-claims run measures: schedule, knowledge-base sizes, budgets, H, ablation grids."""
from __future__ import annotations

import dataclasses


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
    #: None: run every experiment the config asks for. A number of seconds (--budget-min): leave out
    #: the experiments that would end the run past it, estimated from the sampling speed so far.
    soft_budget_s: float | None = None
    smoke: bool = False

    @classmethod
    def smoke_config(cls) -> Config:
        """Tiny sizes that exercise every experiment and every JSON field (the numbers mean nothing)."""
        return cls(samplers=("euler",), kb_sizes={"euler": 24}, queries=12, budgets=(5,), plain_extra={},
                   h_main=(1, 3), h_extra=(), reference_renders=2, setting_extra_steps=(12,),
                   kb_size_ablation=(12, 24), gap_values=(6, 7), key_values=(2, 3), cond_key_budgets=(5,),
                   style_queries=8, style_value_steps=(4,), tstitch_fractions=(0.0, 0.4, 1.0), smoke=True)

    def value_step(self, nfe: int, k: int | None = None) -> int:
        """The value step v that gives ReDi `nfe` model evaluations with key step k (NFE = k + T - v)."""
        k = self.key_step if k is None else k
        return k + self.steps - nfe
