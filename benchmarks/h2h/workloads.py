"""The query sets users run, per regime: held-out captions (foreign seeds / the KB seed), near-repeats of KB captions,
and the artist's loop (small prompt changes from the user's own fixed seed, in generation order).

Pure captions and seeds (no models): what the model is asked for and from which noise. Item i of a
workload is the same query whatever the number of items asked for (a longer query set only appends),
so the results store can key an item by its index and a later run continue where one stopped.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from embedded.captions import Caption, sample_captions

from .config import Config, Regime

#: Held-out captions at these indices and above are the oracle's selection set, never evaluation queries.
SELECTION_OFFSET = 10_000
#: The artist's loop starts its sessions from held-out captions at these indices: in no KB and no other workload.
ITERATE_OFFSET = 20_000


@dataclasses.dataclass(frozen=True)
class Queries:
    """One workload's queries: item i asks for prompts[i] from the noise of seeds[i]."""

    workload: str
    prompts: tuple[str, ...]           # what the sampler is asked for (stylization: the styled caption)
    seeds: tuple[int, ...]
    captions: tuple[Caption, ...]      # what the output should show (faithfulness, FD reference renderings)
    content_prompts: tuple[str, ...] | None = None   # a content caption to key on (no workload here sets it)
    description: str = ""

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, items) -> Queries:
        """The queries at these item indices, in the order given."""
        items = [int(i) for i in items]
        return dataclasses.replace(self, prompts=tuple(self.prompts[i] for i in items),
                                   seeds=tuple(self.seeds[i] for i in items),
                                   captions=tuple(self.captions[i] for i in items))


def heldout(cfg: Config, regime: Regime, seeds: str) -> Queries:
    """(a) held-out captions, each from a seed the KB never saw ("foreign"), or (d) the paper's protocol: from the KB seed ("fixed")."""
    caps = sample_captions(cfg.queries, "heldout")
    if seeds == "fixed":
        s, text = [regime.kb_seed] * len(caps), f"every query from the KB seed {regime.kb_seed} (the paper's protocol)"
    else:
        s = [cfg.foreign_seed_base + i for i in range(len(caps))]
        text = f"every query from its own seed {cfg.foreign_seed_base}+i, none in the KB (what a user does)"
    return Queries(f"heldout_{seeds}", tuple(c.prompt() for c in caps), tuple(s), tuple(caps),
                   description=f"{len(caps)} held-out captions; {text}")


def nudge(caption: Caption, rng: np.random.Generator, shift: float, log_size: float, sepia: float) -> Caption:
    """A KB caption changed a little, as an artist iterating on a prompt: centre, size and sepia moved."""
    from embedded.captions import SIZE_RANGE, source_kind

    lo, hi = SIZE_RANGE[source_kind(caption.source)]
    cx = float(np.clip(caption.cx + rng.uniform(-shift, shift), 0.0, 1.0))
    cy = float(np.clip(caption.cy + rng.uniform(-shift, shift), 0.0, 1.0))
    size = float(np.clip(caption.size * math.exp(rng.uniform(-log_size, log_size)), lo, hi))
    t = float(np.clip(caption.sepia + rng.choice([-1.0, 1.0]) * sepia, 0.0, 1.0))
    return Caption(caption.source, round(cx, 2), round(cy, 2), round(size, 2), round(t, 2))


def reuse(cfg: Config, regime: Regime) -> Queries:
    """(c) Prompt reuse: each query is a KB caption with small changes, from the KB seed. Item i's pick and nudge come
    from a generator seeded by i, so a longer query set only appends items."""
    kb_caps = sample_captions(regime.kb_entries, "train")
    caps = []
    for i in range(cfg.queries):
        rng = np.random.default_rng([11, i])
        pick = kb_caps[int(rng.integers(len(kb_caps)))]
        caps.append(nudge(pick, rng, cfg.reuse_shift, cfg.reuse_log_size, cfg.reuse_sepia))
    return Queries("reuse", tuple(c.prompt() for c in caps), tuple([regime.kb_seed] * len(caps)), tuple(caps),
                   description=(f"{len(caps)} KB captions changed a little (centre +-{cfg.reuse_shift}, size x "
                                f"exp(+-{cfg.reuse_log_size}), sepia +-{cfg.reuse_sepia}), from the KB seed "
                                f"{regime.kb_seed}: an artist iterating on a prompt"))


def artist_loop(n: int, session: int, cfg: Config, split: str = "train", offset: int = 0) -> list[Caption]:
    """n captions in generation order: sessions of `session` generations, each starting from a new caption of `split`
    (captions offset, offset + 1, ...) and each later generation nudging the previous caption (`nudge`, the reuse sizes)."""
    rng = np.random.default_rng(12)
    out = []
    for start in sample_captions(-(-n // session), split, offset=offset):
        cap = start
        for i in range(session):
            if i:
                cap = nudge(cap, rng, cfg.reuse_shift, cfg.reuse_log_size, cfg.reuse_sepia)
            out.append(cap)
    return out[:n]


def iterate(cfg: Config, regime: Regime) -> Queries:
    """The artist's loop: sessions of small prompt changes, each session from its own fixed seed (the user's,
    never the KB's); the queries stay in generation order, which a KB that learns from each generation depends on."""
    caps = artist_loop(cfg.queries, cfg.iterate_session, cfg, "heldout", ITERATE_OFFSET)
    seeds = [cfg.iterate_seed_base + i // cfg.iterate_session for i in range(len(caps))]
    sessions = -(-len(caps) // cfg.iterate_session)
    return Queries("iterate", tuple(c.prompt() for c in caps), tuple(seeds), tuple(caps),
                   description=(f"{len(caps)} generations in order: {sessions} session(s) of up to {cfg.iterate_session}, "
                                f"each from a new held-out caption (indices {ITERATE_OFFSET}+) and its own fixed seed "
                                f"{cfg.iterate_seed_base}+session (never the KB seed {regime.kb_seed}), each generation "
                                f"the previous caption changed a little (centre +-{cfg.reuse_shift}, size x "
                                f"exp(+-{cfg.reuse_log_size}), sepia +-{cfg.reuse_sepia}): an artist's loop"))


def make(cfg: Config, regime: Regime, workload: str) -> Queries:
    if workload == "heldout_fixed":
        return heldout(cfg, regime, "fixed")
    if workload == "heldout_foreign":
        return heldout(cfg, regime, "foreign")
    if workload == "reuse":
        return reuse(cfg, regime)
    if workload == "iterate":
        return iterate(cfg, regime)
    raise ValueError(f"unknown workload {workload!r}")


def selection(cfg: Config, n: int | None = None) -> Queries:
    """The oracle's selection set (its first `n`, default all): held-out captions that are no evaluation query, each
    from its own seed."""
    caps = sample_captions(cfg.oracle_captions if n is None else n, "heldout", offset=SELECTION_OFFSET)
    seeds = [cfg.foreign_seed_base + SELECTION_OFFSET + i for i in range(len(caps))]
    return Queries("oracle_selection", tuple(c.prompt() for c in caps), tuple(seeds), tuple(caps),
                   description=f"{len(caps)} held-out captions (indices {SELECTION_OFFSET}+, not evaluation queries), "
                               "each from its own seed")
