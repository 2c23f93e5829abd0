"""Cached converged references: the true solution each benchmark verdict is scored against.

One reference per (model fingerprint, prompt, seed, cfg, negative prompt, latent shape) and solver
(sampler, scheduler, N): the plain high-order sampler (dpmpp_2m with karras by default) run at N and
at 2N steps from the item's seed, through the same code path as every other plain run of the
benchmarks (`kb_tools.comfy.plain.sample_prompts`, ComfyUI's own samplers). The reference is the 2N
output; the doubling gap, the per-item MSE between the N and 2N outputs, says how far from converged
it still is. A verdict that compares errors is sound where the gap is below 1/20 of the smallest
error it compares (`gap_ok`).

Each reference is one safetensors file under the cache folder, named by the sha256 digest of the
JSON of its fields (sorted keys), with the gap, N and the fields in its metadata. A later call with
the same fields loads the file and samples nothing; `converged` computes only the missing items of
a batch. Writes go to a temporary file in the same folder, then `os.replace`: a reader sees a whole
reference or none.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

#: The default cache folder; benchmarks/.cache ignores itself (a `*` .gitignore written on first use).
DEFAULT_CACHE = Path(__file__).resolve().parents[1] / ".cache" / "converged"
#: The default solver: a second-order multistep sampler on the karras schedule, N steps (the reference is 2N).
#: N = 100: on the embedded large model (16 fresh-seed items) N = 50's doubling gap was 0.26x (cfg 3) and 0.9x (cfg 7.5)
#: of euler-40's error, N = 100's 0.03x and 0.015x (benchmarks/results/converged_validity/validity.json).
DEFAULT_SOLVER = ("dpmpp_2m", "karras", 100)
#: A verdict comparing errors is trusted where doubling N moves the reference by less than this share of the smallest error.
GAP_SHARE = 1 / 20
TENSOR = "reference"


def model_id(model) -> dict:
    """The model part of a reference's fields: the pack's own fingerprint (architecture, schedule, weight probe, patches)."""
    from kb_tools.comfy.model_facts import model_fingerprint

    return model_fingerprint(model)


def fields(model_fingerprint, prompt: str, seed: int, cfg: float, negative_prompt: str, latent_shape: Sequence[int],
           solver: Sequence = DEFAULT_SOLVER) -> dict:
    """The fields that name one reference (JSON-able): a different value of any is a different reference."""
    sampler, scheduler, steps = solver
    return {"model": model_fingerprint, "prompt": str(prompt), "seed": int(seed), "cfg": float(cfg),
            "negative_prompt": str(negative_prompt), "latent_shape": [int(s) for s in latent_shape],
            "solver": {"sampler": str(sampler), "scheduler": str(scheduler), "steps": int(steps)}}


def digest(item_fields: dict) -> str:
    """sha256 (hex) of the fields as JSON with sorted keys: the reference's file name."""
    return hashlib.sha256(json.dumps(item_fields, sort_keys=True).encode()).hexdigest()


@dataclasses.dataclass
class Converged:
    """References of a batch, in request order."""

    latents: torch.Tensor      # [B, C, H, W] the 2N outputs
    gaps: np.ndarray           # [B] float64: per-item MSE between the N and 2N outputs (the doubling gap)
    steps: int                 # N
    computed: list[int]        # indices of the items sampled by this call (the rest came from the cache)
    paths: list[Path]

    @property
    def max_gap(self) -> float:
        return float(self.gaps.max()) if len(self.gaps) else 0.0


def gap_ok(gap: float, smallest_error: float, share: float = GAP_SHARE) -> bool:
    """Whether doubling changes the reference by less than `share` (1/20) of the smallest error a verdict compares."""
    return bool(np.isfinite(gap) and gap < share * smallest_error)


def ignore_cache(folder: Path) -> None:
    """Make a cache folder ignore itself in git (a `.gitignore` holding `*`, as pytest's cache does)."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / ".gitignore"
    if not marker.exists():
        marker.write_text("# written by benchmarks/h2h: a cache, never committed\n*\n")


def path_for(cache_dir: Path, item_fields: dict) -> Path:
    return Path(cache_dir) / f"{digest(item_fields)}.safetensors"


def load(path: Path) -> tuple[torch.Tensor, dict]:
    """(reference [C, H, W], metadata: fields, steps, gap) of one cached reference."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensor = f.get_tensor(TENSOR)
    return tensor, {"fields": json.loads(meta["fields"]), "steps": int(meta["steps"]), "gap": float(meta["gap"])}


def store(path: Path, reference: torch.Tensor, item_fields: dict, gap: float) -> None:
    """Write one reference atomically: a temporary file in the same folder, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"fields": json.dumps(item_fields, sort_keys=True), "steps": str(item_fields["solver"]["steps"]),
            "doubled_steps": str(2 * item_fields["solver"]["steps"]), "gap": repr(float(gap)),
            "gap_metric": "mean squared difference between the N-step and 2N-step outputs (latent space)"}
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        save_file({TENSOR: reference.detach().to("cpu", torch.float32).contiguous()}, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def converged(model, encode: Callable[[str], list], prompts: Sequence[str], seeds: Sequence[int], *, cfg: float,
              latent_shape: Sequence[int], negative_prompt: str = "", solver: Sequence = DEFAULT_SOLVER,
              cache_dir: str | Path | None = None, fingerprint=None, batch_size: int = 8) -> Converged:
    """The converged reference of item i = (prompts[i], seeds[i]) for each item, sampling only the items not cached.

    encode: prompt -> CONDITIONING (the embedded text encoder, or a test's). fingerprint: the model
    part of the fields (default: `model_id(model)`; computing it runs no forward pass).
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    from kb_tools.comfy.plain import sample_prompts
    from kb_tools.core.records import Recipe

    cache = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
    if cache_dir is None:
        ignore_cache(DEFAULT_CACHE.parent)
    fp = model_id(model) if fingerprint is None else fingerprint
    sampler, scheduler, steps = solver
    items = [fields(fp, p, s, cfg, negative_prompt, latent_shape, solver) for p, s in zip(prompts, seeds)]
    paths = [path_for(cache, f) for f in items]
    latents: list[torch.Tensor | None] = [None] * len(items)
    gaps = np.full(len(items), np.nan)
    missing = []
    for i, path in enumerate(paths):
        if path.is_file():
            latents[i], meta = load(path)
            gaps[i] = meta["gap"]
        else:
            missing.append(i)
    if missing:
        todo_p, todo_s = [prompts[i] for i in missing], [int(seeds[i]) for i in missing]
        runs = [sample_prompts(model, encode, todo_p, todo_s, Recipe(sampler, scheduler, n, cfg), latent_shape=latent_shape,
                               negative_prompt=negative_prompt, batch_size=batch_size).latents.float()
                for n in (int(steps), 2 * int(steps))]
        per_item = ((runs[0] - runs[1]) ** 2).flatten(1).mean(1).double().numpy()
        for j, i in enumerate(missing):
            store(paths[i], runs[1][j], items[i], float(per_item[j]))
            latents[i], gaps[i] = runs[1][j].clone(), float(per_item[j])
    stacked = torch.stack(latents) if latents else torch.zeros((0, *latent_shape))
    return Converged(stacked, gaps, int(steps), missing, paths)
