"""GUIDERs and denoiser views for runs whose model evaluations do not all go the same way.

- `SwitchGuider`: two guiders in ONE sampler run; every evaluation above a switch sigma goes
  to the early guider, the others to the late one. T-Stitch (a small model first) and the
  stylization prompt switch (content first, content + style after the key step) are both
  this. A multistep sampler keeps its history across the hand-over, because the sampler
  never stops.
- `batch_view`: the same denoiser for a subset of the batch, with every per-item
  conditioning sliced to those items (ReDi resumes items of one batch from different steps).
- (Evaluations are counted per model and item by `counted.CountedDenoiser`, not here.)

Each guider is prepared by its own `sample()` (conditioning, hooks, patches, model loading,
clean-up), so nothing of ComfyUI's sampling preparation is repeated here: the late guider's
run hands its prepared state to the early guider's run, whose sampler call is the single
real one. The late guider's model patcher is a clone carrying the early model as an
additional model (`ModelPatcher.set_additional_models`), so ComfyUI's model management
loads both models together for the run.
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import comfy.conds
import comfy.samplers
import comfy.utils
import torch

from ..core.errors import KBError, KBMismatchError
from ..core.schedule import Switch

#: ModelPatcher.additional_models key under which the early model travels with the late one.
ADDITIONAL_MODELS_KEY = "redi_switch_early_model"


class _Inside(comfy.samplers.Sampler):
    """A SAMPLER that does not sample: it hands the prepared guider and its arguments to `body`."""

    def __init__(self, body: Callable):
        self.body = body

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        return self.body(model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)


def _with_sampler_options(base: dict, outer_base: dict, given: dict) -> dict:
    """`base` plus what the sampler function added to `outer_base` (cfg_pp samplers add post-CFG functions)."""
    if given is outer_base:
        return base
    out = dict(base)
    for key in ("sampler_post_cfg_function", "sampler_pre_cfg_function"):
        added = given.get(key, [])[len(outer_base.get(key, [])):]
        if added:
            out[key] = list(base.get(key, [])) + list(added)
    if given.get("disable_cfg1_optimization") and not outer_base.get("disable_cfg1_optimization"):
        out["disable_cfg1_optimization"] = True
    return out


class _Route:
    """The denoiser of a switched run: sends each evaluation to the guider that owns its sigma.

    early/late: (name, prepared guider or route, that guider's model_options). The sampler
    was given the late guider's arguments, so late evaluations pass its options through and
    early ones get the early guider's options plus whatever the sampler function added.
    """

    def __init__(self, at: float, early: tuple, late: tuple, counts: dict[str, int]):
        self.at, self.early, self.late, self.counts = float(at), early, late, counts
        # What k-diffusion samplers read from a guider: the late model's BaseModel and patcher (schedule, scaling).
        self.inner_model = late[1].inner_model
        self.model_patcher = late[1].model_patcher

    def _branch(self, sigma) -> tuple:
        return self.early if float(torch.as_tensor(sigma).max()) > self.at else self.late

    def __call__(self, x, sigma, model_options={}, seed=None):  # noqa: B006 - ComfyUI's signature
        _, wrap, options = self._branch(sigma)
        name = self.model_name_at(sigma)
        self.counts[name] = self.counts.get(name, 0) + 1
        if wrap is not self.late[1]:
            options = _with_sampler_options(options, self.late[2], model_options)
        else:
            options = model_options
        return wrap(x, sigma, model_options=options, seed=seed)

    def model_name_at(self, sigma) -> str:
        name, wrap, _ = self._branch(sigma)
        return wrap.model_name_at(sigma) if hasattr(wrap, "model_name_at") else name

    def patcher_at(self, sigma):
        _, wrap, _ = self._branch(sigma)
        return patcher_at(wrap, sigma)

    def batch_view(self, idx: Sequence[int], batch: int) -> _Route:
        views: dict[int, object] = {}

        def view(wrap):
            if id(wrap) not in views:  # one view per guider, so "is the late guider" still holds
                views[id(wrap)] = batch_view(wrap, idx, batch)
            return views[id(wrap)]

        (en, ew, eo), (ln, lw, lo) = self.early, self.late
        return _Route(self.at, (en, view(ew), eo), (ln, view(lw), lo), self.counts)


def patcher_at(denoiser, sigma):
    """The ModelPatcher that evaluates `sigma` in this prepared guider, route or KSamplerX0Inpaint."""
    if isinstance(denoiser, comfy.samplers.KSamplerX0Inpaint):
        denoiser = denoiser.inner_model
    if hasattr(denoiser, "patcher_at"):
        return denoiser.patcher_at(sigma)
    return denoiser.model_patcher


def model_name_at(denoiser, sigma) -> str:
    """The role name ('model', 'small_model', ...) of the model that evaluates `sigma`."""
    if isinstance(denoiser, comfy.samplers.KSamplerX0Inpaint):
        denoiser = denoiser.inner_model
    return denoiser.model_name_at(sigma) if hasattr(denoiser, "model_name_at") else "model"


class SwitchGuider:
    """GUIDER: `early` evaluates every sigma above the switch, `late` the rest, in one sampler run.

    names: the role of each guider's model in evaluation counts (T-Stitch: "small_model",
    "large_model"). `evaluations` holds the last run's evaluations per role. The late
    guider's model patcher is what SamplerCustomAdvanced previews and sizes latents with.
    """

    def __init__(self, early, late, switch: Switch, names: tuple[str, str] = ("early", "late")):
        early_patcher, late_patcher = early.model_patcher, late.model_patcher
        if (early_patcher is not late_patcher and early_patcher.is_clone(late_patcher)
                and early_patcher.patches_uuid != late_patcher.patches_uuid):
            raise KBMismatchError(
                "the two guiders use one model with different weight patches (LoRA): ComfyUI holds one set of patches "
                "per model at a time, so both could not run in one sampling pass. Give both guiders the same patched "
                "model, or use two different checkpoints.")
        self.early, self.late, self.switch, self.names = early, late, switch, tuple(names)
        self.model_patcher = late_patcher
        self.model_options = late.model_options
        self.evaluations: dict[str, int] = {}

    def patcher_at(self, sigma, sigmas: Sequence[float]):
        """Before a run: the ModelPatcher that will evaluate `sigma` on the schedule `sigmas`."""
        guider = self.early if float(sigma) > self.switch.sigma_in(sigmas) else self.late
        return guider.patcher_at(sigma, sigmas) if isinstance(guider, SwitchGuider) else guider.model_patcher

    def loading_with(self, patchers: list) -> SwitchGuider:
        """This guider with `patchers` loaded alongside its late model."""
        out = copy.copy(self)
        out.late = _loading_with(self.late, patchers)
        return out

    def patchers(self) -> list:
        return _patchers(self.early) + _patchers(self.late)

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):
        if denoise_mask is not None:
            raise KBError("a switched run (T-Stitch, prompt switch) does not support a latent noise mask (inpainting); "
                          "remove the mask (SetLatentNoiseMask) or sample the masked latent with one model.")
        schedule = [float(s) for s in sigmas]
        at = self.switch.sigma_in(schedule)
        evaluated = schedule[:-1] + [s for s in schedule[-1:] if s > 0]  # a final 0 is never evaluated
        early_runs, late_runs = any(s > at for s in evaluated), any(s <= at for s in evaluated)
        self.evaluations = {}
        if not (early_runs and late_runs):  # one model owns every evaluation: that model's own run
            name, guider = (self.names[0], self.early) if early_runs else (self.names[1], self.late)

            def alone(wrap, sigmas_dev, args, callback, noise_dev, latent_dev, mask_dev, disable):
                route = _Route(at, (name, wrap, args["model_options"]), (name, wrap, args["model_options"]), self.evaluations)
                return sampler.sample(route, sigmas_dev, args, callback, noise_dev, latent_dev, mask_dev, disable)

            return guider.sample(noise, latent_image, _Inside(alone), sigmas, denoise_mask, callback, disable_pbar, seed)

        def on_late(late_wrap, sigmas_dev, late_args, callback, noise_dev, latent_dev, mask_dev, disable):
            held = []

            def on_early(early_wrap, _sigmas, early_args, *_):
                route = _Route(at, (self.names[0], early_wrap, early_args["model_options"]),
                               (self.names[1], late_wrap, late_args["model_options"]), self.evaluations)
                held.append(sampler.sample(route, sigmas_dev, late_args, callback, noise_dev, latent_dev, mask_dev, disable))
                return held[-1]

            # The early guider prepares itself (conditioning, hooks, model) and runs the one real sampler call. A copy:
            # a run keeps its state on the guider, and ComfyUI hands out one cached object for two identical nodes.
            copy.copy(self.early).sample(noise, latent_image, _Inside(on_early), sigmas, None, None, True, seed)
            return held[0]

        late = _loading_with(self.late, _patchers(self.early))
        return late.sample(noise, latent_image, _Inside(on_late), sigmas, denoise_mask, callback, disable_pbar, seed)


def _patchers(guider) -> list:
    return guider.patchers() if isinstance(guider, SwitchGuider) else [guider.model_patcher]


def _loading_with(guider, patchers: list):
    """A copy of `guider` whose model patcher brings `patchers` along, so ComfyUI loads them together."""
    if isinstance(guider, SwitchGuider):
        return guider.loading_with(patchers)
    own = guider.model_patcher
    others = [p for p in patchers if not p.is_clone(own)]  # a clone of the same model is loaded already
    if not others:
        return guider
    out = copy.copy(guider)
    out.model_patcher = own.clone()
    out.model_patcher.set_additional_models(ADDITIONAL_MODELS_KEY, others)
    return out


# --------------------------------------------------------------------------- batch subsets


def _rows(tensor: torch.Tensor, idx: list[int], batch: int) -> torch.Tensor:
    """Rows `idx` of a per-item tensor, as ComfyUI would have repeated it to the full batch."""
    if tensor.shape[0] == 1:
        return tensor  # shared by every item: ComfyUI repeats it to any batch size
    return comfy.utils.repeat_to_batch_size(tensor, batch)[idx]


def _slice_model_cond(cond, idx: list[int], batch: int):
    if isinstance(cond, comfy.conds.CONDConstant):
        return cond
    if isinstance(cond, comfy.conds.CONDList):
        return type(cond)([_rows(t, idx, batch) for t in cond.cond])
    if isinstance(cond, comfy.conds.CONDRegular) and isinstance(cond.cond, torch.Tensor):
        return type(cond)(_rows(cond.cond, idx, batch))
    return cond


def _slice_cond(cond: dict, idx: list[int], batch: int) -> dict:
    out = dict(cond)
    out["model_conds"] = {k: _slice_model_cond(v, idx, batch) for k, v in cond.get("model_conds", {}).items()}
    mask = cond.get("mask")
    if isinstance(mask, torch.Tensor) and mask.shape[0] == batch and batch > 1:
        out["mask"] = mask[idx]
    return out


def batch_view(denoiser, idx: Sequence[int], batch: int):
    """The same prepared denoiser for items `idx` of a batch of `batch` items.

    ComfyUI repeats or truncates each conditioning tensor to the batch it is called with
    (comfy.utils.repeat_to_batch_size), which is right for a conditioning shared by the batch
    but gives items 1 and 3 the conditioning of items 0 and 1. So every per-item tensor of the
    prepared conditioning is sliced to `idx` first. ControlNet hints are left as they are.
    """
    idx = [int(i) for i in idx]
    if denoiser is None:
        return None
    if isinstance(denoiser, comfy.samplers.KSamplerX0Inpaint):
        view = comfy.samplers.KSamplerX0Inpaint(batch_view(denoiser.inner_model, idx, batch), denoiser.sigmas)
        for name in ("latent_image", "noise"):
            value = getattr(denoiser, name, None)
            setattr(view, name, _rows(value, idx, batch) if isinstance(value, torch.Tensor) and value.ndim else value)
        return view
    if hasattr(denoiser, "batch_view"):
        return denoiser.batch_view(idx, batch)
    view = copy.copy(denoiser)  # a prepared guider: its conditioning, sliced
    view.conds = {name: [_slice_cond(c, idx, batch) for c in conds] for name, conds in denoiser.conds.items()}
    return view
