"""Two toy class-conditional diffusion models on 16x16 handwritten digits, as real ComfyUI models.

The pack's "embedded default": no pretrained weights can be downloaded on the machines this
pack is developed on, so a large and a small model are trained here on CPU
(`python -m embedded.train`) and shipped in `embedded/weights/`. They are ComfyUI's own UNet
(`comfy.model_base.BaseModel`, SD1.5-style config, v-prediction, ComfyUI's discrete SD
schedule), so they run through exactly the sampling code the nodes use. They are toys for
demos, tests and benchmarks, not image generators.

- Data: scikit-learn's digits (1797 images, 8x8, values 0..16), upsampled to 16x16
  (bilinear) and scaled to [-1, 1], one channel. The latent IS the image (no VAE), in a
  latent format with one channel and scale factor 1.0.
- Text: a "prompt" is "digit N" (N in 0..9) or "" (the unconditional prompt for CFG). The
  text encoder is a learned table: context = [class embedding, 3 learned positional tokens]
  -> CONDITIONING [[tensor[1, 4, 64], {}]]. Both models share the large model's table (as
  SD1.x models share CLIP-L), so one `encode` feeds both.

This module imports ComfyUI only inside functions: constants and `parse_prompt` work without it.
"""
from __future__ import annotations

import functools
import os
import re
import sys
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHT_FILES = {"large": WEIGHTS_DIR / "digits_large.safetensors", "small": WEIGHTS_DIR / "digits_small.safetensors"}

IMAGE_SIZE = 16
CHANNELS = 1
LATENT_SHAPE = (CHANNELS, IMAGE_SIZE, IMAGE_SIZE)
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # row of the embedding table used for the empty prompt
CONTEXT_DIM = 64
CONTEXT_TOKENS = 4  # class embedding + 3 learned positional tokens
MODEL_CHANNELS = {"large": 64, "small": 32}
TEXT_KEYS = ("text.class_embedding", "text.positional")
#: fixed split of the 1797 digits: the first TRAIN_COUNT of a seeded permutation train the
#: diffusion models and the judge classifier, the rest are held out.
SPLIT_SEED = 0
TRAIN_COUNT = 1437

_PROMPT_RE = re.compile(r"^\s*(?:digit\s+)?([0-9])\s*$", re.IGNORECASE)


class PromptError(ValueError):
    """A prompt the toy text encoder cannot read."""


def parse_prompt(prompt: str) -> int:
    """Class index of a prompt: "digit 3" (or just "3") -> 3, "" -> NULL_CLASS (unconditional)."""
    if not isinstance(prompt, str):
        raise PromptError(f"prompt must be a string, got {type(prompt).__name__}.")
    if not prompt.strip():
        return NULL_CLASS
    m = _PROMPT_RE.match(prompt)
    if m is None:
        raise PromptError(
            f"the embedded digits model cannot read the prompt {prompt!r}: it only knows 'digit 0' .. 'digit 9' "
            "(or just the number) and the empty prompt '' (unconditional). Use one of those, or a real checkpoint "
            "with its own text encoder for free text."
        )
    return int(m.group(1))


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


# --------------------------------------------------------------------------- ComfyUI bootstrap

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

    class DigitsLatent(comfy.latent_formats.LatentFormat):
        """The 16x16 image itself: one channel, scale 1.0, no preview factors."""

        scale_factor = 1.0
        latent_channels = CHANNELS
        latent_dimensions = 2

    class DigitsConfig(comfy.supported_models.SD15):
        latent_format = DigitsLatent
        memory_usage_factor = 0.1

    return DigitsLatent, DigitsConfig


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
    """A real ComfyUI ModelPatcher around the (untrained unless loaded) digits UNet."""
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


# --------------------------------------------------------------------------- text encoder

class TextEncoder:
    """prompt -> CONDITIONING, from the learned table (class_embedding [11, 64], positional [3, 64])."""

    def __init__(self, class_embedding, positional):
        self.class_embedding = class_embedding.detach().float().cpu()
        self.positional = positional.detach().float().cpu()

    def context(self, classes):
        """Context tensor [B, 4, 64] for class indices (NULL_CLASS = unconditional)."""
        import torch

        idx = torch.as_tensor(classes, dtype=torch.long).reshape(-1)
        cls = self.class_embedding[idx].unsqueeze(1)
        pos = self.positional.unsqueeze(0).expand(len(idx), -1, -1)
        return torch.cat([cls, pos], dim=1)

    def __call__(self, prompt: str) -> list:
        return [[self.context([parse_prompt(prompt)]), {}]]


# --------------------------------------------------------------------------- weights

class WeightsError(FileNotFoundError):
    """Shipped weights missing or not matching the model."""


def _train_hint(size: str) -> str:
    minutes = 10 if size == "large" else 5
    return f"python -m embedded.train --model {size} --minutes {minutes} --out {WEIGHT_FILES[size].relative_to(PACK_DIR)}"


def read_weights(size: str, path: str | Path | None = None) -> tuple[dict, dict]:
    """(tensors, metadata) of a shipped weights file, with a clear error when it is missing."""
    from safetensors import safe_open

    path = Path(path) if path is not None else WEIGHT_FILES[size]
    if not path.is_file():
        raise WeightsError(
            f"the embedded {size} digits model's weights are missing: {path} does not exist. "
            f"Restore it from git (git checkout -- {path.relative_to(PACK_DIR) if path.is_relative_to(PACK_DIR) else path}) "
            f"or train it again: {_train_hint(size)}"
        )
    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    return tensors, meta


def load_into(patcher, tensors: dict, size: str, path) -> None:
    """Load UNet weights (keys 'diffusion_model.*') strictly into a ModelPatcher's model."""
    import torch

    unet = {k[len("diffusion_model."):]: v.float() for k, v in tensors.items() if k.startswith("diffusion_model.")}
    expected = patcher.model.diffusion_model.state_dict()
    missing = sorted(set(expected) - set(unet))
    unexpected = sorted(set(unet) - set(expected))
    bad_shape = sorted(k for k in set(unet) & set(expected) if tuple(unet[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or bad_shape:
        raise WeightsError(
            f"{path} does not match the embedded {size} model: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}, {len(bad_shape)} of another shape {bad_shape[:3]}. "
            f"Retrain it: {_train_hint(size)}"
        )
    with torch.no_grad():
        patcher.model.diffusion_model.load_state_dict(unet, strict=True)


def load_models(large_path=None, small_path=None):
    """(large ModelPatcher, small ModelPatcher, encode) built from ComfyUI and the shipped weights."""
    large_t, _ = read_weights("large", large_path)
    small_t, _ = read_weights("small", small_path)
    missing = [k for k in TEXT_KEYS if k not in large_t]
    if missing:
        raise WeightsError(f"{large_path or WEIGHT_FILES['large']} has no text table {missing}; retrain it: {_train_hint('large')}")
    large = build_model("large", init=False)
    load_into(large, large_t, "large", large_path or WEIGHT_FILES["large"])
    small = build_model("small", init=False)
    load_into(small, small_t, "small", small_path or WEIGHT_FILES["small"])
    encode = TextEncoder(large_t["text.class_embedding"], large_t["text.positional"])
    return large, small, encode


# --------------------------------------------------------------------------- data and judge

@functools.lru_cache(maxsize=None)
def _digits_split():
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(d.target))
    return d.images.astype(np.float32)[perm], d.target.astype(np.int64)[perm]


def digits_8x8(split: str = "train"):
    """(images [N, 8, 8] in 0..16, labels [N]) of the fixed train / test split."""
    images, labels = _digits_split()
    if split == "train":
        return images[:TRAIN_COUNT], labels[:TRAIN_COUNT]
    if split == "test":
        return images[TRAIN_COUNT:], labels[TRAIN_COUNT:]
    raise ValueError(f"split must be 'train' or 'test', got {split!r}.")


def to_model_space(images_8x8):
    """8x8 images in 0..16 -> tensor [N, 1, 16, 16] in [-1, 1] (bilinear upsampling)."""
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(images_8x8, dtype=torch.float32).unsqueeze(1) / 16.0 * 2.0 - 1.0
    return F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False).clamp(-1, 1)


def to_judge_space(latents):
    """Latents [N, 1, 16, 16] in [-1, 1] -> flat 8x8 features in 0..16 (2x2 average pooling)."""
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(latents, dtype=torch.float32).reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
    x = F.avg_pool2d(x.clamp(-1, 1), 2)
    return ((x + 1.0) / 2.0 * 16.0).reshape(len(x), -1).numpy()


@functools.lru_cache(maxsize=None)
def judge():
    """The held-out quality judge: LogisticRegression on the 8x8 digits train split."""
    from sklearn.linear_model import LogisticRegression

    images, labels = digits_8x8("train")
    x = to_judge_space(to_model_space(images))
    return LogisticRegression(max_iter=2000, C=0.5).fit(x, labels)


def classify(latents):
    """Predicted digit for each latent [N, 1, 16, 16]."""
    return judge().predict(to_judge_space(latents))


def to_pil(latents, scale: int = 4):
    """Latents [N, 1, 16, 16] -> list of grayscale PIL images (white digit on black), upscaled."""
    import numpy as np
    from PIL import Image

    x = np.asarray(latents, dtype=np.float32).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    arr = ((np.clip(x, -1, 1) + 1.0) * 127.5).round().astype(np.uint8)
    return [Image.fromarray(a, mode="L").resize((IMAGE_SIZE * scale, IMAGE_SIZE * scale), Image.NEAREST) for a in arr]
