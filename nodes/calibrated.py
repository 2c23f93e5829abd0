"""The sampler calibrated on a knowledge base: calibrate it (ReDiCalibrateSampler), sample with it as a KSampler drop-in
(ReDiCalibratedSampler), or as native custom-sampling parts (ReDiCalibratedSigmas + SamplerReDiCalibrated, with any
GUIDER, EasyCache and the rest of the graph).

Thin V3 layer over kb_tools' calibrate_sampler / load_sampler_calibration: per step count N (= model evaluations) the
calibration stores either the calibrated multistep sampler on its fitted schedule, or the built-in sampler x schedule
that beat it on the held-out teacher items; every node runs exactly that choice and says which one ran.
"""
from __future__ import annotations

import math
from pathlib import Path

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import torch
from comfy_api.latest import io

from ..kb_tools import (COMMON_SAMPLERS, COMMON_SCHEDULES, PLAIN_SAMPLERS, PLAIN_SCHEDULES, Evaluations, KBError,
                        calibrate_sampler, load_sampler_calibration)
from . import feedback
from .common import CATEGORY, KnowledgeBaseType, clip_encoder, kb_path, log, open_kb, preview_callback, refusal, with_samples

CALIBRATE_NODE = "ReDiCalibrateSampler"
SIGMAS_NODE = "ReDiCalibratedSigmas"
#: Calibrated schedules are compared with the SIGMAS a run is given to this relative tolerance (float32 round trips).
SIGMAS_RTOL = 1e-4
MAX_NFE = 1000
MAX_CFG = 100.0
#: compare_with: the built-in sampler x schedule grid the held-out check runs (kb_tools.comfy.schedules).
BUILTIN_GRIDS = {"every built-in choice": (PLAIN_SAMPLERS, PLAIN_SCHEDULES),
                 "common choices": (COMMON_SAMPLERS, COMMON_SCHEDULES)}

STEPS_TOOLTIP = ("Model evaluations per image (NFE): one of the step counts the knowledge base was calibrated for "
                 "(ReDiCalibrateSampler's nfe list); another value is refused with the calibrated ones named. Fewer = "
                 "faster, further from the converged image. A built-in choice with a two-evaluation sampler runs fewer "
                 "steps for the same NFE.")
CFG_TOOLTIP = ("Guidance scale: one of the values the knowledge base was calibrated for (ReDiCalibrateSampler's cfg "
               "list); another value is refused, because the fitted steps hold for the cfg they were fitted at.")


# --------------------------------------------------------------------------- pure helpers

def parse_nfe_list(text: str) -> tuple[int, ...]:
    """'4,5,6,8,10' -> (4, 5, 6, 8, 10): the step counts (NFE) to calibrate, sorted, each once."""
    values = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        if not part.isdigit() or not 1 <= int(part) <= MAX_NFE:
            raise KBError(f"nfe {text!r}: {part!r} is not a whole number of model evaluations from 1 to {MAX_NFE}; "
                          "write the step counts to calibrate separated by commas, e.g. 4,5,6,8,10.")
        values.append(int(part))
    if not values:
        raise KBError("nfe is empty; write the step counts to calibrate separated by commas, e.g. 4,5,6,8,10.")
    return tuple(sorted(set(values)))


def parse_cfg_list(text: str) -> tuple[float, ...]:
    """'3,7.5' -> (3.0, 7.5): the guidance scales to calibrate, sorted, each once."""
    values = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and 0.0 <= value <= MAX_CFG):
            raise KBError(f"cfg {text!r}: {part!r} is not a guidance scale from 0 to {MAX_CFG:g}; write the cfg values "
                          "you sample with separated by commas, e.g. 7 or 3,7.5.")
        values.append(value)
    if not values:
        raise KBError("cfg is empty; write the cfg values you sample with separated by commas, e.g. 7 or 3,7.5.")
    return tuple(sorted(set(values)))


def same_cfg(a: float, b: float) -> bool:
    """Two cfg values the widgets (step 0.1, rounded to 0.01) and the calibration's JSON agree on."""
    return abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(a)))


def check_covered(calibration, nfe: int, cfg: float) -> None:
    """What a node can check before its run: the calibration holds this N and this cfg (KBError naming the calibrated)."""
    nfe_values = [int(n) for n in calibration.nfe_values]
    if int(nfe) not in nfe_values:
        raise KBError(f"the knowledge base is calibrated for {nfe_values} steps (model evaluations), not {nfe}; set "
                      f"steps to one of them, or add {nfe} to {CALIBRATE_NODE}'s nfe list and run it again.")
    cfgs = [float(c) for c in calibration.cfgs]
    if not any(same_cfg(cfg, c) for c in cfgs):
        raise KBError(f"the knowledge base is calibrated for cfg {', '.join(f'{c:g}' for c in cfgs)}, not {cfg:g}; set cfg to one "
                      f"of them, or add {cfg:g} to {CALIBRATE_NODE}'s cfg list and run it again.")


def check_sigmas(sigmas: torch.Tensor, choice) -> None:
    """The SIGMAS a run was given are the calibrated schedule of `choice` (its coefficients hold on that schedule only)."""
    given = sigmas.detach().float().cpu().reshape(-1)
    wanted = torch.as_tensor(choice.sigmas).detach().float().cpu().reshape(-1)
    if given.shape != wanted.shape or not torch.allclose(given, wanted, rtol=SIGMAS_RTOL, atol=1e-6):
        raise KBError(f"the SIGMAS are not the schedule calibrated for {choice.nfe} steps at cfg {choice.cfg:g} "
                      f"({len(wanted) - 1} steps from sigma {float(wanted[0]):.4g}, got {len(given) - 1} from "
                      f"{float(given[0]) if len(given) else float('nan'):.4g}); connect {SIGMAS_NODE} with the same "
                      "knowledge base, steps and cfg (a partial denoise or a split schedule is not calibrated).")


def check_guider_cfg(guider, cfg: float) -> None:
    """A GUIDER with a single cfg (CFGGuider and its kind) must use the cfg the SAMPLER was set to."""
    guider_cfg = getattr(guider, "cfg", None)
    if isinstance(guider_cfg, (int, float)) and not same_cfg(guider_cfg, cfg):
        raise KBError(f"the GUIDER samples at cfg {guider_cfg:g} but SamplerReDiCalibrated is set to cfg {cfg:g}; set "
                      "both to the same calibrated value.")


def choice_text(choice, evaluations: Evaluations | None = None) -> str:
    """What ran: the calibration's summary line, then which sampler ran (saying so when it is a built-in one)."""
    if choice.kind == "builtin":
        ran = (f"Ran the built-in {choice.sampler_name}/{choice.schedule} ({choice.steps} steps): the held-out check's "
               f"choice for this model at {choice.nfe} steps.")
    else:
        ran = f"Ran the calibrated sampler on its {choice.schedule} schedule ({choice.steps} steps)."
    lines = [choice.summary_line(), ran]
    if evaluations is not None and evaluations.total():  # counted at the denoiser; a run that counted none says nothing
        lines.append(f"{evaluations.total()} model evaluations in all ({evaluations.describe()}).")
    return "\n".join(lines)


def calibration_text(calibration, model, nfe_values, cfgs, latent_shape) -> str:
    """One line per calibrated (cfg, N): 'best for this model at N steps: ...' (cfg named when there are several)."""
    lines = []
    for cfg in cfgs:
        for nfe in nfe_values:
            line = calibration.choice(model, cfg, latent_shape, nfe).summary_line()
            lines.append(f"cfg {cfg:g}: {line}" if len(cfgs) > 1 else line)
    return "\n".join(lines)


class CalibratedSampler(comfy.samplers.Sampler):
    """The SAMPLER of SamplerReDiCalibrated: what the calibration stored for (model, cfg, latent size, N), resolved
    when the run starts (only then are the model, the GUIDER's cfg, the latent and the SIGMAS known)."""

    def __init__(self, calibration, nfe: int, cfg: float, on_result=None):
        self.calibration, self.nfe, self.cfg, self.on_result = calibration, int(nfe), float(cfg), on_result

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        # model_wrap is the GUIDER: its model_patcher is the model the run samples (EasyCache and LoRAs included).
        check_guider_cfg(model_wrap, self.cfg)
        choice = self.calibration.choice(model_wrap.model_patcher, self.cfg, tuple(noise.shape[1:]), self.nfe)
        check_sigmas(sigmas, choice)
        evaluations = Evaluations(noise.shape[0])
        samples = choice.ksampler(evaluations).sample(model_wrap, sigmas, extra_args, callback, noise, latent_image,
                                                      denoise_mask, disable_pbar)
        text = choice_text(choice, evaluations)
        log.info("ReDi calibrated: %s", text.replace("\n", " "))
        if self.on_result is not None:
            self.on_result(text)
        return samples


# --------------------------------------------------------------------------- nodes

class ReDiCalibrateSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=CALIBRATE_NODE,
            display_name="ReDi Calibrate Sampler",
            category=CATEGORY,
            description="Calibrates a few-step sampler for your model and stores it with the knowledge base: per step count "
                        "it runs converged teacher trajectories for (prompt, seed) pairs, fits a schedule and a few "
                        "coefficients per step of a multistep update, and checks the result on held-out teachers against "
                        "every built-in sampler x scheduler, keeping the winner (the calibrated sampler, or the best "
                        "built-in choice). Once per model, cfg and size; interrupting keeps what is done and a rerun "
                        "resumes. ReDi Calibrated Sampler then samples with it.",
            inputs=[
                io.Model.Input("model", tooltip="The model to calibrate for; the calibrated sampler refuses any other "
                                                "model (LoRAs arrive through it)."),
                io.Clip.Input("clip", tooltip="Text encoder for the teachers' prompts."),
                io.String.Input("nfe", default="4,5,6,8,10",
                                tooltip="Step counts (model evaluations per image) to calibrate, separated by commas. "
                                        "Only these can be sampled later; each one adds calibration time."),
                io.String.Input("cfg", default="7.0",
                                tooltip="Guidance scales to calibrate, separated by commas (the cfg you sample with). "
                                        "Each one is calibrated on its own, so calibration time grows with the list."),
                io.Int.Input("teachers", default=128, min=4, max=100000,
                             tooltip="(prompt, seed) pairs whose converged trajectories the fit and the held-out check "
                                     "use (a quarter is held out; under 16 the calibrated sampler cannot win, so a "
                                     "built-in choice is kept). More = a steadier fit and a check that can tell "
                                     "closer samplers apart, at proportionally more time; fewer = faster, noisier."),
                io.String.Input("negative_prompt", default="", multiline=True,
                                tooltip="Negative prompt of the teachers; use the one you sample with."),
                KnowledgeBaseType.Input("knowledge_base", optional=True,
                                        tooltip="Its entries' prompts and seeds become the teachers and the calibration "
                                                "is stored with it (from ReDiLoadKnowledgeBase or BuildKnowledgeBase). "
                                                "Leave it empty to calibrate from the prompts below instead."),
                io.String.Input("prompts", multiline=True, default="", optional=True,
                                tooltip="One prompt per line, for a calibration without a ReDi knowledge base: a "
                                        "knowledge base named kb_name is created to hold the teachers and the "
                                        "calibration. Prompts close to what you generate make the fit fit your use."),
                io.String.Input("kb_name", default="my-calibration", optional=True,
                                tooltip="Used only with no knowledge_base connected: folder under models/redi_kb that "
                                        "holds the calibration made from the prompts; reuse the name to resume or extend."),
                io.Latent.Input("latent_image", optional=True,
                                tooltip="An empty latent of the size you will sample at (the calibration holds for that "
                                        "size only). Default: the knowledge base's size; needed without one."),
                io.Int.Input("teacher_steps", default=100, min=8, max=4000, optional=True,
                             tooltip="Steps of each teacher run (DPM++ 2M, Karras): the converged image the fit aims at. "
                                     "More = closer to the true image, slower; the summary's doubling figure says "
                                     "whether it was enough. Lower only for a quick first try."),
                io.Combo.Input("compare_with", options=list(BUILTIN_GRIDS), default="every built-in choice", optional=True,
                               tooltip="The built-in sampler x scheduler choices the held-out check compares with. "
                                       "'common choices' (euler, dpmpp_2m, deis, uni_pc x normal, karras, AYS, GITS) is "
                                       "quicker but may miss the best built-in choice for your model."),
            ],
            outputs=[KnowledgeBaseType.Output(display_name="knowledge_base",
                                              tooltip="The knowledge base, now holding the calibration: connect it to "
                                                      "ReDi Calibrated Sampler or ReDi Calibrated Sigmas."),
                     io.String.Output(display_name="summary",
                                      tooltip="One line per step count: what the held-out check chose for this model.")],
        )

    @classmethod
    def validate_inputs(cls, nfe: str | None = None, cfg: str | None = None):
        return refusal(lambda: nfe is None or parse_nfe_list(nfe), lambda: cfg is None or parse_cfg_list(cfg))

    @classmethod
    def execute(cls, model, clip, nfe: str, cfg: str, teachers: int, negative_prompt: str, knowledge_base=None,
                prompts: str = "", kb_name: str = "my-calibration", latent_image=None, teacher_steps: int = 100,
                compare_with: str = "every built-in choice") -> io.NodeOutput:
        nfe_values, cfgs = parse_nfe_list(nfe), parse_cfg_list(cfg)
        lines = [p.strip() for p in (prompts or "").splitlines() if p.strip()]
        if knowledge_base is None and not lines:
            raise KBError(f"{CALIBRATE_NODE} needs teachers: connect a knowledge base (ReDiLoadKnowledgeBase or "
                          "BuildKnowledgeBase), or write prompts, one per line.")
        if knowledge_base is None and latent_image is None:
            raise KBError(f"{CALIBRATE_NODE} without a knowledge base needs the size to calibrate for: connect an empty "
                          "latent (EmptyLatentImage) of the size you will sample at to latent_image.")
        latent_shape = None if latent_image is None else tuple(int(s) for s in latent_image["samples"].shape[1:])
        target = knowledge_base if knowledge_base is not None else str(kb_path(kb_name, for_writing=True))
        pbar = comfy.utils.ProgressBar(1)
        samplers, schedules = BUILTIN_GRIDS[compare_with]
        calibration = calibrate_sampler(
            target, model, clip_encoder(clip), nfe=nfe_values, cfgs=cfgs, teachers=teachers,
            negative_prompt=negative_prompt, latent_shape=latent_shape, prompts=lines or None,
            progress=lambda done, total: pbar.update_absolute(done, total),
            should_stop=comfy.model_management.processing_interrupted,
            log=lambda message: log.info("ReDi calibrate: %s", message), fine_steps=int(teacher_steps),
            samplers=samplers, schedules=schedules)
        # Stopped by the user: what is done is stored, a rerun resumes; end this run as ComfyUI's interrupt does.
        comfy.model_management.throw_exception_if_processing_interrupted()
        if calibration is None:
            raise KBError(f"{CALIBRATE_NODE} was stopped before it finished; what it finished is stored, run it again "
                          "to resume.")
        kb = open_kb(Path(knowledge_base.path) if knowledge_base is not None else kb_path(kb_name))
        text = calibration_text(calibration, model, nfe_values, cfgs, latent_shape or tuple(calibration.latent_shape))
        log.info("ReDi calibrate: %s", text.replace("\n", " | "))
        return io.NodeOutput(kb, text, ui={"text": [text]})


class ReDiCalibratedSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ReDiCalibratedSampler",
            display_name="ReDi Calibrated Sampler",
            category=CATEGORY,
            description="KSampler drop-in for any seed and prompt: runs what the knowledge base's calibration "
                        f"({CALIBRATE_NODE}) chose for this model at this number of steps: the calibrated sampler on its "
                        "schedule, or the built-in sampler x scheduler that beat it on held-out teachers (the summary "
                        "says which ran). Refuses another model, and a cfg, size or step count that was not calibrated.",
            inputs=[
                io.Model.Input("model", tooltip="The model the calibration was made for (another one is refused)."),
                io.Conditioning.Input("positive", tooltip="Positive conditioning."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning."),
                io.Latent.Input("latent_image", tooltip="An empty latent of the calibrated size; its batch size sets the "
                                                        "number of images."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed, drawn as KSampler draws it (same seed, same noise)."),
                KnowledgeBaseType.Input("knowledge_base", tooltip=f"A calibrated knowledge base (from {CALIBRATE_NODE}, or "
                                                                  "ReDiLoadKnowledgeBase of one calibrated before)."),
                io.Int.Input("steps", default=8, min=1, max=MAX_NFE, tooltip=STEPS_TOOLTIP),
                io.Float.Input("cfg", default=7.0, min=0.0, max=MAX_CFG, step=0.1, round=0.01, tooltip=CFG_TOOLTIP),
            ],
            outputs=[io.Latent.Output(display_name="LATENT")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed: int, knowledge_base, steps: int,
                cfg: float) -> io.NodeOutput:
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"].float())
        calibration = load_sampler_calibration(knowledge_base)
        check_covered(calibration, steps, cfg)
        choice = calibration.choice(model, cfg, tuple(latent.shape[1:]), steps)
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        evaluations = Evaluations(latent.shape[0])
        samples = comfy.sample.sample_custom(
            model, noise, cfg, choice.ksampler(evaluations), torch.as_tensor(choice.sigmas).float(), positive, negative,
            latent, noise_mask=latent_image.get("noise_mask"), callback=preview_callback(model, choice.steps),
            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        text = choice_text(choice, evaluations)
        log.info("ReDi calibrated: %s", text.replace("\n", " "))
        return io.NodeOutput(with_samples(latent_image, samples), ui={"text": [text]})


class ReDiCalibratedSigmas(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=SIGMAS_NODE,
            display_name="ReDi Calibrated Sigmas",
            category=CATEGORY,
            description="The schedule the knowledge base's calibration chose for this model at this number of steps and "
                        "cfg, as SIGMAS for SamplerCustomAdvanced; pair it with SamplerReDiCalibrated (same knowledge "
                        "base, steps and cfg), which refuses any other SIGMAS.",
            inputs=[
                io.Model.Input("model", tooltip="The model the calibration was made for (another one is refused)."),
                KnowledgeBaseType.Input("knowledge_base", tooltip=f"A calibrated knowledge base (from {CALIBRATE_NODE})."),
                io.Int.Input("steps", default=8, min=1, max=MAX_NFE, tooltip=STEPS_TOOLTIP),
                io.Float.Input("cfg", default=7.0, min=0.0, max=MAX_CFG, step=0.1, round=0.01, tooltip=CFG_TOOLTIP),
            ],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def execute(cls, model, knowledge_base, steps: int, cfg: float) -> io.NodeOutput:
        calibration = load_sampler_calibration(knowledge_base)
        check_covered(calibration, steps, cfg)
        choice = calibration.choice(model, cfg, tuple(calibration.latent_shape), steps)
        return io.NodeOutput(torch.as_tensor(choice.sigmas).detach().float().cpu().clone())


class SamplerReDiCalibrated(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SamplerReDiCalibrated",
            display_name="Sampler ReDi Calibrated",
            category=CATEGORY,
            description="What the knowledge base's calibration chose at this number of steps and cfg, as a SAMPLER for "
                        "SamplerCustomAdvanced: works with any GUIDER (CFGGuider, the pack's guiders) and model patches "
                        f"such as EasyCache. The SIGMAS must come from {SIGMAS_NODE} with the same settings; the model, "
                        "the GUIDER's cfg and the latent size are checked when the run starts, and the node shows which "
                        "sampler ran.",
            inputs=[
                KnowledgeBaseType.Input("knowledge_base", tooltip=f"A calibrated knowledge base (from {CALIBRATE_NODE})."),
                io.Int.Input("steps", default=8, min=1, max=MAX_NFE, tooltip=STEPS_TOOLTIP),
                io.Float.Input("cfg", default=7.0, min=0.0, max=MAX_CFG, step=0.1, round=0.01,
                               tooltip=CFG_TOOLTIP + " A GUIDER with its own cfg (CFGGuider) must use the same value."),
            ],
            outputs=[io.Sampler.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, knowledge_base, steps: int, cfg: float) -> io.NodeOutput:
        calibration = load_sampler_calibration(knowledge_base)
        check_covered(calibration, steps, cfg)
        # The run happens later, inside SamplerCustomAdvanced: its summary goes to this node as progress text.
        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        return io.NodeOutput(CalibratedSampler(calibration, steps, cfg,
                                               on_result=lambda text: feedback.show_text(node_id, text)))


NODES = [ReDiCalibrateSampler, ReDiCalibratedSampler, ReDiCalibratedSigmas, SamplerReDiCalibrated]
