"""Test bootstrap: import the real ComfyUI (never a mock) and build tiny real models in-process."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

PACK_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PACK_DIR))

from kb_tools.comfy.env import find_comfyui  # noqa: E402

COMFYUI_ROOT = find_comfyui()


def _configure_comfy() -> None:
    """Point ComfyUI at the CPU (unless REDI_TEST_DEVICE=gpu) before model_management loads."""
    sys.path.insert(0, str(COMFYUI_ROOT))
    from comfy.cli_args import args

    if os.environ.get("REDI_TEST_DEVICE", "cpu") == "cpu":
        args.cpu = True
        # On CPU plain PyTorch attention is faster than the default sub-quadratic one.
        args.use_pytorch_cross_attention = True
    # ComfyUI's own `nodes` module and this pack's `nodes/` package share a name; bind the
    # name to ComfyUI's module now, while ComfyUI's root is first on sys.path, so a later
    # `import nodes` in a test never picks up the pack folder.
    import nodes  # noqa: F401


if COMFYUI_ROOT is not None:
    _configure_comfy()


def pytest_collection_modifyitems(config, items):
    if COMFYUI_ROOT is not None:
        return
    skip = pytest.mark.skip(reason="ComfyUI not found: run the suite with `bash scripts/test.sh`, which provides it")
    for item in items:
        if "comfy" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def comfy_root() -> Path:
    if COMFYUI_ROOT is None:
        pytest.skip("ComfyUI not found: run the suite with `bash scripts/test.sh`")
    return COMFYUI_ROOT


PACK_MODULE = "redi_pack"


def load_pack():
    """Import this pack as a package (as ComfyUI does), so `nodes` and its relative imports load."""
    import importlib.util

    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    spec = importlib.util.spec_from_file_location(PACK_MODULE, PACK_DIR / "__init__.py", submodule_search_locations=[str(PACK_DIR)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def pack(comfy_root):
    """The pack imported the way ComfyUI imports it (package `redi_pack`)."""
    return load_pack()
