"""The crops data: real 16x16 RGB crops rendered for captions, which the models and the judge learn from.

Crops of 8 photographs that scikit-image and scikit-learn ship and of scikit-learn's
handwritten digits (one source per digit class, many handwritings each, split into train and
held-out digits), at the caption's position and size, optionally sepia-toned, in [-1, 1].
The latent IS the image (no VAE): 3 channels, scale 1.0. The rendered crop jitters around the
caption's geometry (captions are imprecise), and a digit caption leaves the handwriting open:
a caption fixes the content, the seed picks one of many images.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .captions import DIGIT_SOURCES, PHOTO_SOURCES, SIZE_RANGE, Caption

IMAGE_SIZE = 16
CHANNELS = 3
LATENT_SHAPE = (CHANNELS, IMAGE_SIZE, IMAGE_SIZE)

#: caption source -> (package, file inside the package): photographs shipped by scikit-image / scikit-learn.
PHOTO_FILES = {
    "astronaut": ("skimage", "data/astronaut.png"),
    "cat": ("skimage", "data/chelsea.png"),
    "coffee": ("skimage", "data/coffee.png"),
    "rocket": ("skimage", "data/rocket.jpg"),
    "galaxy": ("skimage", "data/hubble_deep_field.jpg"),
    "coins": ("skimage", "data/coins.png"),
    "temple": ("sklearn", "datasets/images/china.jpg"),
    "flower": ("sklearn", "datasets/images/flower.jpg"),
}
PHOTO_SHORT_SIDE = 128      # photographs are resized so their shorter side has this many pixels
DIGIT_CANVAS = 32           # 8x8 digits are upsampled to this size before cropping
JITTER_POSITION = 0.03      # sd of the rendered crop centre around the caption's (cx, cy)
JITTER_LOG_SIZE = 0.05      # sd of log(size) around the caption's size
DIGIT_SPLIT_SEED = 0
DIGIT_TRAIN_COUNT = 1437    # of scikit-learn's 1797 digits; the rest are held out


class DataError(FileNotFoundError):
    """The photographs the crops are rendered from are not installed."""


def _package_file(package: str, rel: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = {"skimage": "scikit-image", "sklearn": "scikit-learn"}[package]
        raise DataError(f"the crops data needs the photographs that ship inside the {dist} package, which this Python "
                        f"does not have: add {dist} to the environment (scripts/requirements-test.txt pins it) or run "
                        "through scripts/env.sh, whose environment has it.")
    return Path(spec.submodule_search_locations[0]) / rel


@functools.lru_cache(maxsize=None)
def photo_tensors() -> tuple[torch.Tensor, ...]:
    """The photographs in PHOTO_SOURCES order as float tensors [3, H, W] in [0, 1], shorter side PHOTO_SHORT_SIDE."""
    out = []
    for name in PHOTO_SOURCES:
        im = Image.open(_package_file(*PHOTO_FILES[name])).convert("RGB")
        scale = PHOTO_SHORT_SIDE / min(im.size)
        im = im.resize((round(im.size[0] * scale), round(im.size[1] * scale)), Image.LANCZOS)
        out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous())
    return tuple(out)


@functools.lru_cache(maxsize=None)
def digit_canvases(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """(canvases [N, 3, 32, 32] in [0, 1], labels [N]) of scikit-learn's digits, fixed train / held-out split."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}.")
    from sklearn.datasets import load_digits  # scikit-learn's import takes seconds; only rendering needs it

    d = load_digits()
    perm = np.random.default_rng(DIGIT_SPLIT_SEED).permutation(len(d.target))
    sel = perm[:DIGIT_TRAIN_COUNT] if split == "train" else perm[DIGIT_TRAIN_COUNT:]
    x = torch.from_numpy(d.images[sel].astype(np.float32) / 16.0).unsqueeze(1)
    x = F.interpolate(x, size=(DIGIT_CANVAS, DIGIT_CANVAS), mode="bilinear", align_corners=False).clamp(0, 1)
    return x.expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(d.target[sel].astype(np.int64))


def _window_theta(cx: torch.Tensor, cy: torch.Tensor, size: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Affine grid_sample matrices [N, 2, 3] of square windows (cx, cy in [0, 1] within the valid range)."""
    side = size * min(height, width)
    hx, hy = side / width, side / height
    theta = torch.zeros(len(cx), 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = hx, hy
    theta[:, 0, 2] = (hx - 1.0) + cx * (2.0 - 2.0 * hx)
    theta[:, 1, 2] = (hy - 1.0) + cy * (2.0 - 2.0 * hy)
    return theta


def _crop(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Crops [N, 3, 16, 16] of images [N, 3, H, W] (4x supersampled, then averaged: no aliasing)."""
    grid = F.affine_grid(theta, (len(theta), 3, 4 * IMAGE_SIZE, 4 * IMAGE_SIZE), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return F.avg_pool2d(out, 4)


def sepia(images: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """Sepia-tone images [N, 3, H, W] in [0, 1] by strength [N] in [0, 1] (the style axis)."""
    m = torch.tensor([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]])
    toned = torch.einsum("ij,njhw->nihw", m, images).clamp(0, 1)
    s = strength.reshape(-1, 1, 1, 1)
    return (1 - s) * images + s * toned


def render(captions: Sequence[Caption], gen: torch.Generator, split: str = "train",
           jitter: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Real images for captions: (images [N, 3, 16, 16] in [-1, 1], actual geometry [N, 3] (cx, cy, size)).

    Digit captions draw a handwriting of their class from the split's digits with `gen`.
    """
    n = len(captions)
    cx = torch.tensor([c.cx for c in captions], dtype=torch.float32)
    cy = torch.tensor([c.cy for c in captions], dtype=torch.float32)
    size = torch.tensor([c.size for c in captions], dtype=torch.float32)
    if jitter:
        cx = (cx + JITTER_POSITION * torch.randn(n, generator=gen)).clamp(0, 1)
        cy = (cy + JITTER_POSITION * torch.randn(n, generator=gen)).clamp(0, 1)
        size = size * torch.exp(JITTER_LOG_SIZE * torch.randn(n, generator=gen))
    src = torch.tensor([c.source for c in captions])
    is_digit = src < len(DIGIT_SOURCES)
    size = torch.where(is_digit, size.clamp(*SIZE_RANGE["digit"]), size.clamp(*SIZE_RANGE["photo"]))
    out = torch.zeros(n, 3, IMAGE_SIZE, IMAGE_SIZE)
    digits, labels = digit_canvases(split)
    if is_digit.any():
        idx = torch.nonzero(is_digit).reshape(-1)
        pick = []
        for i in idx.tolist():
            pool = torch.nonzero(labels == int(src[i])).reshape(-1)
            pick.append(int(pool[torch.randint(len(pool), (1,), generator=gen)]))
        theta = _window_theta(cx[idx], cy[idx], size[idx], DIGIT_CANVAS, DIGIT_CANVAS)
        out[idx] = _crop(digits[pick], theta)
    photos = photo_tensors()
    for p in range(len(PHOTO_SOURCES)):
        idx = torch.nonzero(src == len(DIGIT_SOURCES) + p).reshape(-1)
        if len(idx):
            img = photos[p]
            theta = _window_theta(cx[idx], cy[idx], size[idx], img.shape[1], img.shape[2])
            out[idx] = _crop(img.unsqueeze(0).expand(len(idx), -1, -1, -1), theta)
    t = torch.tensor([c.sepia for c in captions], dtype=torch.float32)
    out = sepia(out.clamp(0, 1), t)
    return out * 2.0 - 1.0, torch.stack([cx, cy, size], dim=1)


def to_pil(latents, scale: int = 4) -> list[Image.Image]:
    """Latents [N, 3, 16, 16] in [-1, 1] (tensor or array) -> list of RGB PIL images, upscaled (nearest)."""
    x = np.asarray(latents, dtype=np.float32).reshape(-1, *LATENT_SHAPE).transpose(0, 2, 3, 1)
    arr = ((np.clip(x, -1, 1) + 1.0) * 127.5).round().astype(np.uint8)
    return [Image.fromarray(a, mode="RGB").resize((IMAGE_SIZE * scale, IMAGE_SIZE * scale), Image.NEAREST) for a in arr]
