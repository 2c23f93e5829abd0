"""Records that two parties must agree on, and the one function that names how they differ.

A knowledge base, a query, a T-Stitch pair and a benchmark all carry small JSON-like
records (a sampling recipe, a model fingerprint, a model signature). Each comparison used
to have its own hand-written comparer; `differences` is the single one: it walks two
records and returns every leaf that differs, so a message can name all of them at once.
No ComfyUI, no torch.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from .errors import KBError

#: Floats closer than this (relative) count as equal unless a path asks for another tolerance.
DEFAULT_REL_TOL = 1e-6


@dataclass(frozen=True)
class Recipe:
    """How a trajectory is sampled: what a KB, a query, T-Stitch and a benchmark run must share."""

    sampler: str
    scheduler: str
    steps: int
    cfg: float

    def __post_init__(self) -> None:
        # Validated once, here; a Recipe that exists is valid, so hot paths never re-check it.
        for name in ("sampler", "scheduler"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise KBError(f"recipe {name} must be a non-empty name such as 'euler', got {value!r}.")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise KBError(f"recipe steps must be a whole number >= 1, got {self.steps!r}.")
        if isinstance(self.cfg, bool) or not isinstance(self.cfg, (int, float)) or not math.isfinite(self.cfg) or self.cfg < 0:
            raise KBError(f"recipe cfg must be a finite number >= 0, got {self.cfg!r}.")
        object.__setattr__(self, "cfg", float(self.cfg))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> Recipe:
        if not isinstance(d, Mapping):
            raise KBError(f"a recipe must be a mapping with sampler, scheduler, steps and cfg, got {type(d).__name__}.")
        missing = [k for k in ("sampler", "scheduler", "steps", "cfg") if k not in d]
        if missing:
            raise KBError(f"the recipe lacks {missing}; give sampler, scheduler, steps and cfg.")
        return cls(d["sampler"], d["scheduler"], d["steps"], d["cfg"])

    def describe(self) -> str:
        """'euler/normal, 20 steps, cfg 3' for log lines."""
        return f"{self.sampler}/{self.scheduler}, {self.steps} steps, cfg {self.cfg:g}"


@dataclass(frozen=True)
class Difference:
    """One leaf where two records differ; `path` is dotted ('signature.latent_channels', 'sigmas[3]')."""

    path: str
    left: Any
    right: Any

    def describe(self, left_name: str = "knowledge base", right_name: str = "request") -> str:
        return f"{self.path}: {left_name} has {_short(self.left)}, {right_name} has {_short(self.right)}"


_ABSENT = object()


def _short(value: Any, limit: int = 80) -> str:
    if value is _ABSENT:
        return "nothing"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_number(x: Any) -> bool:
    # numbers.Real also admits numpy scalars; bools are flags, not numbers.
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and type(x).__name__ != "bool_"


def _tolerance(path: str, tolerances: Mapping[str, tuple[float, float]]) -> tuple[float, float]:
    """The (rel, abs) tolerance of the longest matching path prefix; list items inherit their list's."""
    bare = path.split("[", 1)[0]
    best, best_len = (DEFAULT_REL_TOL, 0.0), -1
    for prefix, tol in tolerances.items():
        if (bare == prefix or bare.startswith(prefix + ".")) and len(prefix) > best_len:
            best, best_len = tol, len(prefix)
    return best


def differences(left: Any, right: Any, *, tolerances: Mapping[str, tuple[float, float]] | None = None,
                ignore: tuple[str, ...] = (), path: str = "") -> list[Difference]:
    """Every leaf where two JSON-like records differ (dicts by key, lists by position, floats with tolerance).

    tolerances: {path prefix: (rel_tol, abs_tol)} for float leaves, e.g. {"weight_probe": (2e-2, 1e-3)};
    other floats use DEFAULT_REL_TOL. ignore: path prefixes left out. Ints compare exactly; an int
    and a float compare as numbers; bools and strings compare exactly. A key present on one side
    only is a difference whose other side is reported as 'nothing'.
    """
    tolerances = tolerances or {}
    bare = path.split("[", 1)[0]
    if any(bare == p or bare.startswith(p + ".") for p in ignore):
        return []
    if isinstance(left, Mapping) and isinstance(right, Mapping):
        out: list[Difference] = []
        for key in sorted(set(left) | set(right), key=str):
            sub = f"{path}.{key}" if path else str(key)
            a, b = left.get(key, _ABSENT), right.get(key, _ABSENT)
            if a is _ABSENT or b is _ABSENT:
                if not any(sub == p or sub.startswith(p + ".") for p in ignore):
                    out.append(Difference(sub, a, b))
                continue
            out.extend(differences(a, b, tolerances=tolerances, ignore=ignore, path=sub))
        return out
    if isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)):
        if len(left) != len(right):
            return [Difference(path, list(left), list(right))]
        out = []
        for i, (a, b) in enumerate(zip(left, right)):
            out.extend(differences(a, b, tolerances=tolerances, ignore=ignore, path=f"{path}[{i}]"))
        return out
    if _is_number(left) and _is_number(right):
        if isinstance(left, numbers.Integral) and isinstance(right, numbers.Integral):
            same = int(left) == int(right)
        else:
            rel, abs_ = _tolerance(path, tolerances)
            a, b = float(left), float(right)
            same = a == b or math.isclose(a, b, rel_tol=rel, abs_tol=abs_)
        return [] if same else [Difference(path, left, right)]
    same = type(left) is type(right) and left == right
    return [] if same else [Difference(path, left, right)]


def describe_differences(diffs: list[Difference], left_name: str = "knowledge base", right_name: str = "request",
                         limit: int = 6) -> str:
    """'sampler: knowledge base has 'euler', request has 'dpmpp_2m'; steps: ...' naming every difference (up to `limit`)."""
    if not diffs:
        return "no differences"
    shown = "; ".join(d.describe(left_name, right_name) for d in diffs[:limit])
    rest = len(diffs) - limit
    return shown + (f"; and {rest} more ({', '.join(d.path for d in diffs[limit:limit + 8])})" if rest > 0 else "")
