"""What the ReDi nodes show on the canvas: run summaries as text, retrieved neighbours as images.

Each `*_ui` function turns a report from kb_tools into the `ui` dict of a V3 `io.NodeOutput`.
ComfyUI sends that dict to the page in the "executed" message and keeps it in /history:
- "images" (saved to ComfyUI's temp folder) is drawn on any node by the front end itself;
- "text" is drawn by the pack's web extension (web/redi_canvas_feedback.js) in a read-only box
  on the node, the same key ComfyUI's own Preview-as-Text node uses;
- "redi_kb" names a knowledge base that was just written; the web extension then refreshes the
  node definitions, so ReDiLoadKnowledgeBase lists it without a manual refresh.
A SAMPLER node (SamplerReDi) finishes before its run starts, so it has no `ui` to return; its
run summary goes to the node as ComfyUI's progress text (`show_text`), drawn by the front end.
"""
from __future__ import annotations

import numpy as np
import torch
from comfy_api.latest import io, ui

from ..kb_tools import KnowledgeBase

try:  # the server module exists only inside a ComfyUI process; the offline command has none
    from server import PromptServer
except ImportError:  # pragma: no cover - depends on how the pack was imported
    PromptServer = None

#: Batch items listed one per line on the node; the rest are counted, not listed.
MAX_ITEMS_LISTED = 8
#: Neighbour images decoded for the preview (the first items' H neighbours, in rank order).
MAX_PREVIEW_IMAGES = 12
PREVIEW_PREFIX = "ReDi_neighbours"


def megabytes(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.0f} KB"


# --------------------------------------------------------------------------- build

def build_text(report, kb_name: str) -> str:
    """BuildReport -> what the KB now holds (name, size on disk, stored steps, recipe), then its summary line."""
    info = report.kb.info()
    return "\n".join([
        f"'{kb_name}': {info['count']} trajectories, {megabytes(info['bytes'])} on disk in {info['shards']} shard(s), "
        f"stored steps {info['stored_steps']} of {info['steps']} ({info['sampler']}/{info['scheduler']}).",
        report.summary(),
        "ReDiLoadKnowledgeBase lists it now under this name.",
    ])


def build_ui(report, kb_name: str) -> dict:
    """The ui of BuildKnowledgeBase: the summary, and the KB's name for the page to refresh its lists."""
    return {"text": [build_text(report, kb_name)], "redi_kb": [kb_name]}


# --------------------------------------------------------------------------- resume

def item_line(result, i: int) -> str:
    """One batch item: how many steps it skipped, or that it was sent back, and the guard's number behind it."""
    skipped = int(result.skipped_steps[i])
    if result.predicted_error is not None:  # the error guard
        step = int(result.guard.judged_at(result.start_steps)[i])
        why = f"predicted error {result.predicted_error[i]:.3g}"
        bound = f"{result.guard.tolerance_at(step):.3g}" + (
            f" (plain's output error at {result.plan.key_step + result.plan.steps - step} NFE)"
            if result.guard.reference is not None else "")
    else:
        why, bound = f"residual {result.centered_residual[i]:.3f}", f"guard {result.guard.threshold:.3f}"
    if result.accepted[i]:
        return f"item {i}: skipped {skipped} steps ({why} <= {bound})"
    return f"item {i}: fell back to plain sampling ({why} > {bound})"


def resume_text(result) -> str:
    """ReDiResult -> its summary line, then one line per batch item: skipped or sent back by the guard."""
    total = len(result.accepted)
    lines = [result.summary(), *(item_line(result, i) for i in range(min(total, MAX_ITEMS_LISTED)))]
    if total > MAX_ITEMS_LISTED:
        lines.append(f"... {total - MAX_ITEMS_LISTED} more item(s), {int(result.accepted[MAX_ITEMS_LISTED:].sum())} of them skipped steps")
    lines.append(f"{result.evaluations.total()} model evaluations in all ({result.evaluations.describe()}).")
    return "\n".join(lines)


def show_text(node_id: str | None, text: str) -> None:
    """Draw `text` on node `node_id` of the running prompt (ComfyUI's progress text); no server: nothing to do."""
    server = getattr(PromptServer, "instance", None)
    if node_id is not None and server is not None:
        server.send_progress_text(text, node_id)


def resume_ui(result) -> dict:
    """The ui of ReDiResumeSample and ReDiSampler."""
    return {"text": [resume_text(result)]}


# --------------------------------------------------------------------------- retrieve

def neighbours_text(kb: KnowledgeBase, found) -> str:
    """QueryNeighbours -> their summary line, then per batch item the matched prompts, seeds and distances."""
    entries = kb.entries
    nearest = found.nearest
    lines = [found.summary()]
    b = nearest.ids.shape[0]
    for i in range(min(b, MAX_ITEMS_LISTED)):
        lines.append(f"item {i}:")
        for rank, (idx, dist) in enumerate(zip(nearest.ids[i], nearest.distances[i]), 1):
            prompt, seed = entries[int(idx)]
            lines.append(f"  {rank}. #{int(idx)} '{prompt}' seed {seed}, distance {float(dist):.4g}")
    if b > MAX_ITEMS_LISTED:
        lines.append(f"... {b - MAX_ITEMS_LISTED} more item(s)")
    lines.append("Their blend weights are solved by ReDiBlend, in the weight mode chosen there.")
    return "\n".join(lines)


def preview_step(kb: KnowledgeBase) -> int:
    """The stored step shown for a neighbour: the last one, closest to the finished image."""
    return max(kb.stored_steps)


def neighbour_latents(kb: KnowledgeBase, found, limit: int = MAX_PREVIEW_IMAGES) -> torch.Tensor:
    """The first `limit` neighbours (item by item, in rank order) at the preview step: [N, C, H, W] float32."""
    ids = np.asarray(found.nearest.ids).reshape(-1)[:limit]
    return torch.from_numpy(kb.latents(preview_step(kb), ids))


def decode_previews(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> IMAGE [N, H, W, 3] in 0..1, as VAEDecode does (video VAEs' frames become batch items)."""
    with torch.inference_mode():  # as in a ComfyUI run; also when called outside the executor
        images = vae.decode(latents)
    if images.ndim == 5:
        images = images.reshape(-1, *images.shape[-3:])
    return images.clamp(0.0, 1.0)


def retrieve_ui(kb: KnowledgeBase, found, vae=None) -> dict:
    """The ui of ReDiRetrieve: the matched trajectories as text, and as images when a VAE is connected."""
    text = neighbours_text(kb, found)
    out: dict = {}
    if vae is not None:
        images = decode_previews(vae, neighbour_latents(kb, found))
        shown = images.shape[0]
        text += (f"\nImages: the first {shown} neighbour(s) at stored step {preview_step(kb)} of {kb.settings.steps} "
                 "(latents with their leftover noise, decoded).")
        out["images"] = ui.ImageSaveHelper.save_images(images, filename_prefix=PREVIEW_PREFIX, folder_type=io.FolderType.temp,
                                                       cls=None, compress_level=1)
        out["animated"] = (False,)
    out["text"] = [text]
    return out
