"""The four-node ReDi chain: ReDiPartialSample -> ReDiRetrieve -> ReDiBlend -> ReDiResumeSample (ReDi Algorithm 2).

Thin V3 layer over kb_tools.samplers.redi_chain; every number a node computes comes from there. Each LATENT
carries what its part of Algorithm 2 made under the key "redi" (a KeyQuery after ReDiPartialSample, a
BlendedValue after ReDiBlend), so the chain needs no extra wires and a LATENT from elsewhere is refused
with a clear fix.
"""
from __future__ import annotations

from comfy_api.latest import io

from ..kb_tools import (
    BlendedValue,
    KBError,
    KeyQuery,
    QueryNeighbours,
    blend_at,
    check_recipe,
    find_neighbours,
    resume,
    sample_to_key,
    sampler_names,
)
from . import feedback
from .common import (
    CATEGORY,
    FROM_KB,
    GUARD_TOOLTIP,
    WEIGHT_MODES,
    NeighboursType,
    carried,
    common_sampling_inputs,
    error_guard_inputs,
    item_seeds,
    kb_input,
    log,
    preview_callback,
    seed_inputs,
    small_model_inputs,
    tolerance_of,
    with_samples,
)


class ReDiPartialSample(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ReDiPartialSample",
            display_name="ReDi Partial Sample",
            category=CATEGORY,
            description="Samples the first key_step steps and outputs the partly denoised latent (the retrieval query, ReDi Algorithm 2). "
                        "Sampler, scheduler, steps and cfg come from the knowledge base.",
            inputs=[
                *common_sampling_inputs(),
                io.Latent.Input("latent_image", tooltip="An empty latent of the KB's size; its batch size sets how many images are made."),
                kb_input(),
                io.Int.Input("key_step", default=5, min=1, max=1000, tooltip="Step where the query is taken; must be a stored step of the KB. Later keys cost more steps but match more closely."),
                *seed_inputs(),
                io.Combo.Input("sampler_override", options=[FROM_KB, *sampler_names()], default=FROM_KB, optional=True,
                               tooltip="Leave 'from KB'. A different value is refused: the KB's trajectories only hold for its own sampler."),
                io.Int.Input("steps_override", default=0, min=0, max=1000, optional=True, tooltip="0 = from KB. A different value is refused."),
                *small_model_inputs(),
            ],
            outputs=[io.Latent.Output(display_name="query_latent", tooltip="Latent at the key step (leftover noise), carrying the ReDi state.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, knowledge_base, key_step, seed_mode, seed,
                sampler_override=FROM_KB, steps_override=0, small_model=None, small_positive=None, small_negative=None) -> io.NodeOutput:
        # The overrides exist only to be refused: removing them would shift the widget values of saved UI workflows.
        check_recipe(knowledge_base, sampler=None if sampler_override == FROM_KB else sampler_override,
                          steps=steps_override or None)
        query = sample_to_key(knowledge_base, model, positive, negative, latent_image["samples"].float(),
                                   item_seeds(knowledge_base, latent_image, seed_mode, seed), key_step,
                                   small_model=small_model, small_positive=small_positive, small_negative=small_negative,
                                   callback=preview_callback(model, key_step))
        return io.NodeOutput(with_samples(latent_image, query.latent, query))


class ReDiRetrieve(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ReDiRetrieve",
            display_name="ReDi Retrieve",
            category=CATEGORY,
            description="Finds the H stored trajectories whose key-step latent is nearest the query (FAISS), per batch item "
                        "(ReDi Algorithm 2, line 6). ReDiBlend then fits their weights and blends their values.",
            inputs=[
                io.Latent.Input("query_latent", tooltip="The output of ReDiPartialSample."),
                kb_input(),
                io.Int.Input("neighbours", default=3, min=1, max=512,
                             tooltip="H, neighbours to combine. More = a closer fit of the query from more stored "
                                     "trajectories; the default follows the paper; very dense KBs profit from more."),
                io.Vae.Input("vae", optional=True, tooltip="Optional: connect the checkpoint's VAE to see the retrieved trajectories as images on this node "
                                                           "(their latents at the KB's last stored step, decoded)."),
            ],
            outputs=[NeighboursType.Output(display_name="neighbours")],
        )

    @classmethod
    def execute(cls, query_latent, knowledge_base, neighbours, vae=None) -> io.NodeOutput:
        query = carried(query_latent, "ReDiRetrieve", KeyQuery, "ReDiPartialSample")
        if query.kb.path != knowledge_base.path:
            raise KBError(f"the query was made for knowledge base {query.kb.path} but {knowledge_base.path} is connected; connect the same KB to both nodes.")
        found = find_neighbours(query, neighbours)
        log.info(found.summary())
        return io.NodeOutput(found, ui=feedback.retrieve_ui(knowledge_base, found, vae))


class ReDiBlend(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ReDiBlend",
            display_name="ReDi Blend",
            category=CATEGORY,
            description="Combines the neighbours' stored latents at the value step with the weights that best rebuild the query from their keys "
                        "(least squares, as in the paper). The output is where sampling resumes.",
            inputs=[
                NeighboursType.Input("neighbours", tooltip="The output of ReDiRetrieve."),
                io.Int.Input("value_step", default=10, min=1, max=1000, tooltip="Step to resume at; value_step - key_step steps are skipped. A larger gap is faster but less faithful."),
                io.Combo.Input("weight_mode", options=WEIGHT_MODES, default="lstsq",
                               tooltip="lstsq: unconstrained least squares (paper). affine: weights sum to 1 (safer with few neighbours). ridge: shrunk weights (stable with many)."),
            ],
            outputs=[io.Latent.Output(display_name="value_latent", tooltip="Blended latent at the value step, carrying the ReDi state.")],
        )

    @classmethod
    def execute(cls, neighbours, value_step, weight_mode) -> io.NodeOutput:
        if not isinstance(neighbours, QueryNeighbours):
            raise KBError("ReDiBlend needs the neighbours that come out of ReDiRetrieve; connect ReDiRetrieve's output.")
        value = blend_at(neighbours, value_step, weight_mode)
        return io.NodeOutput({"samples": value.latent, "redi": value})


class ReDiResumeSample(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ReDiResumeSample",
            display_name="ReDi Resume Sample",
            category=CATEGORY,
            description="Finishes sampling from the blended value (steps value_step..end). When the retrieval fit is poor (residual above the guard), "
                        "that item continues from its own key-step latent instead, so quality never drops below the plain sampler.",
            inputs=[
                *common_sampling_inputs(),
                io.Latent.Input("value_latent", tooltip="The output of ReDiBlend."),
                io.Float.Input("guard", default=-1.0, min=-1.0, max=100.0, step=0.01,
                               tooltip=GUARD_TOOLTIP),
                error_guard_inputs()[0],  # the blend is at one value step here: no adaptive skip
            ],
            outputs=[io.Latent.Output(display_name="LATENT")],
        )

    @classmethod
    def execute(cls, model, positive, negative, value_latent, guard, error_tolerance=-1.0) -> io.NodeOutput:
        value = carried(value_latent, "ReDiResumeSample", BlendedValue, "ReDiBlend")
        steps_left = value.plan.steps - value.plan.key_step
        result = resume(value, model, positive, negative, guard, callback=preview_callback(model, steps_left),
                             tolerance=tolerance_of(error_tolerance, guard, value.neighbours.query.kb, value.plan.key_step,
                                                    value.neighbours.nearest.ids.shape[1]))
        return io.NodeOutput(with_samples(value_latent, result.latent), ui=feedback.resume_ui(result))


NODES = [ReDiPartialSample, ReDiRetrieve, ReDiBlend, ReDiResumeSample]
