"""The embedded models' text encoder: a fixed function of the caption (no learned weights).

Like a frozen CLIP shared by both models: context [B, 4, 64] = [source token, geometry token,
style token, constant token], built from fixed random embeddings and Fourier features of the
caption's numbers; the unconditional prompt "" keeps only the constant token.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
import torch

from .captions import NUM_SOURCES, Caption, parse_prompt

CONTEXT_DIM = 64
CONTEXT_TOKENS = 4


@functools.lru_cache(maxsize=None)
def _encoder_tables() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    sources = torch.randn(NUM_SOURCES, CONTEXT_DIM, generator=gen)
    geometry = torch.randn(3 * 2 * 6 + 3, CONTEXT_DIM, generator=gen) / math.sqrt(3 * 2 * 6 + 3)
    style = torch.randn(2 * 6 + 2, CONTEXT_DIM, generator=gen) / math.sqrt(2 * 6 + 2)
    constant = torch.randn(CONTEXT_DIM, generator=gen)
    return sources, geometry, style, constant


def _fourier(values: torch.Tensor, freqs: int = 6) -> torch.Tensor:
    """[N, D] -> [N, D * 2 * freqs] sin / cos features at frequencies pi * 2^j."""
    f = math.pi * (2.0 ** torch.arange(freqs, dtype=torch.float32))
    ang = values.unsqueeze(-1) * f
    return torch.cat([ang.sin(), ang.cos()], dim=-1).reshape(len(values), -1)


def context(captions: Sequence[Caption | None]) -> torch.Tensor:
    """Context [B, 4, 64] for captions (None = unconditional: only the constant token is non-zero)."""
    sources, geometry, style, constant = _encoder_tables()
    rows = []
    for cap in captions:
        if cap is None:
            rows.append(torch.stack([torch.zeros(CONTEXT_DIM)] * 3 + [constant]))
            continue
        geo = torch.tensor([[cap.cx, cap.cy, math.log(cap.size)]])
        sty = torch.tensor([[cap.sepia]])
        geo_feat = torch.cat([_fourier(geo), geo], dim=-1) @ geometry
        sty_feat = torch.cat([_fourier(sty), sty, torch.ones(1, 1)], dim=-1) @ style
        rows.append(torch.stack([sources[cap.source], geo_feat[0] * 2.0, sty_feat[0] * 2.0, constant]))
    return torch.stack(rows)


def encode(prompt: str) -> list:
    """prompt -> CONDITIONING [[tensor[1, 4, 64], {}]] (what a ComfyUI CLIPTextEncode would give)."""
    return [[context([parse_prompt(prompt)]), {}]]


def condition_embedding(prompts: Sequence[str]) -> np.ndarray:
    """Flattened contexts [N, 256] (the condition-embedding key, CLIP / NIRVANA style)."""
    return context([parse_prompt(p) for p in prompts]).reshape(len(prompts), -1).numpy()
