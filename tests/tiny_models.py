"""Tiny real ComfyUI models, built in-process, for tests.

They are ComfyUI's own UNet (`comfy.model_base.BaseModel` on an SD1.5-style config), small
enough to sample an 8x8 latent in a fraction of a second on a CPU. Weights are initialised
deterministically from a seed, because `comfy.ops` leaves them as `torch.empty`.
"""
from __future__ import annotations

import hashlib

import torch

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models

CONTEXT_DIM = 64
CONTEXT_TOKENS = 4


def _init_weights(module: torch.nn.Module, seed: int) -> None:
    """Give every layer deterministic small random weights (ComfyUI's ops skip init)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                if sub.weight is not None:
                    sub.weight.fill_(1.0)
                    sub.bias.zero_()
                continue
            for p in sub.parameters(recurse=False):
                if p.ndim == 1:
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)


def tiny_unet_config(model_channels: int = 32, channel_mult=(1, 2), context_dim: int = CONTEXT_DIM, in_channels: int = 4) -> dict:
    depth = len(channel_mult)
    return {
        "model_channels": model_channels,
        "in_channels": in_channels,
        "out_channels": in_channels,
        "num_res_blocks": [1] * depth,
        "channel_mult": list(channel_mult),
        "transformer_depth": [1] * depth,
        "transformer_depth_output": [1] * (depth * 2),
        "transformer_depth_middle": 1,
        "context_dim": context_dim,
        "use_linear_in_transformer": False,
        "adm_in_channels": None,
        "use_temporal_attention": False,
        "use_spatial_transformer": True,
        "num_heads": 2,
        "num_head_channels": -1,
        "image_size": 32,
        "use_checkpoint": False,
        "dims": 2,
    }


def make_tiny_model(seed: int = 0, model_type: str = "EPS", model_channels: int = 32, channel_mult=(1, 2),
                    context_dim: int = CONTEXT_DIM, in_channels: int = 4):
    """A real ComfyUI ModelPatcher around a tiny SD1.5-style UNet.

    model_type: "EPS", "V_PREDICTION" or "FLOW" (same network, different prediction
    target and noise schedule), to exercise the three latent-scaling conventions.
    """
    config = comfy.supported_models.SD15(tiny_unet_config(model_channels, channel_mult, context_dim, in_channels))
    config.unet_config = tiny_unet_config(model_channels, channel_mult, context_dim, in_channels)
    mtype = getattr(comfy.model_base.ModelType, model_type)
    if mtype == comfy.model_base.ModelType.FLOW:
        config.sampling_settings = {"shift": 3.0, "multiplier": 1000}
    model = comfy.model_base.BaseModel(config, model_type=mtype, device="cpu")
    _init_weights(model.diffusion_model, seed)
    model.diffusion_model.to(torch.float32)
    model.manual_cast_dtype = None
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


def prompt_cond(prompt: str, context_dim: int = CONTEXT_DIM, scale: float = 1.0) -> list:
    """CONDITIONING for a prompt: a deterministic pseudo-embedding derived from its text."""
    seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")
    gen = torch.Generator().manual_seed(seed)
    context = torch.randn((1, CONTEXT_TOKENS, context_dim), generator=gen) * scale
    return [[context, {}]]


def empty_latent(batch: int = 1, size: int = 8, channels: int = 4) -> torch.Tensor:
    return torch.zeros((batch, channels, size, size))
