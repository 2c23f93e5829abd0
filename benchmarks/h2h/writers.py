"""The head-to-head report from the results store: summary.json, head_to_head.md and one frontier plot per regime.

Everything is rendered from whatever has accumulated (summary.py); every file says how many items
each number rests on, and which runs (command, commit, date, machine, wall and CPU seconds) made them.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

from benchmarks.report import fmt, pyplot, to_json
from embedded.models import cpu_has_fast_bf16

from .config import Config
from .store import git_commit
from .summary import BASELINE_FAMILIES, settings_meta, summarize

TARGETS = {"headline": Config().queries, "wider": Config().wider_items}


def provenance() -> dict:
    """The report's own command, commit, date and machine."""
    return {"command": "python benchmarks/head_to_head.py " + " ".join(sys.argv[1:]), "commit": git_commit(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cores": os.cpu_count(), "bf16": cpu_has_fast_bf16()}}


def progress(cells: list[dict], targets: dict = TARGETS) -> dict:
    """Items still missing to the targets (headline: defaults, plain, oracle; wider: the rest)."""
    out = {}
    for phase, target in targets.items():
        mine = [c for c in cells if (c["default"] or c["family"] in ("plain", "oracle")) == (phase == "headline")]
        out[phase] = {"target_items": target, "cells": len(mine), "cells_at_target": sum(c["n"] >= target for c in mine),
                      "items_missing": sum(max(0, target - c["n"]) for c in mine),
                      "least_n": min((c["n"] for c in mine), default=0)}
    return out


def decided(c: dict) -> str | None:
    """The cell's verdict where the converged reference resolves it (None: no verdict, or the reference too coarse)."""
    return None if c.get("reference_resolves") is False else c["verdict_vs_oracle"]


def _verdict(c: dict) -> str:
    if c["verdict_vs_oracle"] is None:
        return "-"
    b = c["oracle_baseline"]
    if decided(c) is None:  # the reference's doubling gap could move this verdict (summary.resolves): say what it would read
        return (f"unresolved: reference gap {fmt(c['reference_gap_mean'])} could move it (would read "
                f"{c['verdict_vs_oracle']}, {fmt(c['paired_mean_diff_vs_oracle'])} vs {b['setting']} at {fmt(b['nfe'])})")
    return (f"{c['verdict_vs_oracle']} ({fmt(c['paired_mean_diff_vs_oracle'])} +- {fmt(c['paired_se_vs_oracle'])} vs "
            f"{b['setting']} at {fmt(b['nfe'])})")


def _table(cells: list[dict]) -> list[str]:
    out = ["| method | setting | NFE | n | MSE to converged: mean +- se / p95 | vs oracle at no more NFE: "
           "diff +- paired se | oracle NFE at equal quality / NFE | MSE to own full-step run (secondary) | "
           "judge feature distance to converged |", "|---|---|---|---|---|---|---|---|---|"]
    for c in sorted(cells, key=lambda c: (c["method"] != "plain", c["method"] != "oracle", c["method"], c["nfe"])):
        ratio = fmt(c.get("nfe_ratio_at_equal_quality")) if c["family"] not in BASELINE_FAMILIES else ""
        if ratio and c.get("nfe_ratio_vs_oracle_or_plain") != c.get("nfe_ratio_at_equal_quality"):
            ratio += f" ({fmt(c.get('nfe_ratio_vs_oracle_or_plain'))} vs oracle or plain euler)"
        bad = f" ({c['n_nonfinite']} non-finite)" if c["n_nonfinite"] else ""
        out.append(f"| {c['method']} | {c['setting']} | {fmt(c['nfe'])} | {c['n']}{bad} | {fmt(c['mse_converged_mean'])} +- "
                   f"{fmt(c['mse_converged_se'])} / {fmt(c['mse_converged_p95'])} | {_verdict(c)} | {ratio} | "
                   f"{fmt(c['mse_full_step_mean'])} | {fmt(c['feature_distance_mean'])} |")
    return out


def verdict_lines(cells: list[dict]) -> list[str]:
    """Per regime and workload: whether a pack method beats the oracle at no more NFE (by how much, which one), and
    what to use where none does (the oracle's choice per budget)."""
    out = ["| regime | workload | does the pack beat the oracle at no more NFE? | what to use |", "|---|---|---|---|"]
    for regime, workload in sorted({(c["regime"], c["workload"]) for c in cells}):
        mine = [c for c in cells if (c["regime"], c["workload"]) == (regime, workload)]
        pack = [c for c in mine if c["family"] not in BASELINE_FAMILIES and decided(c) is not None]
        wins = [c for c in pack if decided(c) == "win"]
        oracle = sorted((c for c in mine if c["method"] == "oracle"), key=lambda c: c["nfe"])
        use = "; ".join(f"{fmt(c['nfe'])} NFE: {c['setting'].split(' (')[0]}" for c in oracle) or "-"
        if wins:
            best = min(wins, key=lambda c: c["paired_mean_diff_vs_oracle"] / max(c["mse_converged_mean"] or 1.0, 1e-30))
            answer = (f"yes, {len(wins)} of {len(pack)} pack cells; e.g. {best['method']} [{best['setting']}] at "
                      f"{fmt(best['nfe'])} NFE: {_verdict(best)}, n {best['n']}")
            use = f"{best['method']} [{best['setting']}]; elsewhere the oracle's choice ({use})"
        else:
            answer = (f"no: of {len(pack)} pack cells, {sum(decided(c) == 'loss' for c in pack)} lose and "
                      f"{sum(decided(c) == 'tie' for c in pack)} tie (n {min((c['n'] for c in pack), default=0)}"
                      f"-{max((c['n'] for c in pack), default=0)})")
            use = f"the oracle's choice: {use}"
        out.append(f"| {regime} | {workload} | {answer} | {use} |")
    return out


def _runs(res: dict) -> list[str]:
    out = ["| run | command | commit | started | cores / bf16 / threads | wall s | CPU s |", "|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        m = r.get("machine") or {}
        out.append(f"| {r['run_id']} | `{r['command']}` | {(r['git_commit'] or '-')[:10]} | {r['started']} | "
                   f"{m.get('cores', r['cores'])} / {fmt(m.get('bf16'))} / {m.get('torch_threads', '-')} | "
                   f"{fmt(r['wall_seconds'])} | {fmt(r['cpu_seconds'])} |")
    return out


def write_markdown(res: dict, path: Path) -> None:
    cells = res["cells"]
    pr = res["progress"]
    lines = ["# Head to head against the converged solution", "",
             "Every number is per-item MSE (latent space) to the converged reference of the same prompt and noise "
             "(dpmpp_2m/karras at N and 2N steps, benchmarks/h2h/converged.py), n items per cell as stated. "
             "Verdicts: against the oracle (the best plain sampler x schedule for that NFE, chosen on selection "
             "captions) at no more NFE, paired per item, win / loss only beyond 2 paired SE. \"Oracle NFE at equal "
             "quality / NFE\": the NFE the oracle needs for this cell's mean error (log-linear between its budgets) "
             "over the cell's NFE; above 1 the cell saves evaluations, '-' where the oracle's frontier does not reach it. "
             "The MSE to the user's own full-step run (euler/normal at T) is a secondary column. A verdict the reference's "
             "own doubling gap could move (summary.py: gap not below 1/20 of the smaller error, and for a win or loss a "
             "margin within the gap's reach) is printed as unresolved and counts as no verdict.", "",
             f"Report: `{res['report']['command']}` at {(res['report']['commit'] or '-')[:10]}, {res['report']['date']}. "
             f"All runs together: {res['cpu_hours']} CPU hours (the runs plus the one-time preparations: "
             + (", ".join(f"{p['regime']} {p['what']} {fmt(p['cpu_seconds'])} s" for p in res["preparations"]) or "none")
             + f"), {res['wall_hours']} wall hours of runs.", "",
             f"Progress: headline cells (plain, oracle, each method at its default) {pr['headline']['cells_at_target']} of "
             f"{pr['headline']['cells']} at {pr['headline']['target_items']} items (least n {pr['headline']['least_n']}, "
             f"{pr['headline']['items_missing']} items missing, about {pr['headline']['estimated_cpu_hours_left']} CPU hours "
             f"at the runs' CPU seconds per item so far); wider cells {pr['wider']['cells_at_target']} of "
             f"{pr['wider']['cells']} at {pr['wider']['target_items']} (least n {pr['wider']['least_n']}).", ""]
    lines += ["## Verdict per workload", "", *verdict_lines(cells), ""]
    for name, reg in res["regimes"].items():
        v = reg.get("validity")
        lines += [f"## Regime {name}", "", "Settings: " + ", ".join(f"{k} {val}" for k, val in reg.items() if k != "validity"),
                  "", "Validity (benchmarks/results/converged_validity/validity.json): "
                  + (", ".join(f"{k} {fmt(val) if not isinstance(val, str) else val}" for k, val in v.items())
                     if v else "not measured for this regime"), ""]
        for phase, title in (("headline", "Headline cells"), ("wider", "Wider settings")):
            for w in sorted({c["workload"] for c in cells if c["regime"] == name}):
                mine = [c for c in cells if c["regime"] == name and c["workload"] == w
                        and (c["default"] or c["family"] in ("plain", "oracle")) == (phase == "headline")]
                if mine:
                    lines += [f"### {name}, {w}: {title.lower()}", "", *_table(mine), ""]
    losses = [c for c in cells if c["family"] not in BASELINE_FAMILIES and decided(c) == "loss"]
    unresolved = [c for c in cells if c["family"] not in BASELINE_FAMILIES and c["verdict_vs_oracle"] is not None
                  and decided(c) is None]
    lines += ["## Where the pack loses to the oracle at no more NFE", ""]
    lines += [f"- {c['regime']} {c['workload']}: {c['method']} [{c['setting']}] (NFE {fmt(c['nfe'])}, n {c['n']}) "
              f"{_verdict(c)}" for c in losses] or ["- none so far"]
    if unresolved:
        lines += ["", "Verdicts the converged reference cannot decide (its doubling gap could move them; a finer "
                  "reference would decide them):", ""]
        lines += [f"- {c['regime']} {c['workload']}: {c['method']} [{c['setting']}] (NFE {fmt(c['nfe'])}, n {c['n']}) "
                  f"{_verdict(c)}" for c in unresolved]
    if res["failures"]:
        lines += ["", "## Cells that failed (not stored)", ""]
        lines += [f"- {f['regime']} {f['workload']} {f['method']} [{f['setting']}], run {f['run_id']}: {f['error']}"
                  for f in res["failures"]]
    lines += ["", "## Runs", "", *_runs(res), ""]
    path.write_text("\n".join(lines))


def write_plots(res: dict, out_dir: Path) -> list[Path]:
    """frontier_<regime>.png: one panel per workload, NFE against mean MSE to converged (+- se), one line per method
    setting line (points of one method line connected in NFE order)."""
    plt = pyplot()
    paths = []
    meta = {"Description": f"head_to_head report {res['report']['date']} commit {res['report']['commit']}; "
                           f"{res['cpu_hours']} CPU hours over {len(res['runs'])} runs"}
    for name in res["regimes"]:
        mine = [c for c in res["cells"] if c["regime"] == name and c["mse_converged_mean"] is not None]
        workloads = sorted({c["workload"] for c in mine})
        if not workloads:
            continue
        fig, axes = plt.subplots(1, len(workloads), figsize=(5.5 * len(workloads), 4.5), squeeze=False)
        for ax, w in zip(axes[0], workloads):
            lines = defaultdict(list)
            for c in mine:
                if c["workload"] == w and (c["default"] or c["family"] in ("plain", "oracle", "cache")):
                    lines[c["method"] if c["family"] in ("plain", "oracle") else f"{c['method']}: {c['setting'][:40]}"].append(c)
            for label, cs in sorted(lines.items()):
                cs = sorted(cs, key=lambda c: c["nfe"])
                ax.errorbar([c["nfe"] for c in cs], [c["mse_converged_mean"] for c in cs],
                            yerr=[c["mse_converged_se"] or 0.0 for c in cs], marker="o", ms=3, capsize=2,
                            label=f"{label} (n {min(c['n'] for c in cs)})")
            ax.set_yscale("log")
            ax.set_xlabel("NFE (counted, mean per item)")
            ax.set_ylabel("MSE to converged")
            ax.set_title(f"{name}, {w}")
            ax.legend(fontsize=5)
        fig.tight_layout()
        path = out_dir / f"frontier_{name}.png"
        fig.savefig(path, dpi=110, metadata=meta)
        plt.close(fig)
        paths.append(path)
    return paths


def write_all(store, out_dir: Path) -> dict:
    """summary.json, head_to_head.md and the plots in `out_dir`; returns the summary."""
    res = summarize(store)
    res["report"] = provenance()
    smoke = any(n == "smoke" for n in res["regimes"])
    s = Config.smoke_config() if smoke else Config()
    started = {(c["regime"], c["workload"], c["method"], c["setting"]) for c in res["cells"]}
    unstarted = [{"n": 0, "default": m["default"], "family": m["family"]}  # planned by a run, no item stored yet
                 for key, m in settings_meta(store).items() if key not in started]
    res["progress"] = progress(res["cells"] + unstarted, {"headline": s.queries, "wider": s.wider_items})
    stored = sum(c["n"] for c in res["cells"])
    per_item = sum(r["cpu_seconds"] or 0.0 for r in res["runs"]) / stored if stored else None
    for p in res["progress"].values():  # the runs' CPU seconds per stored item so far, times the items missing
        p["estimated_cpu_hours_left"] = None if per_item is None else round(p["items_missing"] * per_item / 3600, 2)
    clean = json.loads(json.dumps(to_json(res)))
    (out_dir / "summary.json").write_text(json.dumps(clean, indent=1))
    write_markdown(clean, out_dir / "head_to_head.md")
    write_plots(clean, out_dir)
    return clean
