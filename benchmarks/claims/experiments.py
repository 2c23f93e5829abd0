"""The paper-claims experiments: one function each, returning typed rows.

All ReDi runs use the fixed-seed KB of train captions; queries are held-out captions. "fixed"
queries start from the KB's seed (the official ReDi protocol), "foreign" ones from seeds the
KB never saw. The guard is off (threshold GUARD_OFF, as in the paper) unless stated.
"""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from benchmarks import metrics as M
from benchmarks.claims.bench import Bench
from benchmarks.claims.rows import (CondKeyRow, PlainRow, ReDiRow, SettingRow, StyleRow, Table, TStitchRow,
                                    WallclockRow)
from benchmarks.report import flatten
from embedded import sampling as S
from embedded.captions import parse_prompt


def fd_not_worse(a, b) -> bool:
    """Quality a's FD not above b's by more than 2 combined bootstrap sd."""
    return M.not_worse(a.fd, a.fd_sd, b.fd, b.fd_sd, higher_is_better=False)


def acc_not_worse(a, b) -> bool:
    """Quality a's source accuracy not below b's by more than 2 combined standard errors."""
    return M.not_worse(a.acc, a.acc_se, b.acc, b.acc_se, higher_is_better=True)


def fd_verdict(a, b) -> str:
    return M.interval_verdict(a.fd, a.fd_sd, b.fd, b.fd_sd, higher_is_better=False)


def acc_verdict(a, b) -> str:
    return M.interval_verdict(a.acc, a.acc_se, b.acc, b.acc_se, higher_is_better=True)


# --------------------------------------------------------------------------- 0. is the question real?

@dataclasses.dataclass
class SettingCheck:
    sampler: str
    protocol: str
    rows: list[SettingRow]
    mse_between_seeds_same_caption: float
    lowest_budget_worse_fd: bool
    lowest_budget_fd_gap_in_sd: float


def setting_check(b: Bench, sampler: str) -> SettingCheck:
    """The plain sampler at the reduced budgets, at T and beyond, against the FD noise floor (foreign seeds)."""
    c = b.cfg
    steps = sorted(set(c.budgets) | {c.steps} | set(c.setting_extra_steps))
    b.afford(c.queries * sum(steps), f"setting check {sampler}")
    ref = b.reference(sampler, "foreign")
    longest = max(steps)
    runs = {}
    for n in steps:
        lat = ref.out if n == c.steps else b.plain(sampler, n, ref.prompts, ref.seeds)[0].latents
        runs[n] = np.asarray(lat, np.float32)
    rows = [SettingRow(n, b.quality(runs[n], ref.captions, runs[longest])) for n in steps]
    # How far apart two seeds of one caption are (the diversity a caption leaves open).
    fixed = b.reference(sampler, "fixed").out
    low = next(r.quality for r in rows if r.steps == min(c.budgets))
    full = next(r.quality for r in rows if r.steps == c.steps)
    return SettingCheck(sampler=sampler, protocol="foreign", rows=rows,
                        mse_between_seeds_same_caption=float(M.per_sample_mse(fixed, runs[c.steps]).mean()),
                        lowest_budget_worse_fd=not fd_not_worse(low, full),
                        lowest_budget_fd_gap_in_sd=(low.fd - full.fd) / math.hypot(low.fd_sd, full.fd_sd))


# --------------------------------------------------------------------------- 1. equal NFE

def equal_nfe(b: Bench, sampler: str, protocol: str, hs) -> list[PlainRow | ReDiRow]:
    """Plain at every budget and T, and ReDi (guard off) at every budget for each H."""
    c = b.cfg
    kb = b.kbs[sampler].kb
    budgets = list(c.budgets)
    plain_steps = sorted(set(budgets) | set(c.plain_extra.get(sampler, ())) | {c.steps})
    cost = c.queries * (c.steps + sum(s for s in plain_steps if s != c.steps) + c.key_step
                        + len(hs) * sum(c.steps - c.value_step(n) for n in budgets))
    b.afford(cost, f"equal-NFE {sampler} {protocol}")
    rows: list[PlainRow | ReDiRow] = [b.plain_row(sampler, protocol, s) for s in plain_steps]
    rows += b.redi_sweep(sampler, protocol, kb, c.key_step, hs, [c.value_step(n) for n in budgets], tag="equal_nfe")
    return rows


def extra_h(b: Bench, sampler: str) -> list[ReDiRow]:
    """ReDi with the extra H values at the half-NFE budget (fixed seed)."""
    c = b.cfg
    if not c.h_extra:
        return []
    b.afford(c.queries * (c.key_step + len(c.h_extra) * (c.steps - c.value_step(c.half_nfe))), f"H {c.h_extra} {sampler}")
    return b.redi_sweep(sampler, "fixed", b.kbs[sampler].kb, c.key_step, c.h_extra, [c.value_step(c.half_nfe)],
                        tag="extra_h")


# --------------------------------------------------------------------------- 2. trajectory vs condition key

@dataclasses.dataclass
class CondKey:
    sampler: str
    rows: list[CondKeyRow]


def condition_key(b: Bench, sampler: str = "euler") -> CondKey:
    """Paper Table 3: trajectory key vs condition-embedding key, same KB values, guard off."""
    c = b.cfg
    kb = b.kbs[sampler].kb
    vs = [c.value_step(n) for n in c.cond_key_budgets]
    variants = [("condition key, lstsq on embeddings", c.h_claim, "lstsq"),
                ("condition key, uniform weights", c.h_claim, "uniform"),
                ("condition key, nearest only", 1, "uniform")]
    b.afford(c.queries * (c.key_step + len(variants) * sum(c.steps - v for v in vs)), "condition-key comparison")
    ref = b.reference(sampler, "fixed")
    prompts, labels = ref.prompts, ref.labels
    query, _ = b.key(kb, prompts, ref.seeds, c.key_step)
    rows = []
    for name, h, mode in variants:
        ids, lstsq = S.condition_key_neighbours(kb, prompts, h)
        weights = lstsq if mode == "lstsq" else np.full(ids.shape, 1.0 / h)
        rel, cen = S.trajectory_residual(query, ids, weights)
        for v in vs:
            blended = S.blend_entries(kb, ids, weights, v)
            t = time.perf_counter()
            out = S.resume_blend(query, b.large, prompts, v, blended)
            b.count(len(prompts), c.steps - v, time.perf_counter() - t)
            rows.append(CondKeyRow(
                method=name, sampler=sampler, protocol="fixed", k=c.key_step, v=v, h=h,
                nominal_nfe=c.key_step + c.steps - v, nfe=float(c.key_step + c.steps - v),
                same_source_neighbours=b.same_source(kb, ids, labels),
                quality=b.quality(out, ref.captions, ref.out, xv_true=ref.traj[v], xv_hat=blended,
                                  residual=rel, centered=cen)))
    return CondKey(sampler, rows)


# --------------------------------------------------------------------------- 3. ablations

@dataclasses.dataclass
class KBSizeAblation:
    rows: list[ReDiRow]
    fit: dict                    # {"mse_mean": {a, b}, "d_xv_mean": {a, b}, "parity": {...}}: error ~ a * N^-b


@dataclasses.dataclass
class GapAblation:
    k: int
    rows: list[ReDiRow]


@dataclasses.dataclass
class KeyStepAblation:
    gap: int
    rows: list[ReDiRow]


@dataclasses.dataclass
class NeighboursAblation:
    rows: list[ReDiRow]


@dataclasses.dataclass
class Ablations:
    sampler: str
    protocol: str
    h: int
    k: int
    nfe: int
    kb_size: KBSizeAblation
    gap: GapAblation
    key_step: KeyStepAblation
    neighbours: NeighboursAblation

    def new_rows(self) -> list[ReDiRow]:
        """The ReDi runs this experiment added (not those it reused from the equal-NFE sweep)."""
        parts = (self.kb_size.rows, self.gap.rows, self.key_step.rows)
        return [r for rows in parts for r in rows if r.tag in ("gap", "key_step", "kb_size")]


def _kb_size_fit(rows: list[ReDiRow], plain: PlainRow | None, plain_nfe: int) -> dict:
    """Power laws of the error against KB size, and the size at which ReDi would match the plain sampler."""
    ns = np.array([r.kb_entries for r in rows], float)
    fits: dict = {}
    for metric in ("mse_mean", "d_xv_mean"):
        if len(ns) >= 2:
            a, e = M.power_law_fit(ns, [getattr(r.quality, metric) for r in rows])
            fits[metric] = {"a": a, "b": e}
    if "mse_mean" in fits and plain is not None:
        a, e = fits["mse_mean"]["a"], fits["mse_mean"]["b"]
        target = plain.quality.mse_mean
        n_par = (a / target) ** (1.0 / e) if e > 0 else None
        beats = [int(r.kb_entries) for r in rows if M.paired_verdict(r.quality.mse, plain.quality.mse) == M.WIN]
        fits["parity"] = {
            "plain_nfe": plain_nfe, "plain_mse_mean": target, "kb_entries_for_parity": n_par,
            "extrapolated": n_par is None or not (min(ns) <= n_par <= max(ns)),
            "smallest_kb_tested": int(min(ns)), "kb_sizes_beating_plain_mse": beats,
            "fd_by_size": {int(r.kb_entries): r.quality.fd for r in rows}, "plain_fd": plain.quality.fd,
            "fd_verdict_by_size": {int(r.kb_entries): fd_verdict(r.quality, plain.quality) for r in rows},
            "note": "KB size at which the fitted ReDi MSE-to-full equals the plain sampler's at equal NFE; "
                    "'extrapolated' when outside the sizes measured"}
    return fits


def ablations(b: Bench, sampler: str, table: Table) -> Ablations:
    """KB size, k-v gap, key step and H, each with the residual beside the error (fixed seed, half-NFE budget)."""
    c = b.cfg
    h = c.h_claim
    v_half = c.value_step(c.half_nfe)
    kb = b.kbs[sampler].kb
    # --- KB size (random subsets of the full KB, as the paper's ablation)
    sizes = [n for n in c.kb_size_ablation if n < len(kb)]
    b.afford(len(sizes) * c.queries * (c.key_step + c.steps - v_half), "KB-size ablation")
    size_rows = []
    for n in sizes:
        size_rows += b.redi_sweep(sampler, "fixed", b.sub_kb(sampler, n), c.key_step, [h], [v_half], tag="kb_size")
    full_kb = table.redi(sampler, "fixed", c.key_step, v_half, h)
    if full_kb is not None:
        size_rows.append(full_kb)
    fit = _kb_size_fit(size_rows, table.plain(sampler, "fixed", c.half_nfe), c.half_nfe)
    # --- k-v gap at fixed k (v = k means no step skipped: the retrieval error alone)
    exp1 = table.redi_rows(sampler, "fixed", ("equal_nfe", "extra_h"), c.key_step)
    vs_have = {r.v for r in exp1 if r.h == h}
    todo = [v for v in c.gap_values if v not in vs_have and c.key_step <= v < c.steps]
    b.afford(c.queries * (c.key_step + sum(c.steps - v for v in todo)), "k-v gap ablation")
    gap_rows = b.redi_sweep(sampler, "fixed", kb, c.key_step, [h], todo, tag="gap") if todo else []
    gap_rows += [r for r in exp1 if r.h == h and r.v in c.gap_values]
    # --- key step at fixed gap
    ks = [k for k in c.key_values if k + c.key_gap < c.steps]
    todo = [k for k in ks if k != c.key_step or (k + c.key_gap) not in vs_have]
    b.afford(c.queries * sum(c.steps - c.key_gap for _ in todo), "key-step ablation")
    key_rows = []
    for k in todo:
        key_rows += b.redi_sweep(sampler, "fixed", kb, k, [h], [k + c.key_gap], tag="key_step")
    if c.key_step in ks and c.key_step not in todo:
        have = table.redi(sampler, "fixed", c.key_step, c.key_step + c.key_gap, h)
        if have is not None:
            key_rows.append(have)
    return Ablations(sampler=sampler, protocol="fixed", h=h, k=c.key_step, nfe=c.half_nfe,
                     kb_size=KBSizeAblation(size_rows, fit),
                     gap=GapAblation(c.key_step, sorted(gap_rows, key=lambda r: r.v)),
                     key_step=KeyStepAblation(c.key_gap, sorted(key_rows, key=lambda r: r.k)),
                     # H, from experiment 1 at the half-NFE budget
                     neighbours=NeighboursAblation(sorted([r for r in exp1 if r.v == v_half], key=lambda r: r.h)))


# --------------------------------------------------------------------------- 4. stylization

@dataclasses.dataclass
class Stylization:
    sampler: str
    protocol: str
    queries: int
    style_free_kb_entries: int
    style: str
    rows: list[StyleRow]
    verdicts_vs_direct: dict     # {method: {"layout", "style (sepia error)", "content (source acc)", "fd"}}


def stylization(b: Bench, sampler: str = "euler") -> Stylization:
    """Paper Fig. 4: content key, then content + style; against generating the styled caption directly.

    Style-free KB (the sampler KB's sepia-0 entries, as the paper's style-free KB), held-out
    content captions (sepia 0), styled caption = the same with "sepia 1.00", fixed seed.
    Scores: layout similarity (luminance correlation with the unstyled output of the same seed),
    style adherence (judge sepia reading, target 1), content faithfulness (judge source
    accuracy and crop-geometry error), FD against real styled crops of the captions.
    """
    c = b.cfg
    n = c.style_queries
    big = b.kbs[sampler].kb
    content = [cap.with_sepia(0.0) for cap in b.query_captions[:n]]
    styled = [cap.with_sepia(1.0) for cap in content]
    pc, ps = [x.prompt() for x in content], [x.prompt() for x in styled]
    seeds = [c.kb_seed] * n
    b.afford(n * (3 * c.steps + len(c.style_value_steps) * (c.key_step + c.steps)), "stylization")
    free_ids = np.array([i for i, (p, _) in enumerate(big.entries) if parse_prompt(p).sepia == 0.0])
    kb = b.sub_kb(sampler, len(free_ids), ids=free_ids, tag="stylefree")
    real_styled = b.judge.real_features(styled, c.reference_renders)
    unstyled, t_unstyled = b.plain(sampler, c.steps, pc, seeds)
    direct, t_direct = b.plain(sampler, c.steps, ps, seeds)
    unstyled, direct = unstyled.latents, direct.latents

    def row(name, lat, nfe, seconds, **extra) -> StyleRow:
        lat = np.asarray(lat, np.float32)
        lay = M.luminance_correlation(lat, unstyled)
        layout, layout_se = M.mean_se(lay)
        return StyleRow(method=name, nfe=float(nfe), seconds=seconds,
                        quality=b.quality(lat, styled, None, reference=real_styled), layout_similarity=layout,
                        layout_similarity_se=layout_se, layout=lay,
                        sepia_reading=float(b.judge.read(lat).sepia.mean()), **extra)

    rows = [row("plain, content caption (unstyled reference)", unstyled, c.steps, t_unstyled),
            row("plain, styled caption (direct)", direct, c.steps, t_direct)]
    for v in c.style_value_steps:
        # Prompt switch without retrieval: content caption for the first v steps, styled caption after.
        t = time.perf_counter()
        switched = S.prompt_switch(b.large, pc, ps, seeds, b.recipe(sampler), v)
        dt = time.perf_counter() - t
        b.count(n, c.steps, dt)
        rows.append(row(f"prompt switch at step {v} (no retrieval)", switched, c.steps, dt, v=v))
        # ReDi stylization: key from the content caption, blend at v, resume with the styled caption.
        result, dt = b.redi(kb, pc, seeds, c.key_step, v, c.h_claim, S.GUARD_OFF, resume_prompts=ps)
        rows.append(row(f"ReDi: content key at k={c.key_step}, styled resume from v={v}", result.latent,
                        c.key_step + c.steps - v, dt, v=v, k=c.key_step, h=c.h_claim,
                        residual_centered_mean=float(np.mean(result.centered_residual))))
    direct_row = rows[1]
    d = direct_row.quality
    verdicts = {}
    for r in rows[2:]:
        q = r.quality
        verdicts[r.method] = {
            "layout": M.paired_verdict(-r.layout, -direct_row.layout),  # higher similarity is better
            "style (sepia error)": M.interval_verdict(q.sepia_err, q.sepia_err_se, d.sepia_err, d.sepia_err_se,
                                                      higher_is_better=False),
            "content (source acc)": acc_verdict(q, d), "fd": fd_verdict(q, d)}
    return Stylization(sampler=sampler, protocol=f"fixed seed {c.kb_seed}", queries=n, style_free_kb_entries=len(kb),
                       style="sepia 1.00 appended to the content caption", rows=rows, verdicts_vs_direct=verdicts)


# --------------------------------------------------------------------------- 5. T-Stitch

@dataclasses.dataclass
class TStitchSweep:
    sampler: str
    protocol: str
    reference: str
    rows: list[TStitchRow]


def tstitch(b: Bench, sampler: str = "euler") -> TStitchSweep:
    """Quality and wall time vs the share of steps on the small model."""
    c = b.cfg
    b.afford(int(len(c.tstitch_fractions) * c.queries * c.steps * 0.8), "T-Stitch sweep")
    prompts, seeds, _ = b.query_set("foreign")
    rows, ref = [], None
    for frac in c.tstitch_fractions:
        t = time.perf_counter()
        lat, res = S.tstitch(b.small, b.large, prompts, seeds, b.recipe(sampler), frac)
        dt = time.perf_counter() - t
        b.count(len(prompts), c.steps, dt)
        if ref is None:
            ref = lat  # fraction 0 = large model only
        rows.append(TStitchRow(sampler=sampler, protocol="foreign", small_fraction=frac, small_steps=res.small_steps,
                               small_evaluations=res.small_evaluations, large_evaluations=res.large_evaluations,
                               seconds={"total": dt},
                               params={"small": res.small_parameters, "large": res.large_parameters},
                               quality=b.quality(lat, b.query_captions[:len(prompts)], ref)))
    t0 = rows[0].seconds["total"]
    for r in rows:
        r.time_vs_large_only = r.seconds["total"] / t0
    return TStitchSweep(sampler=sampler, protocol=f"foreign (query i from seed {c.foreign_seed_base}+i, one sampler run "
                                                  "per fraction)", reference="fraction 0 (large only)", rows=rows)


# --------------------------------------------------------------------------- 6. guard and wall clock

@dataclasses.dataclass
class GuardRow:
    row: PlainRow | ReDiRow = flatten()
    role: str = ""


@dataclasses.dataclass
class Guard:
    sampler: str
    h: int
    k: int
    v: int
    rows: list[GuardRow]
    fixed_auto_vs_plain_half: dict   # verdicts of the auto guard against plain at the half NFE: {fd, acc, mse_mean, mse_p95}
    fixed_worst5: dict               # worst 5% per-sample MSE to full: guard off / auto / plain, and the auto guard's acceptance
    foreign_auto_vs_plain_half: dict
    foreign_worst5: dict

    def verdicts(self, protocol: str) -> dict:
        return getattr(self, f"{protocol}_auto_vs_plain_half")

    def worst5(self, protocol: str) -> dict:
        return getattr(self, f"{protocol}_worst5")


def guard(b: Bench, sampler: str, table: Table) -> Guard:
    """Guard off vs auto at the half-NFE budget, fixed-seed and foreign-seed protocols."""
    c = b.cfg
    h, v = c.h_claim, c.value_step(c.half_nfe)
    kb = b.kbs[sampler].kb
    need_foreign = not any(r.protocol == "foreign" for r in table.rows)
    cost = c.queries * (2 * c.key_step + 2 * c.steps)
    if need_foreign:
        cost += c.queries * (c.steps + c.half_nfe + c.steps)
    b.afford(cost, "guard comparison")
    rows, verdicts, worst5 = [], {}, {}
    for protocol in ("fixed", "foreign"):
        off = table.redi(sampler, protocol, c.key_step, v, h)
        if off is None:
            off = b.redi_sweep(sampler, protocol, kb, c.key_step, [h], [v], tag="guard")[0]
        auto = b.redi_sweep(sampler, protocol, kb, c.key_step, [h], [v], guard=S.GUARD_AUTO, tag="guard")[0]
        p_half = table.plain(sampler, protocol, c.half_nfe) or b.plain_row(sampler, protocol, c.half_nfe)
        p_full = table.plain(sampler, protocol, c.steps) or b.plain_row(sampler, protocol, c.steps)
        rows += [GuardRow(off, "redi guard off"), GuardRow(auto, "redi guard auto"),
                 GuardRow(p_half, f"plain {c.half_nfe} steps"), GuardRow(p_full, f"plain {c.steps} steps")]
        qa, qp = auto.quality, p_half.quality
        verdicts[protocol] = {"fd": fd_verdict(qa, qp), "acc": acc_verdict(qa, qp),
                              "mse_mean": M.paired_verdict(qa.mse, qp.mse), "mse_p95": M.percentile_verdict(qa.mse, qp.mse)}
        worst5[protocol] = {"guard_off": off.quality.mse_worst5_mean, "guard_auto": qa.mse_worst5_mean,
                            f"plain_{c.half_nfe}": qp.mse_worst5_mean, "accepted_auto": auto.accepted,
                            "nfe_auto": auto.nfe, "threshold_auto": auto.guard_threshold,
                            "threshold_source_auto": auto.guard_source}
    return Guard(sampler=sampler, h=h, k=c.key_step, v=v, rows=rows,
                 fixed_auto_vs_plain_half=verdicts["fixed"], fixed_worst5=worst5["fixed"],
                 foreign_auto_vs_plain_half=verdicts["foreign"], foreign_worst5=worst5["foreign"])


@dataclasses.dataclass
class Wallclock:
    protocol: str
    h: int
    rows: list[WallclockRow]


def wallclock(b: Bench, table: Table, samplers) -> Wallclock:
    """ReDi time (partial + retrieve + blend + resume) vs the cheapest plain run of matched quality, per sampler.

    Matched on MSE-to-full (plain MSE <= ReDi MSE) and on FD (plain FD not worse than ReDi's
    beyond 2 combined sd, which favours the plain sampler); the T-step run when nothing cheaper matches.
    """
    c = b.cfg
    out = Wallclock(protocol="fixed", h=c.h_claim, rows=[])
    for sampler in samplers:
        plains = table.plains(sampler, "fixed")
        if not plains:
            continue
        for n in c.budgets:
            r = table.redi(sampler, "fixed", c.key_step, c.value_step(n), c.h_claim)
            if r is None:
                continue
            by_mse = next((p for p in plains if p.quality.mse_mean <= r.quality.mse_mean), plains[-1])
            by_fd = next((p for p in plains if fd_not_worse(p.quality, r.quality)), plains[-1])
            s = r.seconds
            out.rows.append(WallclockRow(
                sampler=sampler, redi_nfe=n, redi_mse=r.quality.mse_mean, redi_fd=r.quality.fd, redi_seconds=s["total"],
                redi_seconds_split={k: s[k] for k in ("partial", "retrieve", "blend", "resume")},
                retrieval_blend_share=(s["retrieve"] + s["blend"]) / s["total"],
                plain_nfe_matching=by_mse.nfe, plain_mse=by_mse.quality.mse_mean, plain_seconds=by_mse.seconds["total"],
                speedup_at_matched_quality=by_mse.seconds["total"] / s["total"],
                plain_nfe_matching_fd=by_fd.nfe, plain_fd=by_fd.quality.fd,
                speedup_at_matched_fd=by_fd.seconds["total"] / s["total"],
                plain_full_seconds=plains[-1].seconds["total"],
                speedup_vs_full=plains[-1].seconds["total"] / s["total"]))
    return out
