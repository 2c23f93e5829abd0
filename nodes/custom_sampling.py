"""ReDi as parts of ComfyUI's custom-sampling graph: a SAMPLER, a NOISE and the KB's SIGMAS.

SamplerCustomAdvanced(noise=ReDiKBNoise, guider=CFGGuider (or any GUIDER), sampler=SamplerReDi,
sigmas=BasicScheduler or ReDiKBSigmas) runs the same Algorithm 2 as the ReDiSampler node.
SamplerReDiCorrected is the KB-corrected coarse Euler solver as a SAMPLER (any noise, the KB's SIGMAS).
"""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..kb_tools import KBNoise, corrected_ksampler, make_corrected_run, make_run, parse_grid, redi_ksampler
from . import feedback
from .common import CATEGORY, GUARD_TOOLTIP, WEIGHT_MODES, error_guard_inputs, kb_input, tolerance_of


class SamplerReDi(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SamplerReDi",
            display_name="Sampler ReDi",
            category=CATEGORY,
            description="ReDi as a SAMPLER for SamplerCustomAdvanced: runs the knowledge base's sampler to the key step, retrieves "
                        "the nearest stored trajectories, blends their values, jumps to the value step and finishes, skipping "
                        "value_step - key_step model evaluations per item (items whose retrieval fits poorly continue from their "
                        "own key-step latent). Works with any GUIDER; the SIGMAS must be the KB's schedule.",
            inputs=[
                kb_input(),
                io.Int.Input("key_step", default=5, min=1, max=1000, tooltip="Step where the query is taken (a stored step of the KB)."),
                io.Int.Input("value_step", default=10, min=1, max=1000, tooltip="Step where sampling resumes (a stored step >= key_step)."),
                io.Int.Input("neighbours", default=3, min=1, max=512, tooltip="H, stored trajectories to blend."),
                io.Combo.Input("weight_mode", options=WEIGHT_MODES, default="lstsq",
                               tooltip="lstsq: least squares (paper). affine: weights sum to 1. ridge: shrunk weights."),
                io.Float.Input("guard", default=-1.0, min=-1.0, max=100.0, step=0.01, tooltip=GUARD_TOOLTIP),
                *error_guard_inputs(),
            ],
            outputs=[io.Sampler.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, knowledge_base, key_step, value_step, neighbours, weight_mode, guard, error_tolerance: float = -1.0,
                adaptive_skip: bool = False) -> io.NodeOutput:
        tolerance = tolerance_of(error_tolerance, guard, knowledge_base, key_step, neighbours)
        run = make_run(knowledge_base, key_step, value_step, neighbours, weight_mode, guard, tolerance, adaptive_skip)
        # The run happens later, inside SamplerCustomAdvanced: remember which node to report to
        # (no hidden inputs when the node is called directly, outside a prompt: then only the log).
        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        run.on_result = lambda result: feedback.show_text(node_id, feedback.resume_text(result))
        return io.NodeOutput(redi_ksampler(run))


class SamplerReDiCorrected(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SamplerReDiCorrected",
            display_name="Sampler ReDi Corrected (coarse Euler)",
            category=CATEGORY,
            description="A SAMPLER for SamplerCustomAdvanced that runs Euler on a coarse grid of the knowledge base's schedule "
                        "(nfe model evaluations) and corrects each coarse step by how far the same step lands from the fine "
                        "trajectory for the query's nearest stored trajectories (no extra evaluation). Pays off for the KB's own "
                        "seed (e.g. ReDiKBNoise, or a learning KB of your seed); for other seeds it can be worse than plain "
                        "Euler. Needs a KB built with euler; the SIGMAS must be the KB's schedule (ReDiKBSigmas).",
            inputs=[
                kb_input(),
                io.Int.Input("nfe", default=6, min=1, max=1000,
                             tooltip="Model evaluations per image (the coarse grid's steps), spread by grid 'auto'. Fewer = "
                                     "cheaper, further from the full-step output. With an explicit grid it must equal "
                                     "the grid's number of segments (a different value is refused)."),
                io.String.Input("grid", default="auto",
                                tooltip="'auto': a short first and last step, the rest evenly spread. Or the schedule's steps "
                                        "to evaluate, e.g. '0,2,6,10,14,18,20' (from 0 to the KB's steps; segments whose start, "
                                        "start + 1 and end the KB stores are corrected); nfe must then equal its number of segments."),
                io.Int.Input("neighbours", default=3, min=1, max=512, tooltip="H, stored trajectories whose errors are blended."),
                io.Combo.Input("weight_mode", options=WEIGHT_MODES, default="lstsq",
                               tooltip="lstsq: least squares on the keys (paper). affine: weights sum to 1. ridge: shrunk weights."),
            ],
            outputs=[io.Sampler.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, knowledge_base, nfe, grid, neighbours, weight_mode) -> io.NodeOutput:
        steps = parse_grid(grid, knowledge_base.settings.steps, nfe)
        run = make_corrected_run(knowledge_base, steps, neighbours, weight_mode)
        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        run.on_result = lambda r: feedback.show_text(node_id, r.summary())
        return io.NodeOutput(corrected_ksampler(run))


class ReDiKBNoise(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ReDiKBNoise",
            display_name="ReDi KB Noise",
            category=CATEGORY,
            description="NOISE for SamplerCustomAdvanced: every batch item starts from the knowledge base's seed noise, as the "
                        "stored trajectories did (the official ReDi protocol), so queries find near keys.",
            inputs=[kb_input()],
            outputs=[io.Noise.Output()],
        )

    @classmethod
    def execute(cls, knowledge_base) -> io.NodeOutput:
        return io.NodeOutput(KBNoise(knowledge_base))


class ReDiKBSigmas(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ReDiKBSigmas",
            display_name="ReDi KB Sigmas",
            category=CATEGORY,
            description="The knowledge base's own noise schedule as SIGMAS (exactly what its trajectories were sampled on).",
            inputs=[kb_input()],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def execute(cls, knowledge_base) -> io.NodeOutput:
        return io.NodeOutput(torch.tensor(knowledge_base.settings.sigmas, dtype=torch.float32))


NODES = [SamplerReDi, SamplerReDiCorrected, ReDiKBNoise, ReDiKBSigmas]
