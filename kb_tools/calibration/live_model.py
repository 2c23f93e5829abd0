"""A live CFG denoiser for a batch of (prompt, seed) items, for the calibrations that need many model calls at once.

ComfyUI prepares a model (loading, conditioning, CFG) only inside a sampler run, so
`with_live_batch` starts one run through CFGGuider with a sampler function that hands a
`LiveBatch` to the caller's function: it evaluates any subset of the items at any sigma (in
chunks, each item with its own conditioning, guiders.batch_view), starts any schedule from the
items' seeded noise exactly as KSAMPLER does, and runs ComfyUI's own sampler functions. Every
evaluation is counted per item (comfy.counted.CountedDenoiser).

Shapes: x, D [B, C, H, W] in the sampler's space (ComfyUI's internal x); idx: item indices.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import comfy.samplers
import numpy as np
import torch

from ..comfy import model_facts as facts
from ..comfy.counted import CountedDenoiser, run_sampler
from ..comfy.guiders import batch_view
from ..comfy.plain import batch_conditioning, cfg_guider
from ..core.errors import KBError
from ..core.evaluations import Evaluations

class CalibrationStopped(Exception):
    """Raised between units of work when the caller's should_stop() says so; what was stored stays stored."""


def is_stochastic(sampler_name: str) -> bool:
    """Whether the sampler draws noise during the run (SDE and ancestral samplers): such runs go one item at a time,
    seeded with the item's seed, as KSampler runs a batch of one."""
    return "sde" in sampler_name or "ancestral" in sampler_name


class LiveBatch:
    """The prepared denoiser of one batch: evaluations, starts and built-in sampler runs for any subset of items."""

    def __init__(self, model, kmodel, extra_args: dict, seeds: Sequence[int], chunk: int):
        self.model, self.kmodel, self.extra_args = model, kmodel, extra_args
        self.seeds, self.chunk = [int(s) for s in seeds], max(1, int(chunk))
        self.batch = len(self.seeds)
        self.tally = Evaluations(self.batch)
        self._views: dict[tuple[int, ...], object] = {}

    def _view(self, idx: tuple[int, ...]):
        if len(idx) == self.batch and idx == tuple(range(self.batch)):
            return self.kmodel
        if idx not in self._views:
            self._views[idx] = batch_view(self.kmodel, list(idx), self.batch)
        return self._views[idx]

    def items(self, idx: Sequence[int] | None) -> list[int]:
        return list(range(self.batch)) if idx is None else [int(i) for i in idx]

    def denoise(self, x: torch.Tensor, sigma: float, idx: Sequence[int] | None = None) -> torch.Tensor:
        """D(x, sigma) for items `idx` (x [len(idx), C, H, W]), `chunk` items per model call."""
        items = self.items(idx)
        out = []
        for c in range(0, len(items), self.chunk):
            part = tuple(items[c:c + self.chunk])
            counted = CountedDenoiser(self._view(part), self.tally, part)
            xs = x[c:c + len(part)]
            out.append(counted(xs, xs.new_full((len(part),), float(sigma)), **self.extra_args))
        return torch.cat(out)

    def start(self, sigma0: float, idx: Sequence[int] | None = None) -> torch.Tensor:
        """The items' first state on a schedule starting at sigma0, as KSAMPLER.sample makes it from their noise."""
        items = self.items(idx)
        ms = self.model.get_model_object("model_sampling")
        max_sigma = float(ms.sigma_max)
        max_denoise = math.isclose(max_sigma, float(sigma0), rel_tol=1e-05) or float(sigma0) > max_sigma
        rows = torch.tensor(items, device=self.kmodel.noise.device)
        sigma = torch.as_tensor(float(sigma0), dtype=self.kmodel.noise.dtype, device=self.kmodel.noise.device)
        return ms.noise_scaling(sigma, self.kmodel.noise[rows], self.kmodel.latent_image[rows], max_denoise)

    def run_builtin(self, sampler_name: str, sigmas: torch.Tensor, idx: Sequence[int] | None = None) -> torch.Tensor:
        """ComfyUI's `sampler_name` over `sigmas` from the items' noise: the final state [len(idx), C, H, W] (sampler space).

        A stochastic sampler runs item by item with the item's seed (what KSampler does for a batch of one)."""
        items = self.items(idx)
        sampler = comfy.samplers.sampler_object(sampler_name)
        sig = torch.as_tensor(sigmas, dtype=torch.float32).to(self.kmodel.noise.device)
        groups = [[i] for i in items] if is_stochastic(sampler_name) else [items]
        out = []
        for group in groups:
            part = tuple(group)
            counted = CountedDenoiser(self._view(part), self.tally, part)
            extra = {**self.extra_args, "seed": self.seeds[part[0]] if len(part) == 1 else self.extra_args.get("seed")}
            with torch.no_grad():
                out.append(run_sampler(sampler, counted, self.start(float(sig[0]), part), sig, extra, None, True))
        return torch.cat(out)

    def to_latent(self, sigma: float, x: torch.Tensor) -> torch.Tensor:
        """Sampler space -> the LATENT-dict space a user gets (float32, CPU)."""
        return facts.to_latent_space(self.model, float(sigma), x.float()).float().cpu()


def _inside(kmodel, x, sigmas, extra_args=None, callback=None, disable=None, *, fn, model, seeds, chunk, out):
    """k-diffusion sampler function: hands the prepared denoiser to `fn`, returns x unchanged."""
    with torch.no_grad():
        out["value"] = fn(LiveBatch(model, kmodel, dict(extra_args or {}), seeds, chunk))
    return x


def conditionings_match(conds: Sequence[list]) -> np.ndarray:
    """bool [B]: the items whose CONDITIONING batches with the first one (same structure and token length)."""
    first = conds[0]
    ok = []
    for c in conds:
        same = len(c) == len(first) and all(p[0].shape[1:] == q[0].shape[1:] for p, q in zip(c, first))
        ok.append(same)
    return np.asarray(ok, bool)


def with_live_batch(model, conds: Sequence[list], negative: list, seeds: Sequence[int], cfg: float,
                    latent_shape: Sequence[int], sigmas: torch.Tensor, fn: Callable[[LiveBatch], object],
                    chunk: int = 16):
    """fn(LiveBatch) inside one CFGGuider run of the batch (item i: conds[i] and seeds[i]); returns what fn returns.

    sigmas: a schedule of the run (its first sigma sets the session's start; fn may use any other)."""
    if not conds or len(conds) != len(seeds):
        raise KBError(f"got {len(conds)} conditionings for {len(seeds)} seeds; give one prompt per seed.")
    positive = batch_conditioning(list(conds))
    if not positive:
        raise KBError("the prompts encode to conditionings of different token lengths; calibrate with prompts of one "
                      "length class (e.g. at most 75 CLIP tokens each).")
    guider = cfg_guider(model, positive, batch_conditioning([negative] * len(conds)), float(cfg))
    latent = torch.zeros((len(seeds), *latent_shape))
    noise = facts.seeded_noise(latent, seeds)
    out: dict = {}
    sampler = comfy.samplers.KSAMPLER(_inside, extra_options={"fn": fn, "model": model, "seeds": list(seeds),
                                                              "chunk": chunk, "out": out})
    with torch.no_grad():
        guider.sample(noise, latent, sampler, torch.as_tensor(sigmas, dtype=torch.float32), disable_pbar=True,
                      seed=int(seeds[0]))
    return out["value"]
