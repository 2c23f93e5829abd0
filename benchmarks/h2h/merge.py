"""One head-to-head report from two runs: the rows of methods run later added to an earlier run's workloads.

A method finished after the main run (a helper's branch merged later) is run on its own with
plain and the oracle beside it (`--methods plain,oracle,NEW`), on the same KB, oracle choice and
query sets. Its rows carry verdicts against those plain and oracle rows. Before adding them, the
plain and oracle rows the two runs share must agree exactly (same queries, same references,
deterministic samplers); otherwise the runs are not comparable and nothing is merged.
"""
from __future__ import annotations

import copy
from typing import Sequence

from .summary import summarize

#: Shared deterministic rows may differ by float rounding between processes, never by more.
AGREE_RTOL = 1e-6


def _check_same_setup(base: dict, extra: dict) -> None:
    for name, reg in extra["regimes"].items():
        if name not in base["regimes"]:
            raise SystemExit(f"regime {name} is not in the base run; run the added methods on the base run's regimes")
        b = base["regimes"][name]
        for key in ("steps", "cfg", "sampler", "scheduler", "budgets", "key_step"):
            if b[key] != reg[key]:
                raise SystemExit(f"regime {name}: {key} differs ({b[key]} vs {reg[key]}); the runs are not comparable")
        if b["kb"]["entries"] != reg["kb"]["entries"] or b["oracle"]["winners"] != reg["oracle"]["winners"]:
            raise SystemExit(f"regime {name}: the KB size or the oracle's winners differ; the runs are not comparable")


def _check_shared_rows(workload: str, base_rows: list[dict], extra_rows: list[dict]) -> int:
    """How many rows both runs measured; SystemExit where one of them disagrees (different queries or references)."""
    by_label = {r["label"]: r for r in base_rows}
    shared = 0
    for r in extra_rows:
        twin = by_label.get(r["label"])
        if twin is None or r["family"] not in ("plain", "oracle"):
            continue
        shared += 1
        for key in ("mse_mean", "nfe"):
            a, b = twin[key], r[key]
            if abs(a - b) > AGREE_RTOL * max(abs(a), abs(b), 1e-12):
                raise SystemExit(f"{workload}: {r['label']} {key} is {a} in the base run and {b} in the added one; "
                                 "the runs did not sample the same queries")
    return shared


def add_methods(base: dict, extra: dict, methods: Sequence[str]) -> dict:
    """`base` with the rows of `methods` from `extra` added to each workload both ran, and the summaries recomputed."""
    _check_same_setup(base, extra)
    out = copy.deepcopy(base)
    added = []
    for name, reg in extra["regimes"].items():
        target = out["regimes"][name]
        for workload, got in reg["workloads"].items():
            if workload not in target["workloads"]:
                continue
            into = target["workloads"][workload]
            if _check_shared_rows(workload, into["rows"], got["rows"]) == 0:
                raise SystemExit(f"{workload}: the added run has no plain or oracle row in common with the base run; "
                                 "run it with --methods plain,oracle,...")
            rows = [r for r in got["rows"] if r["method"] in methods]
            into["rows"] += rows
            into["errors"] = into.get("errors", []) + [e for e in got.get("errors", []) if e["method"] in methods]
            into["summary"] = summarize(into["rows"], target["budgets"])
            into["wall_seconds"] = into.get("wall_seconds", 0) + sum(r["wall_s_per_image"] * got["n"] for r in rows)
            added.append(f"{workload}: {len(rows)} rows")
    out["methods"].update({m: d for m, d in extra["methods"].items() if m in methods})
    out["merged"] = {"methods": list(methods), "rows_added": added,
                     "added_run": {"wall_seconds": extra.get("wall_seconds"), "machine": extra.get("machine")}}
    return out
