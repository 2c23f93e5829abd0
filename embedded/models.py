"""The two embedded diffusion models as real ComfyUI models: configs, construction, initialisation, shipped weights.

No pretrained weights can be downloaded on the machines this pack is developed on, so a large
and a small caption-conditional model are trained here on CPU (`python -m embedded.train`) and
shipped in `embedded/weights/`. They are ComfyUI's own UNet (`comfy.model_base.BaseModel`,
SD1.5-style config, v-prediction, ComfyUI's discrete SD schedule), so they run through exactly
the sampling code the nodes use. They are toys for demos, tests and benchmarks, not image
generators.

ComfyUI reads its command-line settings (CPU, attention) when `comfy.model_management` is first
imported, so `setup_comfy()` runs before any ComfyUI import and this module imports ComfyUI
inside the functions that need it.
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from .rendering import CHANNELS, IMAGE_SIZE
from .text_encoder import CONTEXT_DIM, encode

PACK_DIR = Path(__file__).resolve().parent.parent
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHT_FILES = {
    "large": WEIGHTS_DIR / "crops_large.safetensors",
    "small": WEIGHTS_DIR / "crops_small.safetensors",
    "judge": WEIGHTS_DIR / "crops_judge.safetensors",
}
MODEL_CHANNELS = {"large": 64, "small": 32}


class WeightsError(FileNotFoundError):
    """Shipped weights missing or not matching the model."""


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
    from kb_tools.comfy.env import ensure_comfyui

    root = ensure_comfyui()
    if threads:
        torch.set_num_threads(int(threads))
    if "comfy.model_management" not in sys.modules:
        from comfy.cli_args import args

        if not torch.cuda.is_available() or os.environ.get("REDI_DEVICE", "") == "cpu":
            args.cpu = True
        args.use_pytorch_cross_attention = True
    return root


@functools.lru_cache(maxsize=None)
def _model_config_class():
    """ComfyUI's model config for the crops UNet, with its latent format (built on first use, after setup)."""
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

    return CropsConfig


def init_weights(module: torch.nn.Module, seed: int = 0) -> None:
    """Plain PyTorch initialisation (ComfyUI's ops skip it and leave torch.empty garbage)."""
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
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher

    config = _model_config_class()(unet_config(size))
    config.unet_config = unet_config(size)  # SD15 adds num_heads 8; ours has 2
    model = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.V_PREDICTION, device="cpu")
    model.diffusion_model.to(torch.float32)
    model.manual_cast_dtype = None
    if init:
        init_weights(model.diffusion_model, seed)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


# --------------------------------------------------------------------------- weights files

def train_hint(what: str) -> str:
    """The command that trains `what` ('large', 'small' or 'judge') again."""
    flag = "--judge" if what == "judge" else f"--model {what}"
    return f"python -m embedded.train {flag} --out {WEIGHT_FILES[what].relative_to(PACK_DIR)}"


def read_weights(what: str, path: str | Path | None = None) -> tuple[dict, dict]:
    """(tensors, metadata) of a shipped weights file, with a clear error when it is missing."""
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


def load_into(module: torch.nn.Module, tensors: dict, what: str, path, prefix: str = "diffusion_model.") -> None:
    """Load weights (keys prefix + name) strictly into a module, naming what does not match."""
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


# --------------------------------------------------------------------------- precision

def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AMX or AVX512-BF16 (Linux /proc/cpuinfo flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def _bf16_unet(apply_model, args):
    """ComfyUI unet function wrapper: evaluate the UNet under bfloat16 autocast."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return apply_model(args["input"], args["timestep"], **args["c"]).float()


def bf16_autocast(model):
    """A clone of `model` whose UNet runs under CPU bfloat16 autocast (about 2x faster with AMX / AVX512-BF16)."""
    clone = model.clone()
    clone.set_model_unet_function_wrapper(_bf16_unet)
    return clone
