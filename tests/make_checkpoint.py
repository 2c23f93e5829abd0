"""A small but real SD1.5-format checkpoint for the end-to-end tests (no weights can be downloaded).

`CheckpointLoaderSimple` only loads configurations it recognises, so the checkpoint keeps
SD1.5's channel width and context size but a single level of UNet blocks
(model_channels 320, channel_mult [1], one res block, one transformer block, context 768),
next to a full-size CLIP-L text model (768 wide, 12 layers) and the SD VAE. Weights are
random (seeded, finite, small: normal * 0.02, norm weights 1, biases 0), stored in fp16:
about 465 MB. Every module is built from ComfyUI's own classes, so the key names and shapes
are the ones ComfyUI's loader expects.

The file is written once and cached under $REDI_CACHE_DIR/test-ckpt/ (default
~/.cache/comfyui-redi/test-ckpt/), keyed by CHECKPOINT_VERSION; bump it when the contents change.

    python tests/make_checkpoint.py [OUT.safetensors]   (inside scripts/env.sh's environment)
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

CHECKPOINT_VERSION = "sd15-shallow-v1"
SEED = 20240601

UNET_CONFIG = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [1],
    "channel_mult": [1],
    "transformer_depth": [1],
    "transformer_depth_output": [1, 1],
    "transformer_depth_middle": 1,
    "context_dim": 768,
    "num_heads": 8,
    "num_head_channels": -1,
    "use_linear_in_transformer": False,
    "use_spatial_transformer": True,
    "adm_in_channels": None,
    "use_temporal_attention": False,
    "use_checkpoint": False,
    "dims": 2,
}

# Stable Diffusion's VAE (comfy.sd.VAE uses the same when it meets SD VAE keys).
VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def cache_dir() -> Path:
    base = os.environ.get("REDI_CACHE_DIR")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "comfyui-redi"
    return root / "test-ckpt"


def cached_checkpoint_path() -> Path:
    return cache_dir() / f"{CHECKPOINT_VERSION}.safetensors"


def _ensure_comfy_importable() -> None:
    try:
        import comfy  # noqa: F401
        return
    except ImportError:
        pass
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from kb_tools.comfy.env import ensure_comfyui

    ensure_comfyui()
    from comfy.cli_args import args

    args.cpu = True


def _random_state_dict(module, generator, prefix: str) -> dict:
    """State dict of `module` with small seeded random weights, in fp16, under `prefix`."""
    import torch

    norm_types = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    norm_params = set()
    for name, sub in module.named_modules():
        if isinstance(sub, norm_types):
            for pname, _ in sub.named_parameters(recurse=False):
                norm_params.add(f"{name}.{pname}" if name else pname)
    out = {}
    for name, tensor in module.state_dict().items():
        # Iterate in state-dict order: the order is fixed, so the weights are reproducible.
        if name in norm_params and name.endswith("weight"):
            value = torch.ones(tensor.shape)
        elif tensor.ndim <= 1:
            value = torch.zeros(tensor.shape)
        else:
            value = torch.randn(tensor.shape, generator=generator) * 0.02
        out[prefix + name] = value.to(torch.float16).contiguous()
    return out


def build_state_dict() -> dict:
    """The checkpoint's tensors: UNet, CLIP-L text model and SD VAE, with ComfyUI's key names."""
    _ensure_comfy_importable()
    import torch

    import comfy.ops
    import comfy.sd1_clip
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    generator = torch.Generator().manual_seed(SEED)
    sd: dict = {}
    with torch.no_grad():
        unet = UNetModel(**UNET_CONFIG, device="cpu", operations=comfy.ops.disable_weight_init)
        sd.update(_random_state_dict(unet, generator, "model.diffusion_model."))
        del unet

        clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
        clip_sd = _random_state_dict(clip.transformer, generator, "cond_stage_model.transformer.")
        # An SD1.5 checkpoint has no text projection or logit scale (see SD15.process_clip_state_dict_for_saving).
        for key in [k for k in clip_sd if k.endswith(("text_projection.weight", "logit_scale"))]:
            del clip_sd[key]
        sd.update(clip_sd)
        del clip

        vae = AutoencoderKL(ddconfig=VAE_DDCONFIG, embed_dim=4)
        sd.update(_random_state_dict(vae, generator, "first_stage_model."))
        del vae
    return sd


def write_checkpoint(path: Path) -> Path:
    """Write the checkpoint to `path` atomically (temporary file, then os.replace)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(build_state_dict(), str(tmp), metadata={"redi_test_checkpoint": CHECKPOINT_VERSION})
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def make_sd15_checkpoint(path: str | os.PathLike | None = None) -> Path:
    """Return a path holding the test checkpoint, building the cached copy on first use.

    With `path`, the cached file is linked (or copied) there as well.
    """
    cached = cached_checkpoint_path()
    if not cached.is_file():
        write_checkpoint(cached)
    if path is None:
        return cached
    path = Path(path)
    if path.resolve() != cached.resolve():
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink() or path.exists():
            path.unlink()
        try:
            path.symlink_to(cached)
        except OSError:
            import shutil

            shutil.copyfile(cached, path)
    return path


def check_checkpoint(path: str | os.PathLike) -> dict:
    """Load with ComfyUI's checkpoint loader and decode one 64x64 image; return a few facts.

    Raises AssertionError when the model, CLIP or VAE is missing or the pixels are not finite.
    """
    _ensure_comfy_importable()
    import torch

    import comfy.sd

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
    assert model is not None and clip is not None and vae is not None, (model, clip, vae)
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photograph of a cat"))
    assert torch.isfinite(cond[0][0]).all(), "CLIP output is not finite"
    latent = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    pixels = vae.decode(latent)
    assert tuple(pixels.shape[-3:]) == (64, 64, 3), pixels.shape
    assert torch.isfinite(pixels).all(), "decoded pixels are not finite"
    return {"model": type(model.model).__name__, "model_config": type(model.model.model_config).__name__,
            "cond_shape": tuple(cond[0][0].shape), "pixels_shape": tuple(pixels.shape)}


if __name__ == "__main__":
    out = make_sd15_checkpoint(sys.argv[1] if len(sys.argv) > 1 else None)
    print(out, check_checkpoint(out))
