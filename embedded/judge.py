"""The judge: a small CNN trained on rendered real crops that reads what an image shows.

From an image [N, 3, 16, 16] it reads the source class, the crop geometry (cx, cy, log size)
and the sepia strength; its 128-d hidden layer is the feature space of the benchmarks'
Frechet distance. Trained by `python -m embedded.train --judge` on train captions and train
digits, shipped in embedded/weights/crops_judge.safetensors.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .captions import NUM_SOURCES, Caption
from .models import WEIGHT_FILES, load_into, read_weights
from .rendering import LATENT_SHAPE, render

FEATURES = 128


class JudgeNet(nn.Module):
    """image [N, 3, 16, 16] -> (features [N, 128], source logits [N, 18], geometry [N, 3], sepia [N])."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GroupNorm(8, 64), nn.SiLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.SiLU(),
            nn.Conv2d(64, 96, 3, stride=2, padding=1), nn.GroupNorm(8, 96), nn.SiLU(),
            nn.Flatten(), nn.Linear(96 * 16, FEATURES), nn.SiLU(),
        )
        self.source = nn.Linear(FEATURES, NUM_SOURCES)
        self.geometry = nn.Linear(FEATURES, 3)
        self.sepia = nn.Linear(FEATURES, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        f = self.body(x)
        return f, self.source(f), self.geometry(f), self.sepia(f).squeeze(-1)


def judge_net() -> JudgeNet:
    """A freshly initialised judge (seed 0, so a training run starts from the same weights)."""
    torch.manual_seed(0)
    return JudgeNet()


@functools.lru_cache(maxsize=None)
def load_judge(path=None) -> JudgeNet:
    """The trained judge (inference mode, float32), loaded once."""
    tensors, _ = read_weights("judge", path)
    net = judge_net()
    load_into(net, tensors, "judge", path or WEIGHT_FILES["judge"], prefix="judge.")
    return net.train(False)  # inference mode


@dataclasses.dataclass
class JudgeReading:
    """What the judge reads from N images (numpy)."""

    features: np.ndarray  # float32 [N, 128], the Frechet-distance feature space
    source: np.ndarray    # int64 [N], argmax of the source logits
    geometry: np.ndarray  # float32 [N, 3], (cx, cy, log size)
    sepia: np.ndarray     # float32 [N]


def read(latents, batch: int = 500) -> JudgeReading:
    """The judge's reading of latents [N, 3, 16, 16] (tensor or array; clamped to [-1, 1])."""
    net = load_judge()
    x = torch.as_tensor(np.asarray(latents, dtype=np.float32)).reshape(-1, *LATENT_SHAPE).clamp(-1, 1)
    parts: dict[str, list] = {"features": [], "source": [], "geometry": [], "sepia": []}
    with torch.no_grad():
        for i in range(0, len(x), batch):
            f, logits, geo, sep = net(x[i:i + batch])
            parts["features"].append(f.numpy())
            parts["source"].append(logits.argmax(-1).numpy())
            parts["geometry"].append(geo.numpy())
            parts["sepia"].append(sep.numpy())
    return JudgeReading(**{k: np.concatenate(v) for k, v in parts.items()})


def geometry_target(captions_or_geometry) -> np.ndarray:
    """Judge geometry targets [N, 3] = (cx, cy, log size) from captions or a [N, 3] (cx, cy, size) tensor."""
    if isinstance(captions_or_geometry, (list, tuple)):
        g = np.array([[c.cx, c.cy, c.size] for c in captions_or_geometry], dtype=np.float32)
    else:
        g = np.asarray(captions_or_geometry, dtype=np.float32).copy()
    g[:, 2] = np.log(g[:, 2])
    return g


@dataclasses.dataclass
class Faithfulness:
    """How well N images follow their captions, as the judge reads them: means with standard errors."""

    acc: float           # share of images whose source the judge names as the caption's
    acc_se: float        # binomial se (floored at one hit in n)
    geo_err: float       # mean |error| of (cx, cy, log size)
    geo_err_se: float
    sepia_err: float     # mean |error| of the sepia strength
    sepia_err_se: float
    geo_per_sample: np.ndarray = dataclasses.field(repr=False)  # [N], for paired verdicts


def faithfulness(reading: JudgeReading, captions: Sequence[Caption]) -> Faithfulness:
    """Condition faithfulness of a reading against the captions the images were generated for."""
    n = len(captions)
    truth = np.array([c.source for c in captions])
    hit = (reading.source == truth).astype(float)
    geo = np.abs(reading.geometry - geometry_target(list(captions))).mean(axis=1)
    sep = np.abs(reading.sepia - np.array([c.sepia for c in captions]))
    acc = float(hit.mean())
    return Faithfulness(acc=acc, acc_se=math.sqrt(max(acc * (1 - acc), 1.0 / n) / n),
                        geo_err=float(geo.mean()), geo_err_se=float(geo.std(ddof=1) / math.sqrt(n)),
                        sepia_err=float(sep.mean()), sepia_err_se=float(sep.std(ddof=1) / math.sqrt(n)),
                        geo_per_sample=geo)


class Judge:
    """The judge as a benchmark uses it: readings of generated latents, and real crops to compare them with.

    Real crops are rendered with the judge's own generator (fixed seed), so a benchmark that
    asks for the same renderings in the same order gets the same reference set.
    """

    def __init__(self, seed: int = 4321):
        self._gen = torch.Generator().manual_seed(seed)

    def read(self, latents) -> JudgeReading:
        return read(latents)

    def features(self, latents) -> np.ndarray:
        return read(latents).features

    def real(self, captions: Sequence[Caption], split: str = "heldout") -> torch.Tensor:
        """Real crops [N, 3, 16, 16] rendered for captions (held-out digits by default)."""
        return render(captions, self._gen, split)[0]

    def real_features(self, captions: Sequence[Caption], renders: int = 1) -> np.ndarray:
        """Features [renders * N, 128] of `renders` fresh real renderings of the captions."""
        return np.concatenate([self.features(self.real(captions)) for _ in range(renders)])
