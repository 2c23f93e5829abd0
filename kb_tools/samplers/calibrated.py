"""The calibrated multistep sampler: `sample_calibrated`, one model evaluation per step.

Each step is core.multistep.calibrated_step with its row of a coefficient table fitted on the
knowledge base's converged trajectories (calibration.sampler_fit). coeffs = 0 is ComfyUI's
`euler`; core.multistep.dpmpp_2m_coefficients is its `dpmpp_2m`. Evaluations are counted per
item (comfy.counted.CountedDenoiser) into an optional Evaluations tally.

What a stored sampler calibration chose (calibration/sampler_calibration.py, read by
`load_sampler_calibration`): `SamplerCalibration.choice(model, cfg, latent_shape, nfe)` gives a
`CalibratedChoice`, the calibrated sampler on its schedule or the built-in sampler x schedule that
beat it on held-out teachers, with its KSAMPLER and summary line; refusals name the fix.

Shapes: x [B, C, H, W] in the sampler's space; sigmas [N + 1]; coeffs float64 [N, 3].
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import comfy.samplers
import torch

from ..calibration.heldout import MIN_ITEMS_FOR_WIN
from ..comfy.counted import CountedDenoiser, counted_ksampler
from ..comfy.model_facts import check_model_matches
from ..core.errors import KBError, KBMismatchError
from ..core.evaluations import Evaluations
from ..core.multistep import calibrated_step, check_coefficients, check_sigmas
from ..store.sampler_calibration import read_record


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


# --------------------------------------------------------------------------- what a calibration chose

CALIBRATE_FIX = "python -m kb_tools calibrate-sampler KB --ckpt CKPT (or the ReDiCalibrateSampler node)"


def _bad(where: str, problem: str) -> KBError:
    return KBError(f"the sampler calibration record: {where} {problem}. Delete the KB's sampler_calibration folder and "
                   f"calibrate again ({CALIBRATE_FIX}).")


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(where, f"must be a finite number, got {value!r}"[:200])
    return float(value)


@dataclass(frozen=True)
class CalibratedChoice:
    """What to run at (model, cfg, latent size, N): the calibrated sampler on its schedule, or a built-in choice."""

    nfe: int
    cfg: float
    kind: str                 # "calibrated" or "builtin"
    sampler_name: str         # the built-in sampler's name, or "calibrated"
    schedule: str             # the schedule's name ("karras", "gits_1.2", "karras_rho3", "searched", ...)
    sigmas: torch.Tensor      # float32 [steps + 1]: exactly what to sample on
    coeffs: torch.Tensor | None  # float64 [N, 3] for the calibrated sampler, else None
    heldout: dict             # n, calibrated_mse, best_builtin, best_builtin_mse, euler_normal_mse, diff_se, grid, ...

    @property
    def steps(self) -> int:
        """Sampler steps (Heun spends 2 evaluations per step but 1 on the last)."""
        return len(self.sigmas) - 1

    def ksampler(self, tally: Evaluations | None = None) -> comfy.samplers.KSAMPLER:
        """The KSAMPLER to run on `sigmas` (evaluations counted into `tally` when given, whichever kind won)."""
        if self.kind == "calibrated":
            return calibrated_ksampler(self.coeffs, tally)
        if tally is not None:
            return counted_ksampler(self.sampler_name, tally)
        return comfy.samplers.sampler_object(self.sampler_name)

    def summary_line(self) -> str:
        """'best for this model at 8 steps: ...' with the held-out figures."""
        h = self.heldout
        best = f"{h['best_builtin']} {h['best_builtin_mse']:.2g}"
        euler = "" if h.get("euler_normal_mse") is None else f", euler/normal {h['euler_normal_mse']:.2g}"
        cal = "diverged" if h.get("calibrated_mse") is None else f"{h['calibrated_mse']:.2g}"
        if self.kind == "calibrated":
            return (f"best for this model at {self.nfe} steps: calibrated sampler ({self.schedule} schedule), held-out MSE "
                    f"to converged {cal} vs {best}{euler} (n={h['n']}, paired SE {h['diff_se']:.1g})")
        why = ("too few held-out items to prove the calibrated sampler better" if h["n"] < MIN_ITEMS_FOR_WIN
               else "the calibrated sampler did not beat it on held-out items")
        return (f"best for this model at {self.nfe} steps: {self.sampler_name}/{self.schedule} ({why}: MSE to converged "
                f"{cal} vs {best}{euler}, n={h['n']}, paired SE {h['diff_se']:.1g})")


class SamplerCalibration:
    """A KB's stored sampler calibration (store/sampler_calibration.py), checked once when loaded."""

    def __init__(self, record: dict, path: str = ""):
        self.record, self.path = record, path
        if not isinstance(record, dict) or not isinstance(record.get("cfgs"), dict) or not record["cfgs"]:
            raise _bad("the record", "holds no cfg block")
        shape = record.get("latent_shape")
        if not isinstance(shape, list) or len(shape) != 3 or not all(isinstance(v, int) and v > 0 for v in shape):
            raise _bad("latent_shape", f"must be [C, H, W], got {shape!r}"[:200])
        if not isinstance(record.get("model_fingerprint"), dict):
            raise _bad("model_fingerprint", "must be an object")
        self._choices = {key: {int(n): self._parse(key, n, block) for n, block in _blocks(key, cfg_block)}
                         for key, cfg_block in record["cfgs"].items()}

    def _parse(self, key: str, n: str, block: dict) -> CalibratedChoice:
        where = f"cfgs.{key}.nfe.{n}"
        cfg = _number(self.record["cfgs"][key].get("cfg"), f"cfgs.{key}.cfg")
        h = block.get("heldout")
        if not isinstance(h, dict) or h.get("kind") not in ("calibrated", "builtin"):
            raise _bad(f"{where}.heldout", "must say which kind won")
        for k in ("best_builtin_mse", "diff_se", "n"):
            _number(h.get(k), f"{where}.heldout.{k}")
        for k in ("calibrated_mse", "euler_normal_mse"):
            if h.get(k) is not None:
                _number(h[k], f"{where}.heldout.{k}")
        name = h.get("best_builtin")
        if not isinstance(name, str) or name.count("/") != 1:
            raise _bad(f"{where}.heldout.best_builtin", "must be 'sampler/schedule'")
        try:
            if h["kind"] == "calibrated":
                sigmas = check_sigmas(block.get("sigmas"))
                coeffs = check_coefficients(block.get("coeffs"), sigmas)
                sampler, schedule = "calibrated", block.get("schedule")
            else:
                sigmas, coeffs = _builtin_sigmas(h.get("best_builtin_sigmas")), None
                sampler, schedule = name.split("/")
        except (KBError, TypeError, ValueError, RuntimeError) as e:
            raise _bad(where, f"holds an unusable schedule or table ({e})") from None
        if sampler != "calibrated" and sampler not in comfy.samplers.KSampler.SAMPLERS:
            raise _bad(f"{where}.heldout.best_builtin", f"names {sampler!r}, which this ComfyUI does not have")
        if not isinstance(schedule, str) or not 0 < len(schedule) <= 64:
            raise _bad(f"{where}.schedule", "must be a schedule name")
        return CalibratedChoice(int(n), cfg, h["kind"], sampler, schedule, sigmas.float(), coeffs, h)

    @property
    def cfgs(self) -> list[float]:
        return sorted(float(self.record["cfgs"][k]["cfg"]) for k in self._choices)

    @property
    def nfe_values(self) -> list[int]:
        return sorted({n for per in self._choices.values() for n in per})

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.record["latent_shape"])

    def choice(self, model, cfg: float, latent_shape, nfe: int) -> CalibratedChoice:
        """What the calibration chose for this model, cfg, latent [C, H, W] and NFE; KBError naming the fix otherwise."""
        fix = f"calibrate it: {CALIBRATE_FIX.replace('KB', self.path or 'KB')}"
        try:
            check_model_matches(self.record["model_fingerprint"], model, what="the model")
        except KBMismatchError as e:
            raise KBMismatchError(f"the sampler calibration was made for a different model ({e}); connect that model, or "
                                  f"{fix} with this model's checkpoint.") from None
        shape = tuple(int(v) for v in latent_shape)
        if shape != self.latent_shape:
            raise KBError(f"the sampler calibration holds latents {list(self.latent_shape)}, not {list(shape)}; sample at "
                          f"the calibrated size or {fix} with --width/--height for this size.")
        key = next((k for k in self._choices if abs(float(self.record["cfgs"][k]["cfg"]) - float(cfg)) <= 1e-6), None)
        if key is None:
            raise KBError(f"the sampler calibration covers cfg {', '.join(f'{c:g}' for c in self.cfgs)}, not {float(cfg):g}; "
                          f"set cfg to a calibrated value or {fix} --cfg {float(cfg):g}.")
        per = self._choices[key]
        if int(nfe) not in per:
            raise KBError(f"the sampler calibration covers {sorted(per)} steps at cfg {float(cfg):g}, not {int(nfe)}; set "
                          f"steps to one of them or {fix} --nfe {int(nfe)}.")
        return per[int(nfe)]

    def summary(self) -> str:
        """One 'best for this model at N steps: ...' line per calibrated cfg and N."""
        lines = []
        for key in sorted(self._choices, key=lambda k: float(self.record["cfgs"][k]["cfg"])):
            for n in sorted(self._choices[key]):
                lines.append(f"cfg {float(self.record['cfgs'][key]['cfg']):g}: {self._choices[key][n].summary_line()}")
        return "\n".join(lines)


def _builtin_sigmas(values) -> torch.Tensor:
    """A built-in choice's schedule as stored: finite, >= 0, non-increasing (some schedulers repeat a sigma)."""
    sig = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if len(sig) < 2 or not torch.isfinite(sig).all() or (sig < 0).any() or (sig[1:] > sig[:-1]).any():
        raise KBError(f"{sig.tolist()[:8]} is not a schedule a sampler can walk")
    return sig


def _blocks(key: str, cfg_block) -> list[tuple[str, dict]]:
    if not isinstance(cfg_block, dict) or not isinstance(cfg_block.get("nfe"), dict):
        raise _bad(f"cfgs.{key}", "must hold the per-N results")
    out = []
    for n, block in cfg_block["nfe"].items():
        if not (isinstance(n, str) and n.isdigit() and 1 <= int(n) <= 1000) or not isinstance(block, dict):
            raise _bad(f"cfgs.{key}.nfe", f"has an entry {n!r} that is not a step count"[:200])
        out.append((n, block))
    return out


def load_sampler_calibration(kb) -> SamplerCalibration:
    """The sampler calibration stored with a KB (a folder path or an open KnowledgeBase); KBError naming the fix."""
    root = kb.path if hasattr(kb, "path") else str(kb)
    return SamplerCalibration(read_record(root), root)
