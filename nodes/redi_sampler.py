"""ReDiSampler: the whole of ReDi (Algorithm 2) as one KSampler-style node.

Thin V3 layer over kb_tools.samplers.redi: sample to the key step, retrieve, blend, jump to the value
step and finish, guarded so that a poor match falls back to plain sampling.
"""
from __future__ import annotations

from comfy_api.latest import io

from ..kb_tools import generate, make_run
from . import feedback
from .common import (
    CATEGORY,
    GUARD_TOOLTIP,
    WEIGHT_MODES,
    common_sampling_inputs,
    error_guard_inputs,
    item_seeds,
    kb_input,
    preview_callback,
    seed_inputs,
    small_model_inputs,
    tolerance_of,
    with_samples,
)


class ReDiSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ReDiSampler",
            display_name="ReDi Sampler",
            category=CATEGORY,
            description="KSampler drop-in with ReDi: samples to the key step, retrieves similar stored trajectories, jumps to the value step "
                        "and finishes, skipping value_step - key_step model evaluations. Guarded: a poor match falls back to plain sampling.",
            inputs=[
                *common_sampling_inputs(),
                io.Latent.Input("latent_image", tooltip="An empty latent of the KB's size."),
                kb_input(),
                io.Int.Input("key_step", default=5, min=1, max=1000, tooltip="Step where the query is taken (a stored step of the KB)."),
                io.Int.Input("value_step", default=10, min=1, max=1000, tooltip="Step where sampling resumes (a stored step >= key_step)."),
                io.Int.Input("neighbours", default=3, min=1, max=512, tooltip="H, neighbours to combine."),
                io.Combo.Input("weight_mode", options=WEIGHT_MODES, default="lstsq", tooltip="How neighbours are weighted (see ReDiBlend)."),
                io.Float.Input("guard", default=-1.0, min=-1.0, max=100.0, step=0.01, tooltip=GUARD_TOOLTIP),
                *seed_inputs(),
                io.Conditioning.Input("resume_positive", optional=True,
                                      tooltip="Stylization: conditioning for the resumed steps (content + style), while positive (content) makes the key."),
                *small_model_inputs(),
                *error_guard_inputs(),
            ],
            outputs=[io.Latent.Output(display_name="LATENT")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, knowledge_base, key_step, value_step, neighbours, weight_mode,
                guard, seed_mode, seed, resume_positive=None, small_model=None, small_positive=None, small_negative=None,
                error_tolerance: float = -1.0, adaptive_skip: bool = False) -> io.NodeOutput:
        run = make_run(knowledge_base, key_step, value_step, neighbours, weight_mode, guard,
                            tolerance_of(error_tolerance, guard, knowledge_base, key_step, neighbours), adaptive_skip)
        result = generate(knowledge_base, model, positive, negative, latent_image["samples"].float(),
                               item_seeds(knowledge_base, latent_image, seed_mode, seed), run,
                               resume_positive=resume_positive, small_model=small_model, small_positive=small_positive,
                               small_negative=small_negative, callback=preview_callback(model, run.plan.steps))
        return io.NodeOutput(with_samples(latent_image, result.latent), ui=feedback.resume_ui(result))


NODES = [ReDiSampler]
