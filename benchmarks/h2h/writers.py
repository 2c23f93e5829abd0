"""The head-to-head report: a markdown page and one quality-versus-cost plot per workload, from the results JSON."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from benchmarks.report import fmt, noise_floor_band, pyplot


def _row_line(r: dict) -> str:
    vs = [f"{k[3:]}: " + "/".join(f"{m} {r[k][m]}" for m in ("fd", "acc", "mse")) for k in ("vs_plain", "vs_oracle", "vs_coarse")
          if r.get(k)]
    return (f"| {r['label']} | {fmt(r['nfe'])} | {fmt(r['fd'])} +- {fmt(r['fd_sd'])} | {fmt(r['acc'])} | "
            f"{fmt(r['geo_err'])} | {fmt(r['sepia_err'])} | {fmt(r['mse_mean'])} | {fmt(1000 * r['wall_s_per_image'])} / "
            f"{fmt(1000 * r['cpu_s_per_image'])} | {'; '.join(vs) or '-'} |")


def _rho(rc: dict | None, key: str = "all") -> str:
    return "-" if not rc or rc.get(key) is None else f"{rc[key]:+.2f}"


def _plain_reference_lines(ref: dict | None) -> list[str]:
    """The KB's plain reference: per value step the NFE, plain's output error there and the tolerance it gives."""
    if not ref:
        return []
    return [f"Plain reference (the error guard's tolerance \"plain\", measured once at calibration on {ref['n']} KB "
            "entries: plain euler at k + T - v steps against the full run, and each entry's leave-one-out blend at v "
            "resumed to the end; tolerance = plain's median output RMS / gain * sqrt(D) / spread(v)):", "",
            "| value step | NFE | plain output RMS | gain (output / state error) | tolerance (spread units) |", "|---|---|---|---|---|",
            *(f"| {r['value_step']} | {r['plain_nfe']} | {fmt(r['plain_rms'])} | {fmt(r['gain'])} | {fmt(r['tolerance'])} |"
              for r in ref["rows"]), ""]


def _error_guard_lines(eg: dict) -> list[str]:
    """The error guard's table: NFE distribution, mean / p95 MSE beside the guard off, rank correlation, verdicts."""
    if not eg or not eg["rows"]:
        return []
    out = ["Error guard and adaptive skip (tolerance on the predicted blend error, in units of the KB's spread; \"plain\": "
           "per value step, the error whose output is predicted to be as far off as plain euler's at equal NFE, from the "
           "KB's plain reference). "
           "Rank correlation: Spearman of each item's predicted error against its per-sample MSE, over all items of "
           "the guard-off run at the same value step (every item jumps) / over the items this row let jump. "
           "p95 vs plain / oracle: the row's per-sample MSE p95 against the baseline's at no more mean NFE.", "",
           "| run | NFE mean (min / median / max) | NFE histogram | jumped | MSE mean / p95 | guard off: MSE mean / p95 | "
           "rank corr. all (off) / jumped | vs plain: mean, p95 | vs oracle: mean, p95 |", "|---|---|---|---|---|---|---|---|---|"]
    for e in eg["rows"]:
        off = e["guard_off"] or {}
        vs = ["-" if not e[k] else f"{e[k]['mean_verdict']}, {'ok' if e[k]['p95_not_worse'] else 'worse'} "
              f"({fmt(e[k]['baseline_mse_p95'])} at {fmt(e[k]['baseline_nfe'])})" for k in ("vs_plain", "vs_oracle")]
        hist = " ".join(f"{n}:{c}" for n, c in e["nfe_histogram"].items())
        out.append(f"| {e['label']} | {fmt(e['nfe_mean'])} ({fmt(e['nfe_min'])} / {fmt(e['nfe_median'])} / {fmt(e['nfe_max'])}) "
                   f"| {hist} | {fmt(e['accepted'])} | {fmt(e['mse_mean'])} / {fmt(e['mse_p95'])} | "
                   f"{fmt(off.get('mse_mean'))} / {fmt(off.get('mse_p95'))} | {_rho(off.get('rank_correlation'))} / "
                   f"{_rho(e['rank_correlation'], 'jumped')} | {vs[0]} | {vs[1]} |")
    nw = eg["never_worse_than"]
    out += ["", "Verdict \"never worse than plain at equal NFE\" over every error-guard row: "
            + "; ".join(f"vs {f}: mean MSE {'met' if nw[f]['mean'] else 'NOT met'}, p95 MSE {'met' if nw[f]['p95'] else 'NOT met'}"
                        for f in ("plain", "oracle")), ""]
    for tol, verdict in eg.get("never_worse_by_tolerance", {}).items():
        out.append(f"- tolerance {tol}: " + "; ".join(
            f"vs {f}: mean MSE {'met' if verdict[f]['mean'] else 'NOT met'}, p95 MSE {'met' if verdict[f]['p95'] else 'NOT met'}"
            for f in ("plain", "oracle")))
    return out + [""]


#: How the report names the families under test (summary.VERDICT_FAMILIES).
FAMILY_NAMES = {"redi": "ReDi", "learning": "The learning KB", "any_seed": "Retrieval for any seed",
                "corrected": "The KB-corrected solver"}


def _verdict_text(v: dict) -> str:
    if not v["compared"]:
        return "no run at or above its least NFE"
    return (f"{v['rows_won']} of {v['compared']} runs won on a metric and lost on none, {v['rows_lost']} lost on at least "
            "one (" + ", ".join(f"{m} {v[m]['win']}/{v[m]['tie']}/{v[m]['loss']}" for m in ("fd", "acc", "mse"))
            + " win/tie/loss)")


def _family_lines(sm: dict) -> list[str]:
    """Each family under test: its verdict against plain euler and the oracle at no more NFE, and every loss."""
    out = []
    for fam, v in sm.get("family_verdicts", {}).items():
        lost = sm.get(f"{fam}_losses", [])
        out += ["", f"{FAMILY_NAMES.get(fam, fam)}, against plain euler at no more NFE: {_verdict_text(v['plain'])}; "
                f"against the oracle: {_verdict_text(v['oracle'])}. It lost {len(lost)} comparison(s) here"
                + (":" if lost else "."), ""]
        out += [f"- {x['row']} (NFE {fmt(x['nfe'])}) vs {x['against']} (NFE {fmt(x['against_nfe'])}): "
                f"{', '.join(x['lost_on'])}" for x in lost]
    return out


def _learning_lines(rows: list[dict]) -> list[str]:
    """The learning KB's runs: mean NFE, blended share and KB size over the first generations, as the KB grows."""
    mine = [r for r in rows if r["family"] == "learning"]
    if not mine:
        return []
    out = ["", "The learning KB as it grows (it starts empty; generations in the workload's order; \"blended\": the items "
           "ReDi blended, or the corrected solver corrected):", "",
           "| run | generations | NFE mean | blended | KB entries at end |", "|---|---|---|---|---|"]
    for r in mine:
        out += [f"| {r['label']} | {c['generations']} | {fmt(c['nfe_mean'])} | {c['blended']:.0%} | {c['kb_entries_at_end']} |"
                for c in r["nfe_curve"]]
    out += ["", "Its blended items by themselves, against plain euler at no more NFE than a jump on the same items "
            "(paired per-sample MSE):", ""]
    for r in mine:
        b = r.get("blended_vs_plain")
        out.append(f"- {r['label']}: " + ("no item blended, or no plain run spends as little as a jump" if not b else
                   f"{b['items']} item(s) at {fmt(b['jump_nfe'])} NFE, MSE {fmt(b['mse_mean'])} vs {fmt(b['baseline_mse_mean'])} "
                   f"for {b['baseline']} ({fmt(b['baseline_nfe'])} NFE): {b['verdict']}, worse for {b['worse']} of {b['items']}"))
    return out


def write_markdown(res: dict, path: Path) -> None:
    s = res["sizes"]
    out = ["# Head to head: ReDi and T-Stitch against what a ComfyUI user already has", ""]
    if res.get("smoke"):
        out += ["**Smoke run: tiny sizes, the numbers mean nothing.**", ""]
    elif res.get("reduced"):
        out += [f"**Reduced run** ({s['queries_per_workload']} queries per workload, {s.get('kb_entries')}-entry KB, "
                f"{s['oracle_selection_captions']} oracle selection captions): not the issue's full protocol (200 queries, "
                "2000-entry KB, T = 10 / 20 / 30); FD and accuracy separate little at this size.", ""]
    if not res.get("complete", True):
        out += ["**Partial: the run was stopped; only the workloads below finished.**", ""]
    if "machine" in res:
        out += [f"Machine load before / after: {res['machine']['loadavg_before'][0]:.1f} / "
                f"{res['machine']['loadavg_after'][0]:.1f} on {res['machine']['cpus']} CPUs; total {res['wall_seconds']:.0f} s.", ""]
    out += [f"Precision {res['setting']['precision']}, {res['setting']['torch_threads']} torch thread(s). "
            f"Sizes: {s}. Methods run: {', '.join(res['methods'])}.", "",
            f"NFE: {res['setting']['nfe']}. Decision rule: {res['setting']['decision_rule']}.", ""]
    if res.get("merged"):
        m = res["merged"]
        out += [f"Merged (`head_to_head.py --merge`): the rows of {', '.join(m['methods'])} come from a second run on the same "
                f"KB, oracle and queries, with plain and the oracle beside them (which agreed with this run's); "
                f"{'; '.join(m['rows_added'])}; that run took {fmt(m['added_run']['wall_seconds'])} s.", ""]
    for name, reg in res["regimes"].items():
        kb = reg["kb"]
        out += [f"## Regime {name}: {reg['sampler']}/{reg['scheduler']}, T = {reg['steps']}, cfg {reg['cfg']}", "",
                f"KB: {kb['entries']} train-caption trajectories; building {kb['timed_entries']} of them took "
                f"{fmt(kb['build_wall_seconds'])} s wall / {fmt(kb['build_cpu_seconds'])} s CPU (cached across runs). Key step k = {reg['key_step']}.", "",
                f"Oracle: {reg['oracle']['protocol']}.", "", "| budget | winner | counted NFE | selection MSE |",
                "|---|---|---|---|"]
        for b, c in reg["oracle"]["winners"].items():
            out.append(f"| {b} | {c['sampler']}/{c['scheduler']} {c['steps']} steps | {c['nfe']} | {fmt(c['selection_mse'])} |")
        out += ["", *_plain_reference_lines((kb.get("calibration") or {}).get("plain_reference"))]
        for wname, w in reg["workloads"].items():
            fl = w["noise_floor"]
            out += [f"### {wname}: {w['queries']}", "",
                    f"Real-vs-real FD floor {fmt(fl['mean'])} +- {fmt(fl['sd'])} ({fl['draws']} draws of {fl['n']}). "
                    f"Reference: plain {w['reference']['sampler']}/{w['reference']['scheduler']} {w['reference']['steps']} "
                    f"steps, {fmt(1000 * w['reference']['wall_s_per_image'])} ms wall per image.", "",
                    "| run | NFE | FD | acc | geo err | sepia err | MSE to full | ms/image wall / CPU | vs plain / oracle at <= NFE |",
                    "|---|---|---|---|---|---|---|---|---|"]
            out += [_row_line(r) for r in w["rows"]]
            out += [f"\n{len(w.get('errors', []))} run(s) failed:"] * bool(w.get("errors"))
            out += [f"- {e['label']}: {e['error']}" for e in w.get("errors", [])]
            sm = w["summary"]
            out += ["", "Frontier (lowest FD and lowest MSE among runs spending at most the budget):", ""]
            out += [f"- {f['budget']} NFE: FD {f['best_fd']} ({fmt(f['best_fd_value'])}; "
                    f"{len(f['within_noise_of_best_fd'])} runs within noise of it); MSE {f['best_mse']} "
                    f"({fmt(f['best_mse_value'])})" for f in sm["frontier"]]
            out += ["", "Least NFE at which each line is within noise of plain at T (FD and accuracy):", ""]
            out += [f"- {line}: {fmt(n) if n is not None else 'never'}" for line, n in sm["first_full_quality_nfe"].items()]
            out += [""] + _error_guard_lines(sm.get("error_guard"))
            out += _learning_lines(w["rows"])
            out += _family_lines(sm)
            out.append("")
    path.write_text("\n".join(out) + "\n")


def write_plots(res: dict, out_dir: Path, stem: str) -> list[Path]:
    """One figure per workload: FD against NFE, MSE to full against NFE, FD against wall ms per image."""
    plt = pyplot()
    paths = []
    for name, reg in res["regimes"].items():
        for wname, w in reg["workloads"].items():
            lines = defaultdict(list)
            for r in w["rows"]:
                lines[r["line"]].append(r)
            fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
            noise_floor_band(axes[0], w["noise_floor"])
            noise_floor_band(axes[2], w["noise_floor"])
            for line, rs in lines.items():
                rs = sorted(rs, key=lambda r: r["nfe"])
                nfe = [r["nfe"] for r in rs]
                style = "-o" if len(rs) > 1 else "s"
                axes[0].errorbar(nfe, [r["fd"] for r in rs], yerr=[2 * r["fd_sd"] for r in rs], fmt=style, ms=4,
                                 capsize=2, label=line)
                axes[1].plot(nfe, [max(r["mse_mean"], 1e-8) for r in rs], style, ms=4, label=line)
                axes[2].plot([1000 * r["wall_s_per_image"] for r in rs], [r["fd"] for r in rs], style, ms=4, label=line)
            axes[0].set(xlabel="NFE per image (counted, large-model units)", ylabel="FD (judge features), +-2 sd",
                        title=f"{name} {wname}: quality vs NFE")
            axes[1].set(xlabel="NFE per image", ylabel="per-sample MSE to plain full-step output", yscale="log",
                        title="distance to the full-step output")
            axes[2].set(xlabel="wall ms per image (shared machine)", ylabel="FD", title="quality vs wall time")
            axes[0].legend(fontsize=6, loc="upper right")
            fig.tight_layout()
            p = out_dir / f"{stem}_{name}_{wname}.png"
            fig.savefig(p, dpi=90)
            plt.close(fig)
            paths.append(p)
    return paths
