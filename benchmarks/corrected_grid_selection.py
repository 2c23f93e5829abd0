"""How the corrected solver's default grid rule was chosen: three rules on held-out SELECTION captions.

Writes benchmarks/results/corrected_grid_selection.json. The captions are held-out captions
20000+ (never evaluation queries of head_to_head.py, which uses 0..N-1, nor the oracle's
selection set at 10000+); the KB is the head-to-head's cached 800-entry T = 20 KB. Rules (the
first and last coarse steps; the steps between evenly spread): A 0 -> 2 ... 18 -> 20;
B 0 -> 2 ... 19 -> 20 (the schedule's own last step, sigma_min -> 0); C 0 -> 1 ... 19 -> 20.
Per-sample MSE to the plain euler 20-step output of the same prompt and seed, against plain
euler/normal at the same NFE, for the KB's seed and for foreign seeds.

    python benchmarks/corrected_grid_selection.py --kb .scratch/head_to_head/full/kb_crops16_euler-normal_T20_cfg3_seed7_n800
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

PACK = Path(__file__).resolve().parent.parent
if str(PACK) not in sys.path:
    sys.path.insert(0, str(PACK))

from embedded.models import setup_comfy  # noqa: E402

RULES = {"A": (2, 2), "B": (2, 1), "C": (1, 1)}  # (first step, steps before T of the last grid point)


def rule_grid(steps: int, nfe: int, first: int, last: int) -> tuple[int, ...]:
    """0, then nfe - 1 points evenly from `first` to steps - `last`, then steps."""
    hi = steps - last
    return (0, *[first + math.floor(i * (hi - first) / (nfe - 2) + 0.5) for i in range(nfe - 1)], steps)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kb", type=Path, required=True, help="an euler KB storing steps 1..T-1 (the head-to-head's)")
    p.add_argument("--captions", type=int, default=24)
    p.add_argument("--out", type=Path, default=PACK / "benchmarks" / "results" / "corrected_grid_selection.json")
    a = p.parse_args(argv)
    setup_comfy(1)
    import torch

    from embedded import sampling as S
    from embedded.captions import sample_captions
    from embedded.models import load_models
    from kb_tools.core.coarse_grid import coarse_grid
    from kb_tools.store import KnowledgeBase
    from kb_tools.core.records import Recipe

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    large, _, _ = load_models()
    kb = KnowledgeBase.open(str(a.kb))
    T, cfg = kb.settings.steps, kb.settings.cfg
    prompts = [c.prompt() for c in sample_captions(a.captions, "heldout", offset=20000)]
    rows = []
    for seeds_name, seeds in (("kb_seed", [kb.entries[0][1]] * len(prompts)),
                              ("foreign", [1_050_000 + i for i in range(len(prompts))])):
        ref = S.plain(large, prompts, seeds, Recipe("euler", "normal", T, cfg)).latents

        def mse(out):
            return float(((out - ref) ** 2).flatten(1).mean(1).mean())
        for nfe in (5, 7, 10, 15):
            row = {"seeds": seeds_name, "nfe": nfe,
                   "plain_euler_normal": mse(S.plain(large, prompts, seeds, Recipe("euler", "normal", nfe, cfg)).latents)}
            for name, (first, last) in RULES.items():
                grid = rule_grid(T, nfe, first, last)
                out, run = S.corrected_sample(kb, large, prompts, seeds, grid)
                row[name] = {"grid": list(grid), "mse": mse(out), "segments_corrected": len(run.corrected)}
            row["default_rule_grid"] = list(coarse_grid(T, nfe))
            rows.append(row)
            print(json.dumps(row), flush=True)
    res = {"benchmark": "corrected_grid_selection", "kb": a.kb.name, "kb_entries": len(kb), "captions": a.captions,
           "caption_offset": 20000, "rules": {k: {"first": first, "last_from": f"T-{last}"} for k, (first, last) in RULES.items()},
           "h": 3, "weight_mode": "lstsq", "rows": rows, "wall_seconds": round(time.perf_counter() - t0, 1)}
    a.out.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
