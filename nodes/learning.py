"""ReDiLearningSampler: ReDi against a knowledge base that learns from this workflow's own generations.

Thin V3 layer over kb_tools.samplers.redi_chain.generate_learning: the KB (models/redi_kb/<kb_name>) is created
on first use with this model and recipe; each generation runs ReDi against it, and the items
that were sampled in full (the first ones, and every item the guard refused) are appended, the
oldest shards dropped when the budget is reached. Blended items are never stored.
With solver "corrected euler" (kb_tools.samplers.learning.generate_learning_corrected) an item the
KB fits runs the KB-corrected coarse Euler solver at `nfe` evaluations instead, and is never stored either.
"""
from __future__ import annotations

from comfy_api.latest import io

from ..kb_tools import (
    KBBudget,
    KBError,
    Recipe,
    check_kb_name,
    generate_learning,
    generate_learning_corrected,
    learning_settings,
    parse_steps,
    sampler_names,
    scheduler_names,
)
from . import feedback
from .common import CATEGORY, WEIGHT_MODES, clip_encoder, kb_path, log, preview_callback, refusal, with_samples

# A learning KB stores no calibration, so -1 would mean the generic fallback 0.5, which accepts blends far worse
# than plain sampling at the same NFE (benchmarks/results/learning_kb*.md); hence the default 0.1.
LEARNING_GUARD_TOOLTIP = (
    "Largest accepted centered residual ||q - sum w key|| / (RMS spread of the KB's keys); an item above it is sampled in "
    "full (and learned). A learning KB stores no calibration, so -1 (auto) falls back to the generic 0.5, which is too "
    "loose for it; keep a small value. Lower = safer, fewer items skip steps; higher = more items blended or corrected, "
    "at more risk of a worse image.")

SOLVERS = ("redi blend", "corrected euler")
SOLVER_TOOLTIP = (
    "redi blend: ReDi jumps from key_step to value_step on a blend of the KB's states (nfe is not used). corrected "
    "euler: Euler on the coarse grid of nfe evaluations that SamplerReDiCorrected's grid 'auto' uses, each step "
    "corrected by the truncation error of the KB's neighbours (needs sampler 'euler'; 'auto' store_steps then stores "
    "every step; key_step and value_step are not used; the guard judges the fit at the grid's first corrected step, "
    "and a refused item is sampled in full and learned). Either pays off only for a seed the KB has seen (keep the "
    "seed, change the prompt a little); a new seed rarely fits and is then sampled in full. Fewer nfe saves more evaluations but strays "
    "further from the full-step output.")


class ReDiLearningSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ReDiLearningSampler",
            display_name="ReDi Learning Sampler",
            category=CATEGORY,
            description="A sampler whose knowledge base learns from your own generations: the first time it samples in full and "
                        "stores the trajectory in models/redi_kb/<kb_name> (created with this model and recipe); later, changing "
                        "the prompt a little with the same seed, ReDi finds your earlier trajectories and skips "
                        "value_step - key_step steps. Only items sampled in full are stored, never a blended one; the oldest "
                        "are dropped when the budget is full.",
            inputs=[
                io.Model.Input("model", tooltip="The model; the KB is bound to it (a KB of another model is refused)."),
                io.Clip.Input("clip", tooltip="Text encoder for the prompt (the KB stores the prompt text with each trajectory)."),
                io.String.Input("prompt", multiline=True, default="a photograph of a cat", tooltip="Positive prompt."),
                io.String.Input("negative_prompt", multiline=True, default="", tooltip="Negative prompt; the KB is bound to it."),
                io.Latent.Input("latent_image", tooltip="An empty latent; its size and batch size set the images made."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Batch item i uses seed + i. Keep it fixed while you iterate on the prompt: only a seed "
                                     "seen before finds near trajectories."),
                io.String.Input("kb_name", default="my-learning-kb",
                                tooltip="Folder under models/redi_kb; created on first use. One KB per model, recipe and negative prompt."),
                io.Combo.Input("sampler_name", options=sampler_names(), default="euler", tooltip="Sampler; the KB is bound to it."),
                io.Combo.Input("scheduler", options=scheduler_names(), default="normal", tooltip="Scheduler; the KB is bound to it."),
                io.Int.Input("steps", default=20, min=2, max=1000, tooltip="Total steps; the KB is bound to them."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01, tooltip="Guidance scale; the KB is bound to it."),
                io.String.Input("store_steps", default="auto",
                                tooltip="Steps stored per trajectory, e.g. '2,10'; 'auto' stores 10% to 80% of the schedule "
                                        "(every step with solver 'corrected euler'). With 'redi blend' it must include "
                                        "key_step and value_step."),
                io.Int.Input("key_step", default=2, min=1, max=1000,
                             tooltip="solver 'redi blend' only: step where the query is taken (a stored step). Later = "
                                     "closer matches, fewer steps skipped. Not used by 'corrected euler'."),
                io.Int.Input("value_step", default=10, min=1, max=1000,
                             tooltip="solver 'redi blend' only: step where a matched item resumes (a stored step >= "
                                     "key_step). Larger = more steps skipped, less faithful. Not used by 'corrected euler'."),
                io.Int.Input("neighbours", default=3, min=1, max=512, tooltip="H, stored trajectories to blend (fewer while the KB is smaller)."),
                io.Combo.Input("weight_mode", options=WEIGHT_MODES, default="lstsq", tooltip="How neighbours are weighted (see ReDiBlend)."),
                io.Float.Input("guard", default=0.1, min=-1.0, max=100.0, step=0.01, tooltip=LEARNING_GUARD_TOOLTIP),
                io.Int.Input("max_entries", default=10000, min=0, max=2**31 - 1,
                             tooltip="Budget: most trajectories kept (0 = no limit); above it the oldest are dropped whole."),
                io.Int.Input("max_megabytes", default=0, min=0, max=2**31 - 1,
                             tooltip="Budget: most MB of stored trajectories (0 = no limit); above it the oldest are dropped whole."),
                io.Combo.Input("solver", options=SOLVERS, default=SOLVERS[0], optional=True, tooltip=SOLVER_TOOLTIP),
                io.Int.Input("nfe", default=10, min=3, max=1000, optional=True,
                             tooltip="solver 'corrected euler' only: model evaluations of an item the KB corrects (the "
                                     "coarse grid's steps, spread as SamplerReDiCorrected's grid 'auto'); fewer than "
                                     "steps. Fewer = cheaper, further from the full-step output. Not used by 'redi blend'."),
            ],
            outputs=[io.Latent.Output(display_name="LATENT")],
        )

    @classmethod
    def validate_inputs(cls, kb_name: str | None = None):
        return refusal(lambda: kb_name is None or check_kb_name(kb_name))

    @classmethod
    def execute(cls, model, clip, prompt: str, negative_prompt: str, latent_image, seed: int, kb_name: str, sampler_name: str,
                scheduler: str, steps: int, cfg: float, store_steps: str, key_step: int, value_step: int, neighbours: int,
                weight_mode: str, guard: float, max_entries: int, max_megabytes: int, solver: str = SOLVERS[0],
                nfe: int = 10) -> io.NodeOutput:
        latent = latent_image["samples"].float()
        channels = model.get_model_object("latent_format").latent_channels
        corrected = solver == SOLVERS[1]
        if solver not in SOLVERS:
            raise KBError(f"unknown solver {solver!r}; choose one of {list(SOLVERS)}.")
        stored = (list(range(1, steps)) if corrected and store_steps.strip().lower() in ("", "auto")
                  else parse_steps(store_steps, steps))  # the corrected solver reads every step of its grid
        settings = learning_settings(model, Recipe(sampler_name, scheduler, steps, cfg), stored,
                                          (channels, *latent.shape[-2:]), negative_prompt)
        budget = KBBudget(max_entries or None, max_megabytes * 2**20 or None)
        encode = clip_encoder(clip)
        batch = latent.shape[0]
        if corrected:
            done = generate_learning_corrected(
                str(kb_path(kb_name, for_writing=True)), settings, model, encode(prompt), encode(negative_prompt), latent,
                [prompt] * batch, [seed + i for i in range(batch)], nfe=nfe, neighbours=neighbours, weight_mode=weight_mode,
                guard=guard, budget=budget, callback=preview_callback(model, steps))
            return io.NodeOutput(with_samples(latent_image, done.latent), ui={"text": [done.summary()], "redi_kb": [kb_name]})
        result = generate_learning(
            str(kb_path(kb_name, for_writing=True)), settings, model, encode(prompt), encode(negative_prompt), latent,
            [prompt] * batch, [seed + i for i in range(batch)], key_step=key_step, value_step=value_step, neighbours=neighbours,
            weight_mode=weight_mode, guard=guard, budget=budget, callback=preview_callback(model, steps))
        log.info(result.summary())
        text = f"{feedback.resume_text(result.redi)}\n{result.learned.summary()}" if result.redi is not None else result.summary()
        # redi_kb: the page refreshes the node lists, so ReDiLoadKnowledgeBase offers the learning KB too.
        return io.NodeOutput(with_samples(latent_image, result.latent), ui={"text": [text], "redi_kb": [kb_name]})


NODES = [ReDiLearningSampler]
