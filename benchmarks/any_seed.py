"""Retrieval for any seed (an experiment): is ReDi keyed on the denoised estimate
(benchmarks.any_seed_sampler) better than plain Euler at the same NFE for seeds the KB never saw?

    python benchmarks/any_seed.py --kb PATH/kb_crops16_euler-normal_T20_cfg3_seed7_n800 [--n 32]
    python benchmarks/any_seed.py --kb ... --key 6 --values 10 14 --h 3 --seeds foreign --no-cache --out benchmarks/results/any_seed_k6.json
                                   # a later key: does a sharper D_q help?

The KB is the head-to-head benchmark's (shipped embedded model crops16, 800 train captions, seed 7,
euler/normal, T = 20, cfg 3, steps 1..19 stored); it is only read. Queries: the first N held-out
captions, with foreign seeds 1_000_000 + i and, as a control, the KB's seed 7. Every method is scored
by per-sample MSE (LATENT space) to plain Euler at 20 steps from the same prompt and noise; NFE is
counted per item at the denoiser (CountedDenoiser) or at the forward pass (EasyCache), never computed.

Methods, at key step k = 2 and value steps v (NFE = k + T - v, + 1 for the extra evaluation):
- plain euler/normal at n steps (the oracle's best plain sampler at these budgets on this model);
- ReDi's x_k retrieval (embedded.sampling.redi_sample, guard off), lstsq and affine weights;
- any-seed: key source "previous" (the sampler's own prediction at k - 1, free) or "extra" (one more
  evaluation at x_k); weights lstsq or affine; value "blend" (sum w D_i(v) + sigma_v eps_q) or
  "blend+residual" (+ D_q - sum w D_i(key)); H 3 and 16. The search over denoised keys is brute-force
  exact L2 in numpy over the 800 entries (the KB's FAISS index holds x_k, not D_k);
- ComfyUI's EasyCache node on euler/normal 20 steps (thresholds as the head-to-head benchmark's).

Verdicts: paired per-sample MSE difference against plain Euler at the same NFE (win / tie / loss
beyond 2 standard errors), or, where plain has no run at exactly that NFE, the next larger plain budget.
Results: benchmarks/results/any_seed.json and any_seed.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

import embedded.models as em  # noqa: E402

T, CFG, KB_SEED = 20, 3.0, 7
FOREIGN_BASE = 1_000_000
CACHE_THRESHOLDS = (0.05, 0.1, 0.2, 0.4)  # benchmarks/h2h/config.py's cache_thresholds
DEFAULT_KB = HERE / ".scratch" / "head_to_head" / "full" / "kb_crops16_euler-normal_T20_cfg3_seed7_n800"


def score(latents, reference) -> dict:
    from benchmarks.metrics import mean_se, per_sample_mse
    mse = per_sample_mse(np.asarray(latents), np.asarray(reference))
    mean, se = mean_se(mse)
    return {"mse_mean": mean, "mse_se": se, "mse_p95": float(np.percentile(mse, 95)), "mse": mse.tolist()}


class Runs:
    """The model, the KB and the runs of one query set (prompts and seeds)."""

    def __init__(self, kb, model, prompts: list[str], seeds: list[int]):
        from kb_tools.comfy import model_facts as cs
        self.kb, self.model, self.prompts, self.seeds = kb, model, prompts, seeds
        self.sigmas = cs.schedule_sigmas(model, "euler", "normal", T)

    def plain(self, steps: int, model=None):
        from embedded.sampling import plain
        from kb_tools.core.records import Recipe
        out = plain(model or self.model, self.prompts, self.seeds, Recipe("euler", "normal", steps, CFG))
        return out.latents, out.evaluations.per_item()

    def redi(self, v: int, h: int, mode: str, k: int):
        from embedded.sampling import GUARD_OFF, redi_sample
        r = redi_sample(self.kb, self.model, self.prompts, self.seeds, key_step=k, value_step=v, h=h, mode=mode,
                        guard=GUARD_OFF)
        return r.latent, r.evaluations.per_item(), {"centered_residual_mean": float(r.centered_residual.mean())}

    def any_seed(self, run):
        from benchmarks.any_seed_sampler import any_seed_sample
        out = any_seed_sample(self.kb, self.model, self.prompts, self.seeds, run)
        return out, run.evaluations.per_item(), {"centered_residual_mean": float(run.fit.centered_residual.mean())}

    def renoise_oracle(self, v: int, k: int, states: dict):
        """x_v = the query's OWN D at v (from its 20-step run) + sigma_v * eps_q(k), resumed with Euler: the error of
        re-noising alone, with a perfect retrieval (not a method: it needs the 20-step run)."""
        import torch

        from embedded.sampling import conditioning
        from kb_tools.comfy import model_facts as cs
        from benchmarks.any_seed_sampler import denoised_from_euler_steps, noise_estimate, renoise
        from kb_tools.comfy.plain import cfg_guider
        from kb_tools.comfy.counted import sample_counted
        s = self.sigmas
        x = {a: cs.from_latent_space(self.model, s[a], states[a]).double() for a in (k, k + 1, v, v + 1)}
        d_k = denoised_from_euler_steps(x[k], x[k + 1], float(s[k]), float(s[k + 1]))
        d_v = denoised_from_euler_steps(x[v], x[v + 1], float(s[v]), float(s[v + 1]))
        x_v = renoise(d_v, noise_estimate(x[k], d_k, float(s[k])), float(s[v])).float()
        latent = cs.to_latent_space(self.model, s[v], x_v)
        guider = cfg_guider(self.model, *conditioning(self.prompts), CFG)
        out, _, tally = sample_counted(guider, latent, self.seeds, s[v:], "euler", noise=torch.zeros_like(latent))
        return out, tally.per_item() + k + 1

    def easycache(self, threshold: float):
        from comfy_extras import nodes_easycache

        from benchmarks.forward_counter import counted
        cached = nodes_easycache.EasyCacheNode.execute(self.model, reuse_threshold=float(threshold), start_percent=0.15,
                                                       end_percent=0.95, verbose=False).result[0]
        model, counter = counted(cached)
        with counter.session(len(self.prompts)) as counts:
            latents, _ = self.plain(T, model)
        return latents, counts.nfe()


def query_set(name: str, kb, model, prompts, seeds, args) -> list[dict]:
    from benchmarks.any_seed_sampler import AnySeedRun
    runs = Runs(kb, model, prompts, seeds)
    rows: list[dict] = []
    t0 = time.time()
    from embedded.sampling import plain
    from kb_tools.core.records import Recipe
    full = plain(model, prompts, seeds, Recipe("euler", "normal", T, CFG),
                 record=sorted({a for v in args.values for a in (v, v + 1)} | {args.key, args.key + 1}))
    reference, ref_nfe = full.latents, full.evaluations.per_item()

    def add(method: str, params: dict, latents, nfe, extra: dict | None = None):
        row = {"seeds": name, "method": method, **params, "nfe_mean": float(np.mean(nfe)),
               "nfe_items": sorted(set(int(n) for n in nfe)), **(extra or {}), **score(latents, reference)}
        rows.append(row)
        print(f"[{time.time() - t0:6.0f}s] {name:8s} {method:10s} {params} NFE {row['nfe_mean']:.1f} "
              f"MSE {row['mse_mean']:.3e} +- {row['mse_se']:.1e}", flush=True)

    add("plain", {"steps": T}, reference, ref_nfe)
    budgets = sorted({args.key + T - v + e for v in args.values for e in (0, 1)})
    for n in budgets:
        add("plain", {"steps": n}, *runs.plain(n))
    for v in args.values:
        for h in args.h:
            for mode in ("lstsq", "affine"):
                add("redi", {"k": args.key, "v": v, "h": h, "weights": mode}, *runs.redi(v, h, mode, args.key))
    for source in ("previous", "extra"):
        for value_mode in ("blend", "blend+residual"):
            for mode in ("lstsq", "affine"):
                for h in args.h:
                    for v in args.values:
                        run = AnySeedRun(kb, args.key, v, h, mode, source, value_mode)
                        add("any_seed", {"k": args.key, "v": v, "h": h, "weights": mode, "key_source": source,
                                         "value": value_mode}, *runs.any_seed(run))
    for v in args.values:
        add("oracle_renoise", {"k": args.key, "v": v}, *runs.renoise_oracle(v, args.key, full.states))
    if not args.no_cache:
        for t in CACHE_THRESHOLDS:
            add("easycache", {"threshold": t, "steps": T}, *runs.easycache(t))
    return rows


def verdicts(rows: list[dict]) -> None:
    """Each non-plain row against plain Euler at the same NFE (or the next larger budget): paired MSE verdict."""
    from benchmarks.metrics import paired_verdict
    for row in rows:
        if row["method"] == "plain":
            continue
        plain = sorted((r for r in rows if r["method"] == "plain" and r["seeds"] == row["seeds"]
                        and r["steps"] >= row["nfe_mean"] - 1e-9), key=lambda r: r["steps"])
        base = plain[0]
        row["vs_plain"] = {"plain_steps": base["steps"],
                           "verdict": paired_verdict(np.array(row["mse"]), np.array(base["mse"])),
                           "ratio": row["mse_mean"] / base["mse_mean"] if base["mse_mean"] > 0 else None}


def best_per_budget(rows: list[dict], seeds: str, method: str) -> dict[float, dict]:
    """The lowest-MSE row of `method` at each NFE."""
    out: dict[float, dict] = {}
    for r in rows:
        if r["seeds"] == seeds and r["method"] == method and (r["nfe_mean"] not in out
                                                              or r["mse_mean"] < out[r["nfe_mean"]]["mse_mean"]):
            out[r["nfe_mean"]] = r
    return out


def verdict_lines(rows: list[dict]) -> list[str]:
    """The verdict, from the numbers: wins / ties / losses of every any-seed setting against plain at equal NFE."""
    lines = ["## Verdict", ""]
    for seeds in ("foreign", "kb_seed"):
        mine = [r for r in rows if r["seeds"] == seeds and r["method"] == "any_seed"]
        if not mine:
            continue
        tally = {v: sum(r["vs_plain"]["verdict"] == v for r in mine) for v in ("win", "tie", "loss")}
        plain = {r["steps"]: r for r in rows if r["seeds"] == seeds and r["method"] == "plain"}
        redi = best_per_budget(rows, seeds, "redi")
        parts = []
        for nfe, r in sorted(best_per_budget(rows, seeds, "any_seed").items()):
            base = plain.get(int(round(nfe)))
            rd = redi.get(nfe)
            parts.append(f"NFE {nfe:g}: best any-seed {r['mse_mean']:.2e} ({r['key_source']}, {r['value']}, "
                         f"{r['weights']}, H {r['h']})" + (f", plain euler {base['mse_mean']:.2e}" if base else "")
                         + (f", best ReDi x_k {rd['mse_mean']:.2e}" if rd else ""))
        oracle = [r for r in rows if r["seeds"] == seeds and r["method"] == "oracle_renoise"]
        lines += [f"- Seeds {seeds}: any-seed against plain euler at equal NFE, {len(mine)} settings: "
                  f"{tally['win']} wins, {tally['tie']} ties, {tally['loss']} losses (paired per-sample MSE, 2 se).",
                  *[f"  - {p}" for p in parts]]
        cache = sorted((r for r in rows if r["seeds"] == seeds and r["method"] == "easycache"), key=lambda r: r["nfe_mean"])
        if cache:
            lines.append("  - EasyCache on euler 20 steps (NFE counted at the forward pass): " + "; ".join(
                f"threshold {r['threshold']:g}: NFE {r['nfe_mean']:g}, {r['mse_mean']:.2e}" for r in cache))
        if oracle:
            lines.append("  - with a perfect retrieval (oracle_renoise: the query's own D at v, re-noised with eps_q(k)): "
                         + "; ".join(f"v {r['v']}: {r['mse_mean']:.2e} = {r['vs_plain']['ratio']:.1f}x plain euler at "
                                     f"{r['vs_plain']['plain_steps']} steps ({r['vs_plain']['verdict']})"
                                     for r in sorted(oracle, key=lambda r: r["v"])))
    wins = sum(r["method"] == "any_seed" and r["vs_plain"]["verdict"] == "win" for r in rows)
    lines += ["", "Reading: the gap between any-seed and its perfect-retrieval oracle is the retrieval's error (the "
              "neighbours' D at v is not the query's); the gap between the oracle and plain is the re-noising's (the "
              "noise direction eps_q read at k is not the trajectory's at v).",
              "", "It wins nowhere: kept as benchmark code (benchmarks/any_seed_sampler.py, benchmarks/any_seed.py), left out of "
              "the nodes." if not wins else f"It wins in {wins} settings (see the tables).", ""]
    return lines


def markdown(result: dict) -> str:
    rows = result["rows"]
    lines = [f"# Retrieval for any seed: results, N = {result['n']} held-out queries", "",
             result["setup"], "", "MSE: mean per-sample MSE (LATENT space) to plain euler at 20 steps from the same "
             "prompt and noise (+- standard error). vs plain: paired verdict against plain euler at the same NFE "
             "(or the next larger plain budget where none has exactly that NFE), and the MSE ratio. oracle_renoise: "
             "the query's own 20-step D at v re-noised with eps_q(k), i.e. any-seed with a perfect retrieval (needs the "
             "20-step run, so not a method: it bounds what better retrieval could give).", "",
             *verdict_lines(rows)]
    for seeds in ("foreign", "kb_seed"):
        sub = [r for r in rows if r["seeds"] == seeds]
        if not sub:
            continue
        lines += [f"## Seeds: {seeds}", "", "| method | settings | NFE | MSE | p95 | centered residual | vs plain |",
                  "|---|---|---|---|---|---|---|"]
        for r in sorted(sub, key=lambda r: (r["nfe_mean"], r["method"] != "plain", r["mse_mean"])):
            settings = ", ".join(f"{k} {r[k]}" for k in ("steps", "k", "v", "h", "weights", "key_source", "value",
                                                         "threshold") if k in r)
            vs = r.get("vs_plain")
            ratio = f" ({vs['ratio']:.2f}x)" if vs and vs["ratio"] is not None else ""
            vs_text = f"{vs['verdict']} vs {vs['plain_steps']} steps{ratio}" if vs else ""
            res = f"{r['centered_residual_mean']:.2f}" if "centered_residual_mean" in r else ""
            lines.append(f"| {r['method']} | {settings} | {r['nfe_mean']:.1f} | {r['mse_mean']:.2e} +- {r['mse_se']:.1e} "
                         f"| {r['mse_p95']:.2e} | {res} | {vs_text} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kb", default=str(DEFAULT_KB), help="the head-to-head KB (read only)")
    p.add_argument("--n", type=int, default=32, help="held-out queries")
    p.add_argument("--key", type=int, default=2)
    p.add_argument("--values", type=int, nargs="+", default=[6, 10, 14])
    p.add_argument("--h", type=int, nargs="+", default=[3, 16])
    p.add_argument("--seeds", nargs="+", default=["foreign", "kb_seed"], choices=["foreign", "kb_seed"])
    p.add_argument("--no-cache", action="store_true", help="skip EasyCache")
    p.add_argument("--out", default=str(HERE / "benchmarks" / "results" / "any_seed.json"))
    p.add_argument("--render", action="store_true", help="only rewrite the .md of --out from its JSON")
    args = p.parse_args()
    out = Path(args.out)
    if args.render:
        out.with_suffix(".md").write_text(markdown(json.loads(out.read_text())))
        return 0

    em.setup_comfy(threads=1)
    large, _, _ = em.load_models()
    from embedded.captions import sample_captions
    from kb_tools.store import KnowledgeBase
    kb = KnowledgeBase.open(args.kb)
    prompts = [c.prompt() for c in sample_captions(args.n, "heldout")]
    seed_sets = {"foreign": [FOREIGN_BASE + i for i in range(args.n)], "kb_seed": [KB_SEED] * args.n}
    started, cpu0 = time.time(), time.process_time()
    rows = []
    for name in args.seeds:
        rows += query_set(name, kb, large, prompts, seed_sets[name], args)
    verdicts(rows)
    result = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "n": args.n, "kb": {"path": str(args.kb), "entries": len(kb), "recipe": str(kb.settings.recipe),
                            "stored_steps": kb.stored_steps},
        "setup": (f"KB: {len(kb)} train-caption trajectories of the embedded model crops16 (seed {KB_SEED}, "
                  f"euler/normal, T = {T}, cfg {CFG}). Queries: the first {args.n} held-out captions; seeds foreign "
                  f"({FOREIGN_BASE} + i) and the KB's seed {KB_SEED}. Any-seed retrieval searches the KB's denoised "
                  "estimates (derived from its stored Euler steps) by brute-force exact L2 in numpy, not FAISS."),
        "wall_s": time.time() - started, "cpu_s": time.process_time() - cpu0, "rows": rows,
    }
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
