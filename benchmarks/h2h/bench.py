"""The shared state of a head-to-head run: models counted at the forward pass, the judge, KBs, converged references.

Every sample goes through `embedded.sampling` / kb_tools (the pack's code paths) on the embedded
crops UNets. Both models are clones whose diffusion model counts its forward rows per item
(benchmarks/forward_counter.py); `measure` opens a counting session on both and times the block
(wall and CPU seconds). Caches (EasyCache, LazyCache) are applied to the uncounted model first and
counted after (methods/caches.py), so the calls they answer from the cache cost nothing. Plain runs
sample on explicit noise levels (`kb_tools.comfy.schedules.plain_sigmas`), so a KSampler scheduler
and a preset node's schedule (AYS, GITS) run the same way, as a SamplerCustom graph runs them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import re
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from benchmarks.forward_counter import ForwardCounter, counted
from embedded import sampling as S
from embedded.judge import Judge
from embedded.models import load_models
from embedded.rendering import LATENT_SHAPE
from embedded.text_encoder import encode
from kb_tools.comfy.counted import sample_counted
from kb_tools.comfy.plain import cfg_guider
from kb_tools.comfy.schedules import plain_sigmas

from . import converged as C
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


def forward_flops(model, batch: int = 4) -> float:
    """FLOPs of one forward row of the model's diffusion network (torch's FLOP counter, the embedded latent size)."""
    from torch.utils.flop_counter import FlopCounterMode

    net = model.model.diffusion_model
    cond = S.conditioning(["digit 0"] * batch)[0][0][0]
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        net(torch.zeros((batch, *LATENT_SHAPE)), torch.full((batch,), 500.0), context=cond)
    return fc.get_total_flops() / batch


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")[:80]


class Bench:
    """Models, judge, knowledge bases and converged references shared by every method of one run."""

    def __init__(self, cfg: Config, scratch: Path, converged_cache: Path | None = None, log: Callable[..., None] = print):
        self.cfg, self.scratch, self.log = cfg, scratch, log
        self.converged_cache = converged_cache
        scratch.mkdir(parents=True, exist_ok=True)
        large, small, _ = load_models()
        self.plain_models = {"large": large, "small": small}
        self.counters = {role: ForwardCounter() for role in ROLES}
        self.models = {role: counted(m, self.counters[role])[0] for role, m in self.plain_models.items()}
        self.judge = Judge()
        # One small-model row costs this many large-model rows (FLOPs): T-Stitch's NFE in large-model units.
        self.small_cost = forward_flops(small) / forward_flops(large)
        self.kbs: dict[str, kbs.KBInfo] = {}
        self._full: dict[tuple, torch.Tensor] = {}

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
    def plain_run(self, model, prompts: Sequence[str], seeds: Sequence[int], sampler: str, schedule: str, steps: int,
                  cfg: float) -> torch.Tensor:
        """The plain sampler over the schedule's noise levels (a KSampler scheduler or a preset node's) from each item's
        seed, one batch: latents [N, C, H, W]."""
        sigmas = plain_sigmas(model, sampler, schedule, steps)
        positive, negative = S.conditioning(list(prompts))
        out, _, _ = sample_counted(cfg_guider(model, positive, negative, cfg), S.empty_latents(len(prompts)),
                                   list(seeds), sigmas, sampler)
        return out

    def full_step(self, regime: Regime, queries: Queries) -> torch.Tensor:
        """The user's own full-step run (the regime's plain sampler at T, uncounted) of the queries: [N, C, H, W]."""
        key = (regime.name, queries.prompts, queries.seeds)
        if key not in self._full:
            self._full = {key: self.plain_run(self.plain_models["large"], queries.prompts, queries.seeds, regime.sampler,
                                              regime.scheduler, regime.steps, regime.cfg)}  # one chunk kept at a time
        return self._full[key]

    def converged(self, regime: Regime, queries: Queries) -> C.Converged:
        """The converged references of the queries (cached on disk by converged.py; sampled only where missing)."""
        return C.converged(self.plain_models["large"], encode, list(queries.prompts), list(queries.seeds), cfg=regime.cfg,
                           latent_shape=LATENT_SHAPE, solver=self.cfg.converged or C.DEFAULT_SOLVER,
                           cache_dir=self.converged_cache, batch_size=16)

    # ------------------------------------------------------------------ knowledge bases
    def kb_path(self, regime: Regime, tag: str = "") -> Path:
        name = (f"kb_{regime.model}_{regime.sampler}-{regime.scheduler}_T{regime.steps}_cfg{regime.cfg:g}"
                f"_seed{regime.kb_seed}_n{regime.kb_entries}")
        return self.scratch / (name + (f"_{tag}" if tag else ""))

    def kb(self, regime: Regime) -> kbs.KBInfo:
        """The regime's KB (every step 1..T-1 stored), with guard calibrations for the wider grids' key step and the
        node's default key step (H 3)."""
        if regime.name not in self.kbs:
            info = kbs.build(self.kb_path(regime), self.plain_models["large"], regime)  # uncounted: no item pays for it
            for k in sorted({regime.default_key_step, regime.key_step}, reverse=True):  # the last one is reported
                info = kbs.calibrated(info, k, self.cfg.redi_h_main, self.plain_models["large"])
            self.kbs[regime.name] = info
            self.log(f"  KB {info.name}: {info.entries} entries, built in {info.build_wall_seconds:.0f} s wall / "
                     f"{info.build_cpu_seconds:.0f} s CPU ({info.added_this_run} added this run)", flush=True)
        return self.kbs[regime.name]

    def learning_folder(self, regime: Regime, workload: str, method: str, setting: str) -> Path:
        """Where a learning KB of one (regime, workload, method, setting) lives across runs (its state goes with the
        items stored: run.py keeps the two consistent)."""
        tag = hashlib.sha256(setting.encode()).hexdigest()[:10]
        return self.scratch / "learning" / _slug(f"{regime.name}-{workload}-{method}") / f"{_slug(setting)[:60]}-{tag}"
