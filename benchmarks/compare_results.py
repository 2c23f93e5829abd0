"""Two result files of one benchmark side by side: every number that differs, and by how much.

    python benchmarks/compare_results.py BEFORE.json AFTER.json [--label NAME] [--out benchmarks/results/X.json]

Used to check that a change of code paths moved no result ("measure that nothing
moved"): the demo's demo_results.json or a paper_claims run, before and after. Timings differ
on a shared machine whatever the code does, so keys that name a time are listed apart and do
not count as a difference in the results.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

#: Key fragments that mark a measured time or machine state, not a result of the method.
TIMING_WORDS = ("seconds", "wall", "cpu", "ms_per", "_s", "loadavg", "elapsed", "time", "threads")


def leaves(value, path: str = "") -> dict[str, object]:
    """Flatten nested dicts and lists into {"a.b[2].c": leaf}."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(leaves(v, f"{path}.{k}" if path else str(k)))
        return out
    if isinstance(value, list):
        out = {}
        for i, v in enumerate(value):
            out.update(leaves(v, f"{path}[{i}]"))
        return out
    return {path: value}


def is_timing(path: str) -> bool:
    """A key that names a time anywhere along its path ("rows[0].seconds.blend" is a time)."""
    parts = path.replace("[", ".").lower().split(".")
    return any(w in part for part in parts for w in TIMING_WORDS)


def relative(a: float, b: float) -> float:
    scale = max(abs(a), abs(b))
    return 0.0 if scale == 0 else abs(a - b) / scale


def compare(before: dict, after: dict) -> dict:
    """Numbers equal, numbers that differ (with relative difference), and keys on one side only."""
    a, b = leaves(before), leaves(after)
    differ, timings, equal = [], [], 0
    for key in sorted(a.keys() & b.keys()):
        x, y = a[key], b[key]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (x, y))
        if numeric and (x == y or (math.isnan(x) and math.isnan(y))):
            equal += 1
        elif x == y:
            equal += 1
        else:
            row = {"key": key, "before": x, "after": y}
            if numeric:
                row["relative_difference"] = relative(float(x), float(y))
            (timings if is_timing(key) else differ).append(row)
    return {"equal": equal, "differ": differ, "timings_differ": timings,
            "only_before": sorted(a.keys() - b.keys()), "only_after": sorted(b.keys() - a.keys())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--label", default="", help="what the two files are (stored in the output)")
    p.add_argument("--out", type=Path, default=None, help="write the comparison as JSON here")
    a = p.parse_args(argv)
    try:
        before, after = (json.loads(f.read_text(encoding="utf-8")) for f in (a.before, a.after))
    except (OSError, json.JSONDecodeError) as e:
        print(f"compare_results: cannot read the result files: {e}. Pass two JSON result files.", file=sys.stderr)
        return 2
    result = {"label": a.label, "before": str(a.before), "after": str(a.after), **compare(before, after)}
    if a.out:  # written before anything is printed, so a closed pipe cannot lose it
        a.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"{result['equal']} values equal, {len(result['differ'])} differ, {len(result['timings_differ'])} timings "
          f"differ, {len(result['only_before'])} only before, {len(result['only_after'])} only after")
    for row in result["differ"]:
        print(f"  {row['key']}: {row['before']!r} -> {row['after']!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
