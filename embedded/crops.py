"""Two toy caption-conditional diffusion models on 16x16 colour crops, as real ComfyUI models.

The pack's "embedded default": no pretrained weights can be downloaded on the machines this
pack is developed on, so a large and a small model are trained here on CPU
(`python -m embedded.train`) and shipped in `embedded/weights/`. They are ComfyUI's own UNet
(`comfy.model_base.BaseModel`, SD1.5-style config, v-prediction, ComfyUI's discrete SD
schedule), so they run through exactly the sampling code the nodes use. They are toys for
demos, tests and benchmarks, not image generators.

- Data ("crops"): square crops, at a position and size given by the caption, of 8
  photographs that scikit-image and scikit-learn ship (astronaut, cat, coffee, rocket,
  galaxy, coins, temple, flower) and of scikit-learn's handwritten digits (one "source" per
  digit class, many handwritings each), rendered to 16x16 RGB in [-1, 1], optionally
  sepia-toned (the style axis). The latent IS the image (no VAE): 3 channels, scale 1.0.
- Captions: "<source> at <cx> <cy> size <z> [sepia <t>]", for example
  "cat at 0.40 0.62 size 0.35 sepia 0.80" or "digit 7 at 0.5 0.5 size 0.8"; cx, cy in [0, 1]
  place the crop window inside the picture, z is its side as a fraction of the picture's
  shorter side, t in [0, 1] the strength of the sepia tone. The rendered crop jitters
  around the caption's geometry (captions are imprecise), and a digit caption leaves the
  handwriting open: a caption fixes the content, the seed picks one of many images.
- Text encoder: a fixed function (no learned weights, like a frozen CLIP shared by both
  models): context [B, 4, 64] = [source token, geometry token, style token, constant token]
  built from fixed random embeddings and Fourier features; "" is the unconditional prompt.
- Train / held-out captions: `sample_captions(n, "train" | "heldout")` draws from the same
  distribution with different seeds (as COCO train / val captions); the digits behind the
  real reference images are split too (train digits train the models and the judge).
- Judge: a small CNN trained on rendered real crops (`python -m embedded.train --judge`):
  source class, geometry and sepia strength from an image; its 128-d hidden layer is the
  feature space of the benchmark's Frechet distance.

This module imports ComfyUI only inside functions: constants, captions and rendering work without it.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
import re
import sys
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHT_FILES = {
    "large": WEIGHTS_DIR / "crops_large.safetensors",
    "small": WEIGHTS_DIR / "crops_small.safetensors",
    "judge": WEIGHTS_DIR / "crops_judge.safetensors",
}

IMAGE_SIZE = 16
CHANNELS = 3
LATENT_SHAPE = (CHANNELS, IMAGE_SIZE, IMAGE_SIZE)
CONTEXT_DIM = 64
CONTEXT_TOKENS = 4
MODEL_CHANNELS = {"large": 64, "small": 32}

#: (caption name, package, file inside the package): photographs shipped by scikit-image / scikit-learn.
PHOTOS = (
    ("astronaut", "skimage", "data/astronaut.png"),
    ("cat", "skimage", "data/chelsea.png"),
    ("coffee", "skimage", "data/coffee.png"),
    ("rocket", "skimage", "data/rocket.jpg"),
    ("galaxy", "skimage", "data/hubble_deep_field.jpg"),
    ("coins", "skimage", "data/coins.png"),
    ("temple", "sklearn", "datasets/images/china.jpg"),
    ("flower", "sklearn", "datasets/images/flower.jpg"),
)
DIGIT_SOURCES = tuple(f"digit {d}" for d in range(10))
SOURCES = DIGIT_SOURCES + tuple(name for name, _, _ in PHOTOS)
NUM_SOURCES = len(SOURCES)
PHOTO_SHORT_SIDE = 128      # photographs are resized so their shorter side has this many pixels
DIGIT_CANVAS = 32           # 8x8 digits are upsampled to this size before cropping
SIZE_RANGE = {"photo": (0.15, 1.0), "digit": (0.5, 1.0)}
JITTER_POSITION = 0.03      # sd of the rendered crop centre around the caption's (cx, cy)
JITTER_LOG_SIZE = 0.05      # sd of log(size) around the caption's size
SPLIT_SEEDS = {"train": 1, "heldout": 2}
DIGIT_SPLIT_SEED = 0
DIGIT_TRAIN_COUNT = 1437    # of scikit-learn's 1797 digits; the rest are held out

_CAPTION_RE = re.compile(
    r"^\s*(?P<source>digit\s+[0-9]|[a-z]+)"
    r"(?:\s+at\s+(?P<cx>[0-9]*\.?[0-9]+)\s+(?P<cy>[0-9]*\.?[0-9]+))?"
    r"(?:\s+size\s+(?P<z>[0-9]*\.?[0-9]+))?"
    r"(?:\s+sepia\s+(?P<t>[0-9]*\.?[0-9]+))?\s*$",
    re.IGNORECASE,
)


class PromptError(ValueError):
    """A prompt the toy text encoder cannot read."""


class DataError(FileNotFoundError):
    """The photographs the crops are rendered from are not installed."""


@dataclasses.dataclass(frozen=True)
class Caption:
    """What a caption asks for: a source picture, a crop window (cx, cy in [0, 1], size z) and a sepia strength."""

    source: int
    cx: float = 0.5
    cy: float = 0.5
    size: float = 1.0
    sepia: float = 0.0

    @property
    def is_digit(self) -> bool:
        return self.source < len(DIGIT_SOURCES)

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
    kind = "digit" if idx < len(DIGIT_SOURCES) else "photo"
    values = {k: float(m.group(k)) for k in ("cx", "cy", "z", "t") if m.group(k) is not None}
    for key, label in (("cx", "cx"), ("cy", "cy"), ("t", "sepia")):
        if not 0.0 <= values.get(key, 0.0) <= 1.0:
            raise PromptError(f"{label} must be in [0, 1] in {prompt!r}, got {values[key]}.")
    lo, hi = SIZE_RANGE[kind]
    z = values.get("z", 1.0)
    if not lo <= z <= hi:
        raise PromptError(f"size must be in [{lo}, {hi}] for a {kind} source in {prompt!r}, got {z}.")
    return Caption(idx, values.get("cx", 0.5), values.get("cy", 0.5), z, values.get("t", 0.0))


def sample_captions(n: int, split: str, *, sepia: str = "mixed", offset: int = 0) -> list[Caption]:
    """n captions of the train or held-out split (same distribution, disjoint draws).

    Sources uniform; photo size log-uniform in SIZE_RANGE; sepia "mixed" (0 half the time,
    else uniform), "none" (0) or "full" (1).
    """
    import numpy as np

    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {list(SPLIT_SEEDS)}, got {split!r}.")
    out = []
    for i in range(offset, offset + n):
        rng = np.random.default_rng([SPLIT_SEEDS[split], i])
        src = int(rng.integers(NUM_SOURCES))
        lo, hi = SIZE_RANGE["digit" if src < len(DIGIT_SOURCES) else "photo"]
        size = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        t = float(rng.uniform()) if rng.uniform() < 0.5 else 0.0
        t = {"mixed": t, "none": 0.0, "full": 1.0}[sepia]
        cap = Caption(src, round(float(rng.uniform()), 2), round(float(rng.uniform()), 2), round(size, 2), round(t, 2))
        out.append(cap)
    return out


# --------------------------------------------------------------------------- the text encoder (fixed)

@functools.lru_cache(maxsize=None)
def _encoder_tables():
    import torch

    gen = torch.Generator().manual_seed(1234)
    sources = torch.randn(NUM_SOURCES, CONTEXT_DIM, generator=gen)
    geometry = torch.randn(3 * 2 * 6 + 3, CONTEXT_DIM, generator=gen) / math.sqrt(3 * 2 * 6 + 3)
    style = torch.randn(2 * 6 + 2, CONTEXT_DIM, generator=gen) / math.sqrt(2 * 6 + 2)
    constant = torch.randn(CONTEXT_DIM, generator=gen)
    return sources, geometry, style, constant


def _fourier(values, freqs: int = 6):
    """[N, D] -> [N, D * 2 * freqs] sin / cos features at frequencies pi * 2^j."""
    import torch

    f = math.pi * (2.0 ** torch.arange(freqs, dtype=torch.float32))
    ang = values.unsqueeze(-1) * f
    return torch.cat([ang.sin(), ang.cos()], dim=-1).reshape(len(values), -1)


def context(captions) -> "torch.Tensor":  # noqa: F821
    """Context [B, 4, 64] for captions (None = unconditional: only the constant token is non-zero)."""
    import torch

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


def condition_embedding(prompts) -> "np.ndarray":  # noqa: F821
    """Flattened contexts [N, 256] (the condition-embedding key, CLIP / NIRVANA style)."""
    return context([parse_prompt(p) for p in prompts]).reshape(len(prompts), -1).numpy()


# --------------------------------------------------------------------------- data: rendering crops

def _package_file(package: str, rel: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = {"skimage": "scikit-image", "sklearn": "scikit-learn"}[package]
        raise DataError(f"the crops data needs the photographs that ship inside the {dist} package, which this Python "
                          f"does not have: add {dist} to the environment (scripts/requirements-test.txt pins it) or run "
                          "through scripts/env.sh, whose environment has it.")
    return Path(spec.submodule_search_locations[0]) / rel


@functools.lru_cache(maxsize=None)
def photo_tensors() -> tuple:
    """The photographs as float tensors [3, H, W] in [0, 1], shorter side PHOTO_SHORT_SIDE."""
    import numpy as np
    import torch
    from PIL import Image

    out = []
    for _, package, rel in PHOTOS:
        im = Image.open(_package_file(package, rel)).convert("RGB")
        scale = PHOTO_SHORT_SIDE / min(im.size)
        im = im.resize((round(im.size[0] * scale), round(im.size[1] * scale)), Image.LANCZOS)
        out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous())
    return tuple(out)


@functools.lru_cache(maxsize=None)
def digit_canvases(split: str = "train") -> tuple:
    """(canvases [N, 3, 32, 32] in [0, 1], labels [N]) of scikit-learn's digits, fixed train / held-out split."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}.")
    d = load_digits()
    perm = np.random.default_rng(DIGIT_SPLIT_SEED).permutation(len(d.target))
    sel = perm[:DIGIT_TRAIN_COUNT] if split == "train" else perm[DIGIT_TRAIN_COUNT:]
    x = torch.from_numpy(d.images[sel].astype(np.float32) / 16.0).unsqueeze(1)
    x = F.interpolate(x, size=(DIGIT_CANVAS, DIGIT_CANVAS), mode="bilinear", align_corners=False).clamp(0, 1)
    return x.expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(d.target[sel].astype(np.int64))


def _window_theta(cx, cy, size, height: int, width: int):
    """Affine grid_sample matrices [N, 2, 3] of square windows (cx, cy in [0, 1] within the valid range)."""
    import torch

    side = size * min(height, width)
    hx, hy = side / width, side / height
    theta = torch.zeros(len(cx), 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = hx, hy
    theta[:, 0, 2] = (hx - 1.0) + cx * (2.0 - 2.0 * hx)
    theta[:, 1, 2] = (hy - 1.0) + cy * (2.0 - 2.0 * hy)
    return theta


def _crop(images, theta):
    """Crops [N, 3, 16, 16] of images [N, 3, H, W] (4x supersampled, then averaged: no aliasing)."""
    import torch.nn.functional as F

    grid = F.affine_grid(theta, (len(theta), 3, 4 * IMAGE_SIZE, 4 * IMAGE_SIZE), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return F.avg_pool2d(out, 4)


def sepia(images, strength):
    """Sepia-tone images [N, 3, H, W] in [0, 1] by strength [N] in [0, 1] (the style axis)."""
    import torch

    m = torch.tensor([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]])
    toned = torch.einsum("ij,njhw->nihw", m, images).clamp(0, 1)
    s = strength.reshape(-1, 1, 1, 1)
    return (1 - s) * images + s * toned


def render(captions, gen, split: str = "train", jitter: bool = True):
    """Real images for captions: (images [N, 3, 16, 16] in [-1, 1], actual geometry [N, 3] (cx, cy, size)).

    Digit captions draw a handwriting of their class from the split's digits with `gen`.
    """
    import torch

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
    for p in range(len(PHOTOS)):
        idx = torch.nonzero(src == len(DIGIT_SOURCES) + p).reshape(-1)
        if len(idx):
            img = photos[p]
            theta = _window_theta(cx[idx], cy[idx], size[idx], img.shape[1], img.shape[2])
            out[idx] = _crop(img.unsqueeze(0).expand(len(idx), -1, -1, -1), theta)
    t = torch.tensor([c.sepia for c in captions], dtype=torch.float32)
    out = sepia(out.clamp(0, 1), t)
    return out * 2.0 - 1.0, torch.stack([cx, cy, size], dim=1)


def random_training_captions(n: int, gen, drop: float = 0.0) -> list:
    """Fresh captions from the training distribution (continuous, not rounded); None with prob `drop`."""
    import torch

    out = []
    u = torch.rand(n, 6, generator=gen)
    src = torch.randint(NUM_SOURCES, (n,), generator=gen)
    for i in range(n):
        s = int(src[i])
        lo, hi = SIZE_RANGE["digit" if s < len(DIGIT_SOURCES) else "photo"]
        size = math.exp(math.log(lo) + float(u[i, 2]) * (math.log(hi) - math.log(lo)))
        t = float(u[i, 4]) if float(u[i, 3]) < 0.5 else 0.0
        cap = Caption(s, float(u[i, 0]), float(u[i, 1]), size, t)
        out.append(None if float(u[i, 5]) < drop else cap)
    return out


# --------------------------------------------------------------------------- ComfyUI models

def unet_config(size: str) -> dict:
    """SD1.5-style UNet config of the large (64 channels) or small (32 channels) model."""
    if size not in MODEL_CHANNELS:
        raise ValueError(f"model size must be one of {list(MODEL_CHANNELS)}, got {size!r}.")
    return {
        "model_channels": MODEL_CHANNELS[size],
        "in_channels": CHANNELS,
        "out_channels": CHANNELS,
        "num_res_blocks": [1, 1],
        "channel_mult": [1, 2],
        "transformer_depth": [1, 1],
        "transformer_depth_output": [1, 1, 1, 1],
        "transformer_depth_middle": 1,
        "context_dim": CONTEXT_DIM,
        "use_linear_in_transformer": False,
        "adm_in_channels": None,
        "use_temporal_attention": False,
        "use_spatial_transformer": True,
        "num_heads": 2,
        "num_head_channels": -1,
        "image_size": IMAGE_SIZE,
        "use_checkpoint": False,
        "dims": 2,
    }


def setup_comfy(threads: int | None = 2) -> Path:
    """Make ComfyUI importable and configure it for this machine before model_management loads.

    CPU unless CUDA is available; PyTorch attention (faster on CPU than the sub-quadratic
    default). Inside a running ComfyUI (or after the test bootstrap) this changes nothing.
    """
    if str(PACK_DIR) not in sys.path:
        sys.path.insert(0, str(PACK_DIR))
    from kb_tools.comfy_env import ensure_comfyui

    root = ensure_comfyui()
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    if "comfy.model_management" not in sys.modules:
        from comfy.cli_args import args

        if not torch.cuda.is_available() or os.environ.get("REDI_DEVICE", "") == "cpu":
            args.cpu = True
        args.use_pytorch_cross_attention = True
    return root


@functools.lru_cache(maxsize=None)
def _classes():
    """The ComfyUI latent format and model config classes (built on first use, after setup)."""
    import comfy.latent_formats
    import comfy.supported_models

    class CropsLatent(comfy.latent_formats.LatentFormat):
        """The 16x16 RGB image itself in [-1, 1]: 3 channels, scale 1.0; previews show it as is."""

        scale_factor = 1.0
        latent_channels = CHANNELS
        latent_dimensions = 2
        latent_rgb_factors = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]

    class CropsConfig(comfy.supported_models.SD15):
        latent_format = CropsLatent
        memory_usage_factor = 0.1

    return CropsLatent, CropsConfig


def init_weights(module, seed: int = 0) -> None:
    """Plain PyTorch initialisation (ComfyUI's ops skip it and leave torch.empty garbage)."""
    import torch

    torch.manual_seed(seed)
    kinds = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv1d, torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for sub in module.modules():
            for kind in kinds:
                if isinstance(sub, kind):
                    kind.reset_parameters(sub)
                    break
        # Start as a zero predictor (a common diffusion UNet choice): the last conv outputs 0.
        last = module.out[-1]
        last.weight.zero_()
        if last.bias is not None:
            last.bias.zero_()


def build_model(size: str, *, seed: int = 0, init: bool = True):
    """A real ComfyUI ModelPatcher around the (untrained unless loaded) crops UNet."""
    import torch

    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher

    _, config_cls = _classes()
    config = config_cls(unet_config(size))
    config.unet_config = unet_config(size)  # SD15 adds num_heads 8; ours has 2
    model = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.V_PREDICTION, device="cpu")
    model.diffusion_model.to(torch.float32)
    model.manual_cast_dtype = None
    if init:
        init_weights(model.diffusion_model, seed)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


# --------------------------------------------------------------------------- weights

class WeightsError(FileNotFoundError):
    """Shipped weights missing or not matching the model."""


def train_hint(what: str) -> str:
    flag = "--judge" if what == "judge" else f"--model {what}"
    return f"python -m embedded.train {flag} --out {WEIGHT_FILES[what].relative_to(PACK_DIR)}"


def read_weights(what: str, path: str | Path | None = None) -> tuple[dict, dict]:
    """(tensors, metadata) of a shipped weights file, with a clear error when it is missing."""
    from safetensors import safe_open

    path = Path(path) if path is not None else WEIGHT_FILES[what]
    if not path.is_file():
        shown = path.relative_to(PACK_DIR) if path.is_relative_to(PACK_DIR) else path
        raise WeightsError(
            f"the embedded crops {what} weights are missing: {path} does not exist. "
            f"Restore it from git (git checkout -- {shown}) or train it again: {train_hint(what)}"
        )
    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    return tensors, meta


def load_into(module, tensors: dict, what: str, path, prefix: str = "diffusion_model.") -> None:
    """Load weights (keys prefix + name) strictly into a module, naming what does not match."""
    import torch

    state = {k[len(prefix):]: v.float() for k, v in tensors.items() if k.startswith(prefix)}
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad_shape = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or bad_shape:
        raise WeightsError(
            f"{path} does not match the embedded crops {what}: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}, {len(bad_shape)} of another shape {bad_shape[:3]}. "
            f"Retrain it: {train_hint(what)}"
        )
    with torch.no_grad():
        module.load_state_dict(state, strict=True)


def load_model(size: str, path=None):
    """A ModelPatcher of the large or small model with the shipped (or given) weights."""
    tensors, _ = read_weights(size, path)
    patcher = build_model(size, init=False)
    load_into(patcher.model.diffusion_model, tensors, size, path or WEIGHT_FILES[size])
    return patcher


def load_models(large_path=None, small_path=None):
    """(large ModelPatcher, small ModelPatcher, encode) built from ComfyUI and the shipped weights."""
    return load_model("large", large_path), load_model("small", small_path), encode


# --------------------------------------------------------------------------- judge

def judge_net():
    """The judge CNN: image [N, 3, 16, 16] -> (features [N, 128], source logits, geometry [N, 3], sepia [N])."""
    import torch
    from torch import nn

    class JudgeNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(3, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(),
                nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GroupNorm(8, 64), nn.SiLU(),
                nn.Conv2d(64, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.SiLU(),
                nn.Conv2d(64, 96, 3, stride=2, padding=1), nn.GroupNorm(8, 96), nn.SiLU(),
                nn.Flatten(), nn.Linear(96 * 16, 128), nn.SiLU(),
            )
            self.source = nn.Linear(128, NUM_SOURCES)
            self.geometry = nn.Linear(128, 3)
            self.sepia = nn.Linear(128, 1)

        def forward(self, x):
            f = self.body(x)
            return f, self.source(f), self.geometry(f), self.sepia(f).squeeze(-1)

    torch.manual_seed(0)
    return JudgeNet()


@functools.lru_cache(maxsize=None)
def judge(path=None):
    """The trained judge (eval mode, float32)."""
    tensors, _ = read_weights("judge", path)
    net = judge_net()
    load_into(net, tensors, "judge", path or WEIGHT_FILES["judge"], prefix="judge.")
    return net.train(False)  # inference mode


def judge_outputs(latents, batch: int = 500) -> dict:
    """Judge readings of latents [N, 3, 16, 16]: features, source, geometry (cx, cy, log size), sepia (numpy)."""
    import numpy as np
    import torch

    net = judge()
    x = torch.as_tensor(np.asarray(latents, dtype=np.float32)).reshape(-1, *LATENT_SHAPE).clamp(-1, 1)
    parts = {"features": [], "source": [], "geometry": [], "sepia": []}
    with torch.no_grad():
        for i in range(0, len(x), batch):
            f, logits, geo, sep = net(x[i:i + batch])
            parts["features"].append(f.numpy())
            parts["source"].append(logits.argmax(-1).numpy())
            parts["geometry"].append(geo.numpy())
            parts["sepia"].append(sep.numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


def geometry_target(captions_or_geometry):
    """Judge geometry targets [N, 3] = (cx, cy, log size) from captions or a [N, 3] (cx, cy, size) tensor."""
    import numpy as np

    if isinstance(captions_or_geometry, (list, tuple)):
        g = np.array([[c.cx, c.cy, c.size] for c in captions_or_geometry], dtype=np.float32)
    else:
        g = np.asarray(captions_or_geometry, dtype=np.float32).copy()
    g[:, 2] = np.log(g[:, 2])
    return g


def to_pil(latents, scale: int = 4):
    """Latents [N, 3, 16, 16] in [-1, 1] -> list of RGB PIL images, upscaled (nearest)."""
    import numpy as np
    from PIL import Image

    x = np.asarray(latents, dtype=np.float32).reshape(-1, *LATENT_SHAPE).transpose(0, 2, 3, 1)
    arr = ((np.clip(x, -1, 1) + 1.0) * 127.5).round().astype(np.uint8)
    return [Image.fromarray(a, mode="RGB").resize((IMAGE_SIZE * scale, IMAGE_SIZE * scale), Image.NEAREST) for a in arr]
