"""Captions of the embedded crops models: what a caption says, how a prompt is read, how captions are drawn.

A caption is "<source> at <cx> <cy> size <z> [sepia <t>]", for example
"cat at 0.40 0.62 size 0.35 sepia 0.80" or "digit 7 at 0.5 0.5 size 0.8": a source picture
(one of 8 photographs or a digit class), a square crop window (cx, cy in [0, 1] place it
inside the picture, z is its side as a fraction of the picture's shorter side) and a sepia
strength t in [0, 1] (the style axis). "" is the unconditional prompt.

The caption distribution is `caption_from_uniforms`; two random streams feed it:
`sample_captions` (numpy, one stream per caption index, rounded to the prompt's two decimals:
the fixed train and held-out splits, as COCO train / val captions) and
`random_training_captions` (a torch generator: the fresh captions of every training batch).
"""
from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import torch

PHOTO_SOURCES = ("astronaut", "cat", "coffee", "rocket", "galaxy", "coins", "temple", "flower")
DIGIT_SOURCES = tuple(f"digit {d}" for d in range(10))
SOURCES = DIGIT_SOURCES + PHOTO_SOURCES
NUM_SOURCES = len(SOURCES)
SIZE_RANGE = {"photo": (0.15, 1.0), "digit": (0.5, 1.0)}
SPLIT_SEEDS = {"train": 1, "heldout": 2}
SEPIA_MODES = ("mixed", "none", "full")

_CAPTION_RE = re.compile(
    r"^\s*(?P<source>digit\s+[0-9]|[a-z]+)"
    r"(?:\s+at\s+(?P<cx>[0-9]*\.?[0-9]+)\s+(?P<cy>[0-9]*\.?[0-9]+))?"
    r"(?:\s+size\s+(?P<z>[0-9]*\.?[0-9]+))?"
    r"(?:\s+sepia\s+(?P<t>[0-9]*\.?[0-9]+))?\s*$",
    re.IGNORECASE,
)


class PromptError(ValueError):
    """A prompt the toy text encoder cannot read."""


def source_kind(source: int) -> str:
    """'digit' or 'photo' for a source index (digits come first in SOURCES)."""
    return "digit" if source < len(DIGIT_SOURCES) else "photo"


@dataclasses.dataclass(frozen=True)
class Caption:
    """What a caption asks for: a source picture, a crop window (cx, cy in [0, 1], size z) and a sepia strength."""

    source: int
    cx: float = 0.5
    cy: float = 0.5
    size: float = 1.0
    sepia: float = 0.0

    @property
    def name(self) -> str:
        return SOURCES[self.source]

    def prompt(self) -> str:
        text = f"{self.name} at {self.cx:.2f} {self.cy:.2f} size {self.size:.2f}"
        return text + (f" sepia {self.sepia:.2f}" if self.sepia > 0 else "")

    def with_sepia(self, t: float) -> Caption:
        return dataclasses.replace(self, sepia=float(t))


def parse_prompt(prompt: str) -> Caption | None:
    """Caption of a prompt ("cat at 0.4 0.6 size 0.3 sepia 0.8"); None for "" (unconditional)."""
    if not isinstance(prompt, str):
        raise PromptError(f"prompt must be a string, got {type(prompt).__name__}.")
    if not prompt.strip():
        return None
    m = _CAPTION_RE.match(prompt)
    source = " ".join(m.group("source").lower().split()) if m else None
    if m is None or source not in SOURCES:
        raise PromptError(
            f"the embedded crops model cannot read the prompt {prompt!r}. It reads "
            "'<source> at <cx> <cy> size <z> sepia <t>' (every part after the source optional), with source one of "
            f"{', '.join(SOURCES)}; cx, cy, t in [0, 1], z in (0, 1]; '' is the unconditional prompt. "
            "Example: 'cat at 0.40 0.60 size 0.35 sepia 0.8'. Use a real checkpoint with its own text encoder for free text."
        )
    idx = SOURCES.index(source)
    kind = source_kind(idx)
    values = {k: float(m.group(k)) for k in ("cx", "cy", "z", "t") if m.group(k) is not None}
    for key, label in (("cx", "cx"), ("cy", "cy"), ("t", "sepia")):
        if not 0.0 <= values.get(key, 0.0) <= 1.0:
            raise PromptError(f"{label} must be in [0, 1] in {prompt!r}, got {values[key]}.")
    lo, hi = SIZE_RANGE[kind]
    z = values.get("z", 1.0)
    if not lo <= z <= hi:
        raise PromptError(f"size must be in [{lo}, {hi}] for a {kind} source in {prompt!r}, got {z}.")
    return Caption(idx, values.get("cx", 0.5), values.get("cy", 0.5), z, values.get("t", 0.0))


def caption_from_uniforms(source: int, u_cx: float, u_cy: float, u_size: float, u_sepia_coin: float,
                          u_sepia: float) -> Caption:
    """The caption distribution, given a uniform source and uniform [0, 1) draws.

    Crop centre uniform; size log-uniform in SIZE_RANGE of the source's kind; sepia 0 half the
    time (u_sepia_coin >= 0.5), else u_sepia.
    """
    lo, hi = SIZE_RANGE[source_kind(source)]
    size = math.exp(math.log(lo) + u_size * (math.log(hi) - math.log(lo)))
    sepia = u_sepia if u_sepia_coin < 0.5 else 0.0
    return Caption(source, u_cx, u_cy, size, sepia)


def sample_captions(n: int, split: str, *, sepia: str = "mixed", offset: int = 0) -> list[Caption]:
    """Captions offset .. offset + n - 1 of the train or held-out split (same distribution, disjoint draws).

    Rounded to two decimals, as their prompts print them. sepia "mixed" keeps the distribution's
    sepia, "none" sets it to 0, "full" to 1.
    """
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {list(SPLIT_SEEDS)}, got {split!r}.")
    if sepia not in SEPIA_MODES:
        raise ValueError(f"sepia must be one of {list(SEPIA_MODES)}, got {sepia!r}.")
    out = []
    for i in range(offset, offset + n):
        rng = np.random.default_rng([SPLIT_SEEDS[split], i])
        # The draw order (and u_sepia drawn only when used) fixes the splits every KB and result was made with.
        source = int(rng.integers(NUM_SOURCES))
        u_size = rng.uniform()
        u_coin = rng.uniform()
        u_sepia = rng.uniform() if u_coin < 0.5 else 0.0
        u_cx = rng.uniform()
        u_cy = rng.uniform()
        cap = caption_from_uniforms(source, u_cx, u_cy, u_size, u_coin, u_sepia)
        t = {"mixed": cap.sepia, "none": 0.0, "full": 1.0}[sepia]
        out.append(Caption(source, round(cap.cx, 2), round(cap.cy, 2), round(cap.size, 2), round(t, 2)))
    return out


def random_training_captions(n: int, gen: torch.Generator) -> list[Caption]:
    """n fresh captions of the distribution (continuous, not rounded) from a torch generator."""
    # Six uniforms per caption: the sixth is unused but drawn, so the generator's stream (and with it
    # the shipped models' and the judge's training data) stays what it was when they were trained.
    u = torch.rand(n, 6, generator=gen)
    sources = torch.randint(NUM_SOURCES, (n,), generator=gen)
    return [caption_from_uniforms(int(sources[i]), float(u[i, 0]), float(u[i, 1]), float(u[i, 2]), float(u[i, 3]),
                                  float(u[i, 4])) for i in range(n)]
