"""What every node family shares: the category, the KNOWLEDGE_BASE and neighbours types, the redi_kb
model folder and the opened KBs, the common inputs and their tooltips, and the small LATENT helpers.

Every node module (knowledge_base, redi_chain, redi_sampler, custom_sampling, learning, tstitch) imports
from here (and feedback.py for what goes on the canvas); no node module imports another.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import folder_paths
import latent_preview
import torch
from comfy_api.latest import io

from ..kb_tools import WEIGHT_MODES as WEIGHT_MODE_NAMES
from ..kb_tools import (
    KBError,
    KnowledgeBase,
    check_kb_name,
    default_tolerance,
    query_seeds as kb_query_seeds,
)

log = logging.getLogger("ReDi")

CATEGORY = "sampling/ReDi"
KB_FOLDER = "redi_kb"
KnowledgeBaseType = io.Custom("REDI_KB")
# Carries a kb_tools.samplers.redi_chain.QueryNeighbours: each query and its top-H stored neighbours. The type
# string stays "REDI_NEIGHBOURS": saved UI workflows store it on every link and slot of this type.
NeighboursType = io.Custom("REDI_NEIGHBOURS")
WEIGHT_MODES = list(WEIGHT_MODE_NAMES)
FROM_KB = "from KB"
GUARD_TOOLTIP = ("Largest accepted centered residual ||q - sum w key|| / (RMS spread of the KB's keys); an item above it "
                 "continues from its own key-step latent (plain sampling). -1 = auto: the calibration stored in the KB "
                 "(python -m kb_tools calibrate), else 0.5; the run's log line says which.")
ERROR_TOLERANCE_TOOLTIP = (
    "-1 = auto: with guard also -1 and a KB calibrated with a checkpoint (python -m kb_tools calibrate ... --ckpt), an "
    "item jumps only when its output is predicted to be no worse than the plain sampler's at the same number of model "
    "evaluations; otherwise the residual guard above decides. 0 or more = the error guard with this tolerance: an item "
    "jumps only when the blend is predicted to land within this distance of the true latent, as a fraction of how much "
    "the KB's latents differ from each other at that step (e.g. 0.1 = within 10%; 0 = never jump). The prediction comes "
    "from the blend-error model the KB stores (python -m kb_tools calibrate); a KB without one is refused. Lower = "
    "safer: fewer items jump and the output stays closer to plain sampling; higher = more items jump and more steps "
    "are skipped, at more risk of a worse image.")
ADAPTIVE_SKIP_TOOLTIP = (
    "Off: every accepted item jumps to value_step. On: each item jumps as far as its own match allows, to the latest "
    "stored step up to value_step whose predicted error is within error_tolerance (a close match skips more steps, a "
    "poor one fewer or none). Needs the error guard: error_tolerance >= 0, or auto on a KB calibrated with a checkpoint.")


def error_guard_inputs() -> list[io.Input]:
    """The error guard's two optional inputs (defaults keep the residual guard and every saved workflow as it was)."""
    return [io.Float.Input("error_tolerance", default=-1.0, min=-1.0, max=100.0, step=0.01, optional=True,
                           tooltip=ERROR_TOLERANCE_TOOLTIP),
            io.Boolean.Input("adaptive_skip", default=False, optional=True, tooltip=ADAPTIVE_SKIP_TOOLTIP)]


def tolerance_of(error_tolerance: float | None, guard: float, kb, key_step: int, neighbours: int) -> float | str | None:
    """The node's error_tolerance as make_run's tolerance.

    A number >= 0: that tolerance. -1 (auto) with the guard on auto too: "plain" where the KB stores
    a plain reference for key step and H (default_tolerance), else None (the residual guard).
    A residual guard the user set (>= 0) is theirs: auto then leaves it in charge.
    """
    if error_tolerance is not None and error_tolerance >= 0:
        return float(error_tolerance)
    if guard >= 0 or key_step not in kb.stored_steps:  # a bad key step is refused by make_run, with its own message
        return None
    return default_tolerance(kb.calibration(key_step), key_step, neighbours)

# Knowledge bases live in models/redi_kb/<name>/ by default; extra_model_paths.yaml can add
# more locations under the key `redi_kb` (ComfyUI registers those before loading packs).
if KB_FOLDER not in folder_paths.folder_names_and_paths:
    folder_paths.add_model_folder_path(KB_FOLDER, os.path.join(folder_paths.models_dir, KB_FOLDER))


def refusal(*checks) -> str | bool:
    """validate_inputs' answer: the first check's KBError message, or True when every check passes."""
    try:
        for check in checks:
            check()
    except KBError as e:
        return str(e)
    return True


def kb_roots() -> list[Path]:
    return [Path(p) for p in folder_paths.get_folder_paths(KB_FOLDER)]


def list_kbs() -> list[str]:
    """Names of the knowledge bases (folders with a manifest.json) in every redi_kb location."""
    names = set()
    for root in kb_roots():
        if root.is_dir():
            names.update(d.name for d in root.iterdir() if (d / "manifest.json").is_file())
    return sorted(names)


def kb_path(name: str, for_writing: bool = False) -> Path:
    """Resolve a KB name to its folder; a new KB goes to the first redi_kb location."""
    check_kb_name(name)
    for root in kb_roots():
        if (root / name / "manifest.json").is_file():
            return root / name
    if for_writing:
        return kb_roots()[0] / name
    raise KBError(f"no knowledge base named {name!r} in {[str(r) for r in kb_roots()]}; build it with BuildKnowledgeBase or copy it there.")


_OPEN_KBS: dict[tuple, KnowledgeBase] = {}


def open_kb(path: Path) -> KnowledgeBase:
    """Open a KB once per on-disk version (manifest mtime and size), then reuse it."""
    manifest = path / "manifest.json"
    st = manifest.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in _OPEN_KBS:
        for old in [k for k in _OPEN_KBS if k[0] == str(path)]:
            del _OPEN_KBS[old]
        _OPEN_KBS[key] = KnowledgeBase.open(str(path))
    return _OPEN_KBS[key]


def carried(latent: dict, node: str, kind: type, source: str):
    """What the chain's previous node put into the LATENT, or a clear error naming the node to connect."""
    value = latent.get("redi")
    if not isinstance(value, kind):
        raise KBError(f"{node} needs the LATENT that comes out of {source}; this one carries no ReDi state. "
                      "Connect it directly: nodes in between (upscale, batch...) drop that state.")
    return value


def with_samples(latent: dict, samples: torch.Tensor, state=None) -> dict:
    out = {k: v for k, v in latent.items() if k not in ("samples", "redi", "noise_mask")}
    out["samples"] = samples
    if state is not None:
        out["redi"] = state
    return out


def kb_input() -> io.Input:
    return KnowledgeBaseType.Input("knowledge_base", tooltip="The knowledge base (from ReDiLoadKnowledgeBase or BuildKnowledgeBase).")


def common_sampling_inputs() -> list[io.Input]:
    return [
        io.Model.Input("model", tooltip="The model the knowledge base was built with (LoRAs arrive through it; a different LoRA set only warns)."),
        io.Conditioning.Input("positive", tooltip="Positive conditioning. For stylization: the content prompt here, content + style at the resume."),
        io.Conditioning.Input("negative", tooltip="Negative conditioning."),
    ]


def seed_inputs() -> list[io.Input]:
    return [
        io.Combo.Input("seed_mode", options=["kb", "custom"], default="kb",
                       tooltip="'kb': start from the knowledge base's seed (its trajectories share that noise, so neighbours are near). "
                               "'custom': use the seed below (item i gets seed + i); foreign noise rarely has a near key and the guard then falls back."),
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                     tooltip="Seed for seed_mode 'custom'. Batch item i uses seed + i."),
    ]


def small_model_inputs() -> list[io.Input]:
    return [
        io.Model.Input("small_model", optional=True,
                       tooltip="T-Stitch keys: the small model the KB used for its first steps. Needed only for such KBs."),
        io.Conditioning.Input("small_positive", optional=True, tooltip="Positive conditioning for the small model (default: positive)."),
        io.Conditioning.Input("small_negative", optional=True, tooltip="Negative conditioning for the small model (default: negative)."),
    ]


def preview_callback(model, steps: int):
    return latent_preview.prepare_callback(model, steps)


def item_seeds(kb: KnowledgeBase, latent_image: dict, seed_mode: str, seed: int) -> list[int]:
    seeds, warnings = kb_query_seeds(kb, latent_image["samples"].shape[0], seed_mode, seed)
    for w in warnings:
        log.warning("ReDi: %s", w)
    return seeds


def clip_encoder(clip):
    """prompt -> CONDITIONING with ComfyUI's own CLIPTextEncode path."""
    if clip is None:
        raise KBError("BuildKnowledgeBase needs a CLIP input to encode prompts: connect the checkpoint loader's CLIP.")

    def encode(prompt: str) -> list:
        return clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
    return encode
