"""T-Stitch nodes: the small model runs the early steps, the large model the rest, in one sampler run.

TStitchSampler is the KSampler-style node; TStitchGuider is the GUIDER for SamplerCustomAdvanced.
"""
from __future__ import annotations

from comfy_api.latest import io

from ..kb_tools import SWITCH_MODES, node_switch, sampler_names, scheduler_names, tstitch_guider, tstitch_sample
from .common import CATEGORY, preview_callback


def switch_inputs() -> list[io.Input]:
    return [
        io.Combo.Input("switch_mode", options=list(SWITCH_MODES), default="fraction",
                       tooltip="How the hand-over point is given: 'fraction' of the steps, or a noise level ('sigma')."),
        io.Float.Input("small_fraction", default=0.4, min=0.0, max=1.0, step=0.01,
                       tooltip="Fraction of the steps run by the small model (switch_mode 'fraction'): 0 = large model only, 1 = small model only. Higher = cheaper, less of the large model's detail; the default follows the paper."),
        io.Float.Input("switch_sigma", default=1.0, min=0.0, max=1000.0, step=0.01,
                       tooltip="Switch noise level (switch_mode 'sigma'): the small model evaluates every noise level above it. Sigmas are in the model's own units (about 14.6 down to 0 for SD1.x/SDXL, 1 down to 0 for flow models)."),
    ]


class TStitchSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TStitchSampler",
            display_name="T-Stitch Sampler (small model first)",
            category=CATEGORY,
            description=(
                "Trajectory Stitching (T-Stitch, ICLR 2024): a small diffusion model runs the first steps of the "
                "schedule and a large model of the same family finishes them, on one noise schedule (the large "
                "model's). The small model lays out the global structure cheaply; the large model adds the detail. "
                "Both models must share the latent space, prediction type and noise schedule; a mismatched pair is "
                "refused before sampling. One sampler run spans the schedule, so multistep samplers (dpmpp_2m, uni_pc, "
                "lms, ...) keep their history across the hand-over."
            ),
            inputs=[
                io.Model.Input("small_model", tooltip="The cheap model that runs the early, high-noise steps."),
                io.Model.Input("large_model", tooltip="The expensive model that runs the remaining steps; its noise schedule is used for the whole run."),
                io.Conditioning.Input("small_positive", tooltip="Positive conditioning for the small model, encoded with the small model's own text encoder."),
                io.Conditioning.Input("small_negative", tooltip="Negative conditioning for the small model, encoded with the small model's own text encoder."),
                io.Conditioning.Input("large_positive", tooltip="Positive conditioning for the large model, encoded with the large model's own text encoder."),
                io.Conditioning.Input("large_negative", tooltip="Negative conditioning for the large model, encoded with the large model's own text encoder."),
                io.Latent.Input("latent_image", tooltip="The latent to denoise (e.g. an Empty Latent Image)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="The random seed for the initial noise. Batch item i starts from the noise of seed + i, so every item is reproducible on its own."),
                io.Combo.Input("sampler_name", options=sampler_names(), default="euler",
                               tooltip="The sampling algorithm, shared by both models."),
                io.Combo.Input("scheduler", options=scheduler_names(), default="normal",
                               tooltip="How the noise levels are spread over the steps (computed for the large model)."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Total number of steps, small and large model together."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale, used by both models."),
                *switch_inputs(),
            ],
            outputs=[io.Latent.Output(tooltip="The denoised latent.")],
        )

    @classmethod
    def execute(cls, small_model, large_model, small_positive, small_negative, large_positive, large_negative,
                latent_image, seed, sampler_name, scheduler, steps, cfg, switch_mode, small_fraction,
                switch_sigma) -> io.NodeOutput:
        out, result = tstitch_sample(
            small_model, large_model, small_positive=small_positive, small_negative=small_negative,
            large_positive=large_positive, large_negative=large_negative, latent=latent_image, seed=seed,
            sampler_name=sampler_name, scheduler=scheduler, steps=steps, cfg=cfg, switch_mode=switch_mode,
            small_fraction=small_fraction, switch_sigma=switch_sigma,
            callback=preview_callback(large_model, int(steps)))
        return io.NodeOutput(out)


class TStitchGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TStitchGuider",
            display_name="T-Stitch Guider (small model first)",
            category=CATEGORY,
            description=(
                "T-Stitch as a GUIDER for SamplerCustomAdvanced: every model evaluation above the switch noise level goes "
                "to the small model's guider, the rest to the large model's, in one sampler run (a multistep sampler keeps "
                "its history across the hand-over). Both models are loaded together for the run. The pair is checked "
                "before sampling. With the same model in both guiders it is a prompt switch (e.g. content, then style)."
            ),
            inputs=[
                io.Guider.Input("small_guider", tooltip="Guider of the cheap model (e.g. CFGGuider with its own conditioning) for the early, high-noise steps."),
                io.Guider.Input("large_guider", tooltip="Guider of the large model for the remaining steps; its model previews the run."),
                *switch_inputs(),
            ],
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def execute(cls, small_guider, large_guider, switch_mode, small_fraction, switch_sigma) -> io.NodeOutput:
        return io.NodeOutput(tstitch_guider(small_guider, large_guider, node_switch(switch_mode, small_fraction, switch_sigma)))


NODES = [TStitchSampler, TStitchGuider]
