"""Finds the ComfyUI that the offline command and the tests run on, and the device the offline command uses.

Order: an already importable `comfy` (we run inside ComfyUI), $COMFYUI_PATH, the ComfyUI
root two levels above this pack (ComfyUI/custom_nodes/<pack>).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path

from ..core.errors import KBError

PACK_DIR = Path(__file__).resolve().parents[2]


def _is_comfy_root(path: Path) -> bool:
    return (path / "comfy" / "samplers.py").is_file() and (path / "folder_paths.py").is_file()


def find_comfyui() -> Path | None:
    """Return the ComfyUI root to use, or None when none can be found."""
    spec = importlib.util.find_spec("comfy")
    if spec is not None and spec.submodule_search_locations:
        root = Path(list(spec.submodule_search_locations)[0]).parent
        if _is_comfy_root(root):
            return root
    env = os.environ.get("COMFYUI_PATH")
    if env:
        root = Path(env).expanduser().resolve()
        if not _is_comfy_root(root):
            raise KBError(f"COMFYUI_PATH={env} is not a ComfyUI root (no comfy/samplers.py there); point it at the folder that holds main.py.")
        return root
    above = PACK_DIR.parent.parent
    if _is_comfy_root(above):
        return above
    return None


def ensure_comfyui() -> Path:
    """Make `import comfy` work for code running outside a ComfyUI server; return the root."""
    root = find_comfyui()
    if root is None:
        raise KBError(
            "ComfyUI was not found. Set COMFYUI_PATH to your ComfyUI folder (the one with main.py), "
            "put this pack in ComfyUI/custom_nodes/, or run `source scripts/env.sh` to use the pinned test copy."
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return root


def accelerator() -> str | None:
    """The accelerator torch can use here ('cuda' also covers ROCm builds), or None for a CPU-only torch or machine."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return "xpu"
    return None


def device_choice(force_cpu: bool, found: str | None) -> tuple[bool, str]:
    """(run on the CPU?, why) for the offline command: the accelerator when there is one, `--cpu` overriding it."""
    if force_cpu:
        return True, "--cpu given"
    if found is None:
        return True, "this torch sees no CUDA, MPS or XPU device"
    return False, f"{found} available; add --cpu to use the CPU instead"


def choose_device(force_cpu: bool = False) -> str:
    """Point ComfyUI at the device a user expects before comfy.model_management loads; log one line; return the device.

    ComfyUI's model management assumes CUDA unless told `--cpu`, so on a CPU-only torch (a laptop,
    a CPU wheel) it stops with "Torch not compiled with CUDA enabled". Inside a running ComfyUI
    (model management already loaded) its own choice stands.
    """
    from comfy.cli_args import args

    use_cpu, why = device_choice(force_cpu, accelerator())
    if use_cpu and "comfy.model_management" not in sys.modules:
        args.cpu = True
    import comfy.model_management

    device = comfy.model_management.get_torch_device()
    logging.getLogger("kb_tools").info("kb_tools: running on %s (%s)", device, why)
    return str(device)
