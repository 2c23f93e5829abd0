"""Finds the ComfyUI that the offline command and the tests run on.

Order: an already importable `comfy` (we run inside ComfyUI), $COMFYUI_PATH, the ComfyUI
root two levels above this pack (ComfyUI/custom_nodes/<pack>).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from .errors import KBError

PACK_DIR = Path(__file__).resolve().parent.parent


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
