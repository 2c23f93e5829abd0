"""The calibrated multistep sampler: `sample_calibrated`, one model evaluation per step.

Each step is core.multistep.calibrated_step with its row of a coefficient table fitted on the
knowledge base's converged trajectories (calibration.sampler_fit). coeffs = 0 is ComfyUI's
`euler`; core.multistep.dpmpp_2m_coefficients is its `dpmpp_2m`. Evaluations are counted per
item (comfy.counted.CountedDenoiser) into an optional Evaluations tally.

Shapes: x [B, C, H, W] in the sampler's space; sigmas [N + 1]; coeffs float64 [N, 3].
"""
from __future__ import annotations

import comfy.samplers
import torch

from ..comfy.counted import CountedDenoiser
from ..core.errors import KBError
from ..core.evaluations import Evaluations
from ..core.multistep import calibrated_step, check_coefficients


def calibrated_ksampler(coeffs, tally: Evaluations | None = None) -> comfy.samplers.KSAMPLER:
    """The SAMPLER (SamplerCustomAdvanced, or guider.sample) that runs `coeffs`; evaluations go into `tally`."""
    return comfy.samplers.KSAMPLER(sample_calibrated, extra_options={"coeffs": coeffs, "tally": tally})


def check_calibrated(x: torch.Tensor, sigmas, coeffs, extra_args: dict, tally: Evaluations | None) -> torch.Tensor:
    """Everything the sampler is given, checked once before the first evaluation; returns the table float64 [N, 3]."""
    table = check_coefficients(coeffs, sigmas)
    if x.ndim != 4:
        raise KBError(f"the calibrated sampler expects latents [B, C, H, W], got shape {tuple(x.shape)}; use a 2-D image "
                      "latent.")
    if not torch.isfinite(x).all():
        raise KBError("the starting latent holds NaN or infinite values; check the noise and the input latent.")
    if tally is not None and tally.batch != len(x):
        raise KBError(f"the evaluation tally is for {tally.batch} items but the batch has {len(x)}; pass "
                      f"Evaluations({len(x)}).")
    if extra_args.get("denoise_mask") is not None:
        raise KBError("the calibrated sampler does not support a latent noise mask (inpainting); remove "
                      "SetLatentNoiseMask or sample the masked latent with KSampler.")
    return table


@torch.no_grad()
def sample_calibrated(model, x, sigmas, extra_args=None, callback=None, disable=None, *, coeffs,
                      tally: Evaluations | None = None):
    """The calibrated multistep sampler (Euler + fitted history corrections; cf. Zhou et al. 2024, AMED)."""
    extra_args = {} if extra_args is None else extra_args
    table = check_calibrated(x, sigmas, coeffs, extra_args, tally)
    denoiser = CountedDenoiser(model, Evaluations(len(x)) if tally is None else tally, range(len(x)))
    s_in = x.new_ones([x.shape[0]])
    history: list[torch.Tensor] = []  # earlier predictions, newest first
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = calibrated_step(x, denoised, history, float(sigmas[i]), float(sigmas[i + 1]), table[i])
        history = [denoised, *history[:1]]
    return x
