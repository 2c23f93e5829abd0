"""Report helpers shared by the benchmarks: typed results to JSON, numbers to text, README blocks, plots.

Result rows are dataclasses. Their fields become JSON keys in order; `private()` fields
(per-sample arrays kept for paired verdicts) stay out of the JSON, `flatten()` fields merge
their own record into the row, and `optional()` fields appear only when set.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np


# --------------------------------------------------------------------------- typed rows -> JSON

def private(**kw) -> Any:
    """A dataclass field kept out of the JSON (per-sample arrays and the like)."""
    return dataclasses.field(metadata={"private": True}, repr=False, **kw)


def flatten() -> Any:
    """A dataclass field whose own record is merged into the enclosing one."""
    return dataclasses.field(metadata={"flatten": True})


def optional(default=None) -> Any:
    """A dataclass field written only when it is not None."""
    return dataclasses.field(default=default, metadata={"optional": True})


def record(obj) -> dict:
    """A dataclass as a flat dict of its public fields, in field order (see the module docstring)."""
    out: dict = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.metadata.get("private") or (value is None and f.metadata.get("optional")):
            continue
        if f.metadata.get("flatten"):
            out.update(record(value))
        else:
            out[f.name] = value
    return out


def to_json(x) -> Any:
    """A JSON value of results: dataclasses as records, numpy as Python, floats to 5 significant digits.

    Non-finite floats become null; dict keys whose name starts with '_' are left out.
    """
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return to_json(record(x))
    if isinstance(x, dict):
        return {str(k): to_json(v) for k, v in x.items() if not str(k).startswith("_")}
    if isinstance(x, (list, tuple)):
        return [to_json(v) for v in x]
    if isinstance(x, np.ndarray):
        return to_json(x.tolist())
    if isinstance(x, np.generic):
        return to_json(x.item())
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, float):
        return float(f"{x:.5g}") if math.isfinite(x) else None
    return x


# --------------------------------------------------------------------------- text

def fmt(x, nd: int = 3) -> str:
    """A number for a table: '-' for None, yes / no for booleans, 1.23e-04 for very small or large values."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    ax = abs(x)
    if ax != 0 and (ax < 1e-2 or ax >= 1e4):
        return f"{x:.2e}"
    return f"{x:.{nd}g}"


def replace_block(text: str, start: str, end: str, block: str) -> str | None:
    """`text` with what lies between the markers `start` and `end` replaced by `block`; None if a marker is missing."""
    if start not in text or end not in text:
        return None
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    return f"{head}{start}\n{block}\n{end}{tail}"


# --------------------------------------------------------------------------- plots

def noise_floor_band(ax, floor: dict, label: str = "real-vs-real floor +-2sd") -> None:
    """Shade mean +- 2 sd of an FD noise floor ({"mean", "sd"}) on a matplotlib axis."""
    ax.axhspan(floor["mean"] - 2 * floor["sd"], floor["mean"] + 2 * floor["sd"], color="gold", alpha=0.3, label=label)


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (benchmarks write files, never open windows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
