"""The shared state of a head-to-head run: models counted at the forward pass, judge, KBs, query sets, references.

Every sample goes through `embedded.sampling` (the pack's kb_tools code paths: plain
`sample_prompts`, ReDi `generate`, `tstitch_sample`, `build_knowledge_base`) on the embedded
crops UNets. Both models are clones whose diffusion model counts its forward rows per item
(benchmarks/forward_counter.py); `measure` opens a counting session on both and times the block (wall and
CPU seconds). Caches (EasyCache, LazyCache) are applied to the uncounted model first and
counted after (methods/caches.py), so the calls they answer from the cache cost nothing.
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from benchmarks import metrics as M
from embedded import sampling as S
from embedded.judge import Judge
from embedded.models import bf16_autocast, load_models
from embedded.rendering import LATENT_SHAPE
from benchmarks.forward_counter import ForwardCounter, counted
from kb_tools.core.records import Recipe

from . import kbs
from .config import Config, Regime
from .timing import Timer
from .workloads import Queries

#: Model roles as counted: the large (main) model and T-Stitch's small model.
ROLES = ("large", "small")


@dataclasses.dataclass
class Measured:
    """What one run cost: NFE per item and role (counted at the forward pass), wall and CPU seconds."""

    nfe: dict[str, np.ndarray]
    unconditional: dict[str, np.ndarray]
    wall: float
    cpu: float


@dataclasses.dataclass
class Reference:
    """The plain reference run of a query set (the regime's sampler at T) and what it cost."""

    latents: torch.Tensor
    measured: Measured


def forward_flops(model, batch: int = 4) -> float:
    """FLOPs of one forward row of the model's diffusion network (torch's FLOP counter, the embedded latent size)."""
    from torch.utils.flop_counter import FlopCounterMode

    net = model.model.diffusion_model
    cond = S.conditioning(["digit 0"] * batch)[0][0][0]
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        net(torch.zeros((batch, *LATENT_SHAPE)), torch.full((batch,), 500.0), context=cond)
    return fc.get_total_flops() / batch


class Bench:
    """Models, judge, knowledge bases and reference runs shared by every method of one run."""

    def __init__(self, cfg: Config, scratch: Path, precision: str = "fp32", log: Callable[..., None] = print):
        self.cfg, self.scratch, self.log = cfg, scratch, log
        scratch.mkdir(parents=True, exist_ok=True)
        large, small, _ = load_models()
        if precision == "bf16":  # as paper_claims: autocast through ComfyUI's unet wrapper, under the counter
            large, small = bf16_autocast(large), bf16_autocast(small)
        self.plain_models = {"large": large, "small": small}
        self.counters = {role: ForwardCounter() for role in ROLES}
        self.models = {role: counted(m, self.counters[role])[0] for role, m in self.plain_models.items()}
        self.judge = Judge()
        # One small-model row costs this many large-model rows (FLOPs): T-Stitch's NFE in large-model units.
        self.small_cost = forward_flops(small) / forward_flops(large)
        self.kbs: dict[str, kbs.KBInfo] = {}
        self._refs: dict[tuple, Reference] = {}
        self._real: dict[tuple, np.ndarray] = {}
        self._floors: dict[tuple, dict] = {}
        self._warm()

    def _warm(self) -> None:
        """One tiny run per model, so the first measured run does not pay for loading."""
        for role in ROLES:
            self.plain_run(self.models[role], ["digit 0"], [0], "euler", "normal", 2, 3.0)

    # ------------------------------------------------------------------ counting and timing
    @contextlib.contextmanager
    def measure(self, batch: int) -> Iterator[Measured]:
        """Count forward rows of both models per item and time the block; fills the yielded Measured on exit."""
        out = Measured({}, {}, 0.0, 0.0)
        with contextlib.ExitStack() as stack:
            sessions = {role: stack.enter_context(c.session(batch)) for role, c in self.counters.items()}
            timer = stack.enter_context(Timer())
            yield out
        out.nfe = {role: s.nfe() for role, s in sessions.items()}
        out.unconditional = {role: s.negative.copy() for role, s in sessions.items()}
        out.wall, out.cpu = timer.wall, timer.cpu

    @contextlib.contextmanager
    def one_item(self, index: int) -> Iterator[None]:
        """Inside `measure`: the forward rows of a batch-of-one run count for item `index` (a workload run in order)."""
        with contextlib.ExitStack() as stack:
            for c in self.counters.values():
                stack.enter_context(c.item(index))
            yield

    def cost_nfe(self, m: Measured) -> np.ndarray:
        """float [N]: NFE per item in large-model units (a small-model row counts `small_cost`)."""
        return m.nfe["large"] + self.small_cost * m.nfe["small"]

    # ------------------------------------------------------------------ sampling
    def plain_run(self, model, prompts: Sequence[str], seeds: Sequence[int], sampler: str, scheduler: str, steps: int,
                  cfg: float) -> torch.Tensor:
        """The plain sampler over its own schedule from each item's seed, one batch: latents [N, C, H, W]."""
        return S.plain(model, list(prompts), list(seeds), Recipe(sampler, scheduler, steps, cfg)).latents

    def reference(self, regime: Regime, queries: Queries) -> Reference:
        """The regime's plain sampler at T on the queries, from the same seeds (cached per query set)."""
        key = (regime.name, queries.prompts, queries.seeds)
        if key not in self._refs:
            with self.measure(len(queries)) as m:
                lat = self.plain_run(self.models["large"], queries.prompts, queries.seeds, regime.sampler,
                                     regime.scheduler, regime.steps, regime.cfg)
            self._refs[key] = Reference(lat, m)
        return self._refs[key]

    # ------------------------------------------------------------------ knowledge bases
    def kb_path(self, regime: Regime, tag: str = "") -> Path:
        name = (f"kb_{regime.model}_{regime.sampler}-{regime.scheduler}_T{regime.steps}_cfg{regime.cfg:g}"
                f"_seed{regime.kb_seed}_n{regime.kb_entries}")
        return self.scratch / (name + (f"_{tag}" if tag else ""))

    def kb(self, regime: Regime) -> kbs.KBInfo:
        """The regime's KB (every step 1..T-1 stored), with a guard calibration for its main key step and H."""
        if regime.name not in self.kbs:
            info = kbs.build(self.kb_path(regime), self.models["large"], regime)
            self.kbs[regime.name] = kbs.calibrated(info, regime.key_step, self.cfg.redi_h_main, self.plain_models["large"])
            self.log(f"  KB {info.name}: {info.entries} entries, built in {info.build_wall_seconds:.0f} s wall / "
                     f"{info.build_cpu_seconds:.0f} s CPU ({info.added_this_run} added this run)", flush=True)
        return self.kbs[regime.name]

    def style_free_kb(self, regime: Regime) -> kbs.KBInfo:
        """The regime KB's sepia-0 entries (stylization's KB, the paper's setting), calibrated as the main KB."""
        name = regime.name + ":stylefree"
        if name not in self.kbs:
            info = kbs.style_free(self.kb(regime), self.kb_path(regime, "stylefree"))
            self.kbs[name] = kbs.calibrated(info, regime.key_step, self.cfg.redi_h_main, self.plain_models["large"])
        return self.kbs[name]

    # ------------------------------------------------------------------ the judge's references
    def real_features(self, queries: Queries) -> np.ndarray:
        """Judge features of `reference_renders` real renderings of each query caption (the FD reference)."""
        key = queries.captions
        if key not in self._real:
            self._real[key] = self.judge.real_features(list(queries.captions), self.cfg.reference_renders)
        return self._real[key]

    def noise_floor(self, queries: Queries) -> dict:
        """FD of fresh real renderings of the query captions against the reference: what a perfect generator gets."""
        key = queries.captions
        if key not in self._floors:
            ref = self.real_features(queries)
            floor = M.fd_noise_floor(lambda: self.judge.features(self.judge.real(list(queries.captions))), ref,
                                     self.cfg.floor_draws)
            self._floors[key] = {"n": len(queries), **floor}
        return self._floors[key]
