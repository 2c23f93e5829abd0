"""Knowledge base nodes: open one (ReDiLoadKnowledgeBase), or build one (BuildKnowledgeBase, ReDi Algorithm 1).

Thin V3 layer over kb_tools.build; the KB folders and the opened-KB cache live in common.py.
"""
from __future__ import annotations

import comfy.model_management
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..kb_tools import (
    BuildSpec,
    KBError,
    Recipe,
    build_knowledge_base,
    check_kb_name,
    input_file,
    parse_steps,
    read_prompts,
    sampler_names,
    scheduler_names,
)
from . import feedback
from .common import CATEGORY, KnowledgeBaseType, clip_encoder, kb_path, list_kbs, log, open_kb, refusal


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
        return refusal(lambda: kb_path(kb_name))

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
        return refusal(lambda: isinstance(prompts_file, str) and prompts_file.strip()
                       and input_file(prompts_file, folder_paths.get_input_directory()),
                       lambda: kb_name is None or check_kb_name(kb_name))

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


NODES = [ReDiLoadKnowledgeBase, BuildKnowledgeBase]
