"""The method registry of the head-to-head benchmark: what a method is, and how one is added.

A method is one `Method` entry: a name, a family, the workloads it applies to, a `settings`
function that lists its configurations for a regime and workload (fixed before anything runs,
never tuned on results), and a `run` function that samples one configuration on a query set.
The runner measures every run the same way (NFE per item counted at the forward pass of each
model) and scores it the same way (scoring.py: MSE to the converged reference, MSE to the user's own
full-step run, the judge's feature distance), so a method only samples. A setting marked `default`
is the method at its documented default (the headline table, filled first); the others are the
wider settings.

Adding a method: put a module in `benchmarks/h2h/methods/` that calls `register(Method(...))`;
every module there is loaded by `all_methods()`, the built-in ones first (BUILTIN order).
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any, Callable

import numpy as np
import torch

from .config import WORKLOADS

#: Built-in method modules in report order; other modules in methods/ follow alphabetically.
BUILTIN = ("plain", "caches", "redi", "learning", "corrected", "learning_corrected", "tstitch", "calibrated", "stacks")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One configuration of a method on one workload, fixed in advance."""

    method: str                    # the registry name of its method
    line: str                      # the plot line / table group it belongs to ("ReDi k2 H3 lstsq, guard auto")
    label: str                     # this point ("... 10 NFE")
    params: dict                   # JSON-able knobs, read by the method's run function
    target_nfe: float | None       # the budget it is meant for; None when the method decides (caches)
    run_key: tuple | None = None   # settings with one key compute the same samples: run once, reported under each
    default: bool = False          # the method at its documented default: a headline cell


@dataclasses.dataclass
class Output:
    """What a run sampled, and what it says it spent (checked against the forward-pass count).

    claim: per model role ("large", "small"), int [N] model evaluations the method's own plan
    says each item took; claim_kind "exact" (must equal the count) or "at_most" (an upper bound,
    e.g. the steps a cache may skip). None when the method makes no claim.
    """

    latents: torch.Tensor          # [N, C, H, W], LATENT-dict space
    claim: dict[str, np.ndarray] | None = None
    claim_kind: str = "exact"
    extras: dict = dataclasses.field(default_factory=dict)   # JSON-able: acceptance share, chosen sampler, ...
    items: dict = dataclasses.field(default_factory=dict)    # per-item JSON-able arrays beyond the runner's


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a method's `settings` function sees: the run's config, the regime, the workload, the budgets."""

    cfg: Any                       # config.Config
    regime: Any                    # config.Regime
    workload: str
    budgets: tuple[int, ...]       # NFE budgets of this regime (the last is T)
    depth: str                     # "full", "core" or "smoke"
    oracle: dict                   # budget -> oracle.Choice (the best plain sampler x scheduler for it)

    @property
    def middle_budget(self) -> int:
        """The budget nearest half of T: where the wider grids (H, weight modes, key steps) run."""
        return min(self.budgets[:-1] or self.budgets, key=lambda b: abs(b - self.regime.steps / 2))


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    family: str                    # "plain", "oracle", "cache", "redi", "learning", "any_seed", "corrected", "coarse", ...
    settings: Callable[[Plan], list[Setting]]
    run: Callable[..., Output]     # run(bench, regime, queries, setting) -> Output
    workloads: tuple[str, ...] = WORKLOADS  # default: every workload (config.WORKLOADS)
    description: str = ""
    sequential: bool = False       # items run in generation order against state kept across chunks (a learning KB)


class Pending(Exception):
    """A method whose preparation (computed by its own command) is not there yet: the runner skips its cells."""


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method (its name must be new); returns it."""
    if method.name in REGISTRY and REGISTRY[method.name] is not method:
        raise ValueError(f"a method named {method.name!r} is registered already")
    REGISTRY[method.name] = method
    return method


def all_methods() -> list[Method]:
    """Every registered method, loading benchmarks/h2h/methods/ first (built-ins in BUILTIN order)."""
    from . import methods

    names = [m.name for m in pkgutil.iter_modules(methods.__path__)]
    for name in [n for n in BUILTIN if n in names] + sorted(set(names) - set(BUILTIN)):
        importlib.import_module(f"{methods.__name__}.{name}")
    return list(REGISTRY.values())
