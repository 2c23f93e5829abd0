"""ReDi nodes: build a knowledge base, then ReDiSampler, or partial sample -> retrieve -> blend -> resume.

Thin V3 layer over kb_tools.samplers.redi_chain; every number a node computes comes from there. In the
four-node chain each LATENT carries what its part of Algorithm 2 made under the key "redi"
(a KeyQuery after ReDiPartialSample, a BlendedValue after ReDiBlend), so the chain needs no
extra wires and a LATENT from elsewhere is refused with a clear fix.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import comfy.model_management
import comfy.utils
import folder_paths
import latent_preview
import torch
from comfy_api.latest import io

from ..kb_tools import WEIGHT_MODES as WEIGHT_MODE_NAMES
from ..kb_tools import (
    BlendedValue,
    BuildSpec,
    KBError,
    KeyQuery,
    KnowledgeBase,
    QueryNeighbours,
    Recipe,
    blend_at,
    build_knowledge_base,
    check_kb_name,
    check_recipe,
    default_tolerance,
    find_neighbours,
    generate,
    input_file,
    make_run,
    parse_steps,
    query_seeds as kb_query_seeds,
    read_prompts,
    resume,
    sample_to_key,
    sampler_names,
    scheduler_names,
)
from . import feedback

log = logging.getLogger("ReDi")

CATEGORY = "sampling/ReDi"
KB_FOLDER = "redi_kb"
KnowledgeBaseType = io.Custom("REDI_KB")
# Carries a kb_tools.samplers.redi_chain.QueryNeighbours: each query and its top-H stored neighbours. The type
# string stays "REDI_NEIGHBOURS": saved UI workflows store it on every link and slot of this type.
NeighboursType = io.Custom("REDI_NEIGHBOURS")
WEIGHT_MODES = list(WEIGHT_MODE_NAMES)
FROM_KB = "from KB"
GUARD_TOOLTIP = ("Largest accepted centered residual ||q - sum w key|| / (RMS spread of the KB's keys); an item above it "
                 "continues from its own key-step latent (plain sampling). -1 = auto: the calibration stored in the KB "
                 "(python -m kb_tools calibrate), else 0.5; the run's log line says which.")
ERROR_TOLERANCE_TOOLTIP = (
    "-1 = auto: with guard also -1 and a KB calibrated with a checkpoint (python -m kb_tools calibrate ... --ckpt), an "
    "item jumps only when its output is predicted to be no worse than the plain sampler's at the same number of model "
    "evaluations; otherwise the residual guard above decides. 0 or more = the error guard with this tolerance: an item "
    "jumps only when the blend is predicted to land within this distance of the true latent, as a fraction of how much "
    "the KB's latents differ from each other at that step (e.g. 0.1 = within 10%; 0 = never jump). The prediction comes "
    "from the blend-error model the KB stores (python -m kb_tools calibrate); a KB without one is refused. Measured on "
    "the embedded model (T 20, 32 queries per workload): auto with a plain reference was never worse than plain euler "
    "at equal NFE with a fixed value_step, by letting at most 1 of 32 items jump; with adaptive_skip it held per item "
    "but lost to plain at the batch's mean NFE on the worst 5% (benchmarks/results/head_to_head_issue12.md).")
ADAPTIVE_SKIP_TOOLTIP = (
    "Off: every accepted item jumps to value_step. On: each item jumps as far as its own match allows, to the latest "
    "stored step up to value_step whose predicted error is within error_tolerance (a close match skips more steps, a "
    "poor one fewer or none). Needs the error guard: error_tolerance >= 0, or auto on a KB calibrated with a checkpoint.")


def error_guard_inputs() -> list[io.Input]:
    """The error guard's two optional inputs (defaults keep the residual guard and every saved workflow as it was)."""
    return [io.Float.Input("error_tolerance", default=-1.0, min=-1.0, max=100.0, step=0.01, optional=True,
                           tooltip=ERROR_TOLERANCE_TOOLTIP),
            io.Boolean.Input("adaptive_skip", default=False, optional=True, tooltip=ADAPTIVE_SKIP_TOOLTIP)]


def tolerance_of(error_tolerance: float | None, guard: float, kb, key_step: int, neighbours: int) -> float | str | None:
    """The node's error_tolerance as make_run's tolerance.

    A number >= 0: that tolerance. -1 (auto) with the guard on auto too: "plain" where the KB stores
    a plain reference for key step and H (default_tolerance), else None (the residual guard).
    A residual guard the user set (>= 0) is theirs: auto then leaves it in charge.
    """
    if error_tolerance is not None and error_tolerance >= 0:
        return float(error_tolerance)
    if guard >= 0 or key_step not in kb.stored_steps:  # a bad key step is refused by make_run, with its own message
        return None
    return default_tolerance(kb.calibration(key_step), key_step, neighbours)

# Knowledge bases live in models/redi_kb/<name>/ by default; extra_model_paths.yaml can add
# more locations under the key `redi_kb` (ComfyUI registers those before loading packs).
if KB_FOLDER not in folder_paths.folder_names_and_paths:
    folder_paths.add_model_folder_path(KB_FOLDER, os.path.join(folder_paths.models_dir, KB_FOLDER))


def kb_roots() -> list[Path]:
    return [Path(p) for p in folder_paths.get_folder_paths(KB_FOLDER)]


def list_kbs() -> list[str]:
    """Names of the knowledge bases (folders with a manifest.json) in every redi_kb location."""
    names = set()
    for root in kb_roots():
        if root.is_dir():
            names.update(d.name for d in root.iterdir() if (d / "manifest.json").is_file())
    return sorted(names)


def kb_path(name: str, for_writing: bool = False) -> Path:
    """Resolve a KB name to its folder; a new KB goes to the first redi_kb location."""
    check_kb_name(name)
    for root in kb_roots():
        if (root / name / "manifest.json").is_file():
            return root / name
    if for_writing:
        return kb_roots()[0] / name
    raise KBError(f"no knowledge base named {name!r} in {[str(r) for r in kb_roots()]}; build it with BuildKnowledgeBase or copy it there.")


_OPEN_KBS: dict[tuple, KnowledgeBase] = {}


def open_kb(path: Path) -> KnowledgeBase:
    """Open a KB once per on-disk version (manifest mtime and size), then reuse it."""
    manifest = path / "manifest.json"
    st = manifest.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in _OPEN_KBS:
        for old in [k for k in _OPEN_KBS if k[0] == str(path)]:
            del _OPEN_KBS[old]
        _OPEN_KBS[key] = KnowledgeBase.open(str(path))
    return _OPEN_KBS[key]


def carried(latent: dict, node: str, kind: type, source: str):
    """What the chain's previous node put into the LATENT, or a clear error naming the node to connect."""
    value = latent.get("redi")
    if not isinstance(value, kind):
        raise KBError(f"{node} needs the LATENT that comes out of {source}; this one carries no ReDi state. "
                      "Connect it directly: nodes in between (upscale, batch...) drop that state.")
    return value


def with_samples(latent: dict, samples: torch.Tensor, state=None) -> dict:
    out = {k: v for k, v in latent.items() if k not in ("samples", "redi", "noise_mask")}
    out["samples"] = samples
    if state is not None:
        out["redi"] = state
    return out


def kb_input() -> io.Input:
    return KnowledgeBaseType.Input("knowledge_base", tooltip="The knowledge base (from ReDiLoadKnowledgeBase or BuildKnowledgeBase).")


def common_sampling_inputs() -> list[io.Input]:
    return [
        io.Model.Input("model", tooltip="The model the knowledge base was built with (LoRAs arrive through it; a different LoRA set only warns)."),
        io.Conditioning.Input("positive", tooltip="Positive conditioning. For stylization: the content prompt here, content + style at the resume."),
        io.Conditioning.Input("negative", tooltip="Negative conditioning."),
    ]


def seed_inputs() -> list[io.Input]:
    return [
        io.Combo.Input("seed_mode", options=["kb", "custom"], default="kb",
                       tooltip="'kb': start from the knowledge base's seed (its trajectories share that noise, so neighbours are near). "
                               "'custom': use the seed below (item i gets seed + i); foreign noise rarely has a near key and the guard then falls back."),
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                     tooltip="Seed for seed_mode 'custom'. Batch item i uses seed + i."),
    ]


def small_model_inputs() -> list[io.Input]:
    return [
        io.Model.Input("small_model", optional=True,
                       tooltip="T-Stitch keys: the small model the KB used for its first steps. Needed only for such KBs."),
        io.Conditioning.Input("small_positive", optional=True, tooltip="Positive conditioning for the small model (default: positive)."),
        io.Conditioning.Input("small_negative", optional=True, tooltip="Negative conditioning for the small model (default: negative)."),
    ]


def preview_callback(model, steps: int):
    return latent_preview.prepare_callback(model, steps)


def item_seeds(kb: KnowledgeBase, latent_image: dict, seed_mode: str, seed: int) -> list[int]:
    seeds, warnings = kb_query_seeds(kb, latent_image["samples"].shape[0], seed_mode, seed)
    for w in warnings:
        log.warning("ReDi: %s", w)
    return seeds


# --------------------------------------------------------------------------- nodes

class ReDiLoadKnowledgeBase(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ReDiLoadKnowledgeBase",
            display_name="ReDi Load Knowledge Base",
            category=CATEGORY,
            description="Opens a ReDi knowledge base from the models/redi_kb folder (or a redi_kb path in extra_model_paths.yaml). "
                        "Latents are memory-mapped, so even a large KB opens fast; it is re-read when its files change.",
            inputs=[io.Combo.Input("kb_name", options=list_kbs(), tooltip="A knowledge base folder in models/redi_kb.")],
            outputs=[KnowledgeBaseType.Output(display_name="knowledge_base")],
        )

    @classmethod
    def fingerprint_inputs(cls, kb_name: str):
        try:
            st = (kb_path(kb_name) / "manifest.json").stat()
            return f"{kb_name}:{st.st_mtime_ns}:{st.st_size}"
        except (KBError, OSError):
            return kb_name

    @classmethod
    def validate_inputs(cls, kb_name: str):
        # The combo is filled at start-up; a KB built later is still valid by name.
        try:
            kb_path(kb_name)
        except KBError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, kb_name: str) -> io.NodeOutput:
        kb = open_kb(kb_path(kb_name))
        log.info("ReDi: loaded knowledge base %s (%d trajectories, %s/%s, %d steps, stored steps %s)",
                 kb_name, len(kb), kb.settings.sampler, kb.settings.scheduler, kb.settings.steps, kb.settings.stored_steps)
        return io.NodeOutput(kb)


class BuildKnowledgeBase(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BuildKnowledgeBase",
            display_name="ReDi Build Knowledge Base",
            category=CATEGORY,
            is_output_node=True,
            description="Samples one trajectory per (prompt, seed) and stores its latents at the chosen steps in a knowledge base "
                        "(ReDi paper, Algorithm 1). Resumable: running it again with the same name adds only what is missing. "
                        "Interrupting keeps every trajectory finished so far.",
            inputs=[
                io.Model.Input("model", tooltip="The model to build trajectories with; queries must use the same model."),
                io.Clip.Input("clip", tooltip="Text encoder for the prompts."),
                io.String.Input("prompts", multiline=True, default="a photograph of a cat\na photograph of a dog",
                                tooltip="One prompt per line (empty lines are ignored)."),
                io.String.Input("prompts_file", default="", tooltip="Optional prompt file (.txt one prompt per line, .jsonl, or COCO captions .json) in ComfyUI's input folder, named relative to it; its prompts are added to those above."),
                io.String.Input("negative_prompt", default="", multiline=True, tooltip="Negative prompt used for every trajectory (queries should use the same)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="First seed. The official ReDi setup uses one seed for everything. Kept fixed between runs, so rerunning resumes the same KB."),
                io.Int.Input("seeds_per_prompt", default=1, min=1, max=4096, tooltip="Seeds seed, seed+1, ... per prompt. More seeds let queries with those seeds find near keys."),
                io.Combo.Input("sampler_name", options=sampler_names(), default="euler", tooltip="Sampler; queries are bound to it."),
                io.Combo.Input("scheduler", options=scheduler_names(), default="normal", tooltip="Scheduler; queries are bound to it."),
                io.Int.Input("steps", default=20, min=2, max=1000, tooltip="Total steps of the schedule."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01, tooltip="Guidance scale; queries are bound to it."),
                io.String.Input("store_steps", default="auto", tooltip="Steps to store, e.g. '4,8-12'; 'auto' stores 10% to 80% of the schedule so key and value steps can be picked later."),
                io.Int.Input("width", default=512, min=8, max=8192, step=8, tooltip="Image width in pixels (latent width x 8)."),
                io.Int.Input("height", default=512, min=8, max=8192, step=8, tooltip="Image height in pixels (latent height x 8)."),
                io.Int.Input("batch_size", default=4, min=1, max=256, tooltip="Trajectories sampled together."),
                io.String.Input("kb_name", default="my-kb", tooltip="Folder name under models/redi_kb; reuse a name to resume or extend."),
                io.Combo.Input("dtype", options=["float16", "float32"], default="float16", tooltip="Storage precision of latents (float16 halves the disk)."),
                io.Combo.Input("index_type", options=["auto", "flat", "ivf", "hnsw"], default="auto", tooltip="FAISS index: auto (default) is exact flat search for small KBs and HNSW above 20,000 entries; flat is always exact; ivf and hnsw are faster approximate search for very large KBs."),
                io.Model.Input("small_model", optional=True, tooltip="T-Stitch keys: a small model for the first stitch_step steps (cheaper queries)."),
                io.Clip.Input("small_clip", optional=True, tooltip="Text encoder of the small model (default: clip)."),
                io.Int.Input("stitch_step", default=0, min=0, max=1000, optional=True, tooltip="Steps run by small_model before the main model takes over (0 = no small model)."),
            ],
            outputs=[KnowledgeBaseType.Output(display_name="knowledge_base")],
        )

    @classmethod
    def validate_inputs(cls, prompts_file: str = "", kb_name: str | None = None):
        try:
            if isinstance(prompts_file, str) and prompts_file.strip():
                input_file(prompts_file, folder_paths.get_input_directory())
            if kb_name is not None:
                check_kb_name(kb_name)
        except KBError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, model, clip, prompts: str, prompts_file: str, negative_prompt: str, seed: int, seeds_per_prompt: int,
                sampler_name: str, scheduler: str, steps: int, cfg: float, store_steps: str, width: int, height: int,
                batch_size: int, kb_name: str, dtype: str, index_type: str, small_model=None, small_clip=None,
                stitch_step: int = 0) -> io.NodeOutput:
        lines = [p.strip() for p in prompts.splitlines() if p.strip()]
        if prompts_file.strip():
            lines += read_prompts(input_file(prompts_file, folder_paths.get_input_directory()))
        if not lines:
            raise KBError("no prompts: write one prompt per line, or give a prompts file.")
        channels = model.get_model_object("latent_format").latent_channels
        spec = BuildSpec(
            prompts=lines, seeds=[seed + i for i in range(seeds_per_prompt)], recipe=Recipe(sampler_name, scheduler, steps, cfg),
            store_steps=parse_steps(store_steps, steps), latent_shape=(channels, height // 8, width // 8),
            negative_prompt=negative_prompt, batch_size=batch_size, dtype=dtype, index_type=index_type,
            stitch_step=stitch_step if small_model is not None else 0)
        pbar = comfy.utils.ProgressBar(len(lines) * seeds_per_prompt)
        report = build_knowledge_base(
            str(kb_path(kb_name, for_writing=True)), model, clip_encoder(clip), spec,
            key_model=small_model if stitch_step else None,
            key_encode=clip_encoder(small_clip) if small_clip is not None else None,
            progress=lambda done, total: pbar.update_absolute(done, total),
            check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted)
        log.info(report.summary())
        return io.NodeOutput(report.kb, ui=feedback.build_ui(report, kb_name))


def clip_encoder(clip):
    """prompt -> CONDITIONING with ComfyUI's own CLIPTextEncode path."""
    if clip is None:
        raise KBError("BuildKnowledgeBase needs a CLIP input to encode prompts: connect the checkpoint loader's CLIP.")

    def encode(prompt: str) -> list:
        return clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
    return encode


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
                io.Int.Input("neighbours", default=3, min=1, max=512, tooltip="H, neighbours to combine. The paper found quality converges near 3; very dense KBs profit from more."),
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


NODES = [ReDiLoadKnowledgeBase, BuildKnowledgeBase, ReDiPartialSample, ReDiRetrieve, ReDiBlend, ReDiResumeSample, ReDiSampler]
