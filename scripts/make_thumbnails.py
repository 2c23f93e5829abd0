"""Template thumbnails: real outputs of the embedded crops models, drawn as what each template does.

    bash -c 'source scripts/env.sh && "$REDI_PYTHON" scripts/make_thumbnails.py'   # 6 min (200 CPU s) on a busy 2-core machine

For every [[template]] in example_workflows/templates.toml this writes example_workflows/<file>.jpg
(400x400, what the front end loads as /api/workflow_templates/<pack>/<file>.jpg) with the recipe
named by its `thumbnail` field, and a copy per recipe under web/docs/img/ for the node help pages.
Everything runs through the pack's own code on the shipped models (embedded/), in float32 with
fixed seeds, so a rerun draws the same pictures: kb_tools.build.builder (the knowledge base), kb_tools.comfy.plain
(plain runs), the four parts of kb_tools.samplers.redi_chain's Algorithm 2 (ReDi, whose query and blend the
pictures show) and kb_tools.samplers.tstitch (T-Stitch in one sampler run):
- build: stored trajectories of a small knowledge base, noise to image across the stored steps;
- redi / redi_four_nodes: one ReDi query, query -> weighted neighbours -> blend -> result;
- stylize: content key with a sepia resume, next to the plain content image;
- tstitch: the small model's steps, then the large model's, against the large model alone;
- calibrated: euler, the calibration's choice and the converged image at the same few evaluations on fresh seeds;
- diagram: the template's stage groups as boxes (for a template without a recipe of its own).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PACK_DIR))
sys.path.insert(0, str(PACK_DIR / "scripts"))

from template_catalog import Template, load_catalog  # noqa: E402

SIZE = 400
BACKGROUND = (32, 32, 32)
PANEL = (48, 48, 48)
TEXT = (235, 235, 235)
MUTED = (160, 160, 160)
SMALL_MODEL = (86, 156, 214)   # blue
LARGE_MODEL = (214, 157, 60)   # amber
ACCENT = (120, 190, 120)
STEPS, CFG, SAMPLER, SCHEDULER = 10, 3.0, "euler", "normal"
KEY, VALUE, H = 3, 6, 3
KB_PHOTOS, KB_DIGITS = 120, 8   # the query figures use photo captions: a photo-heavy KB has nearer neighbours
# The calibrated sampler's picture: its step count, teachers (a sample of the KB's entries), fresh seeds (not the KB's 0)
# and the converged reference it is scored against (dpmpp_2m/karras at 100 steps, as benchmarks/h2h/converged.py).
CALIBRATED_NFE, CALIBRATION_TEACHERS, FRESH_SEEDS, CONVERGED = 6, 32, [101, 102, 103], ("dpmpp_2m", "karras", 100)
DOCS_IMG = PACK_DIR / "web" / "docs" / "img"


@dataclass
class Models:
    large: object
    small: object
    encode: object
    kb: object


def font(size: int):
    from PIL import ImageFont
    return ImageFont.load_default(size=size)


def tile(latent, px: int):
    """A [3, 16, 16] latent in [-1, 1] as a px x px RGB image (nearest: the pixels are the model's)."""
    from embedded.rendering import to_pil
    return to_pil(latent.unsqueeze(0) if latent.ndim == 3 else latent, scale=1)[0].resize((px, px), 0)


def wrap(draw, text: str, size: int, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font(size)) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + [line] if line else lines


def canvas(title: str, subtitle: str):
    """A thumbnail with a title and up to two lines saying what the pictures show."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(img)
    draw.text((16, 10), title, fill=TEXT, font=font(22))
    for i, line in enumerate(wrap(draw, subtitle, 13, SIZE - 32)[:2]):
        draw.text((16, 40 + 17 * i), line, fill=MUTED, font=font(13))
    return img, draw


def label(draw, xy, text, size=13, fill=TEXT, anchor="la"):
    draw.text(xy, text, fill=fill, font=font(size), anchor=anchor)


def arrow(draw, start, end, fill=MUTED, width=3):
    import math
    draw.line([start, end], fill=fill, width=width)
    angle = math.atan2(end[1] - start[1], end[0] - start[0])
    for side in (-0.5, 0.5):
        a = angle + math.pi + side
        draw.line([end, (end[0] + 10 * math.cos(a), end[1] + 10 * math.sin(a))], fill=fill, width=width)


def paste(img, draw, latent, x, y, px, outline=None, caption=None):
    img.paste(tile(latent, px), (x, y))
    if outline:
        draw.rectangle([x - 2, y - 2, x + px + 1, y + px + 1], outline=outline, width=2)
    if caption:
        label(draw, (x + px // 2, y + px + 6), caption, size=12, fill=MUTED, anchor="ma")


# --------------------------------------------------------------------------- sampling

def setup(workdir: Path) -> Models:
    from embedded import captions as CAP, models as M, rendering as R
    M.setup_comfy(2)
    from kb_tools.build.builder import BuildSpec, build_knowledge_base

    large, small, encode = M.load_models()
    captions = CAP.sample_captions(400, "train", sepia="none")
    prompts = ([c.prompt() for c in captions if not is_digit(c)][:KB_PHOTOS] + [c.prompt() for c in captions if is_digit(c)][:KB_DIGITS])
    spec = BuildSpec(prompts=prompts, seeds=[0], recipe=recipe(), store_steps=list(range(1, STEPS)),
                     latent_shape=R.LATENT_SHAPE, batch_size=32, dtype="float32")
    kb = build_knowledge_base(str(workdir / "thumbnail_kb"), large, encode, spec).kb
    return Models(large, small, encode, kb)


def recipe():
    from kb_tools.core.records import Recipe
    return Recipe(SAMPLER, SCHEDULER, STEPS, CFG)


def is_digit(caption) -> bool:
    return caption.name.startswith("digit")


def queries(n: int, sepia: float = 0.0) -> list[str]:
    """n held-out photo captions of different pictures (what a user would ask for), optionally sepia-toned."""
    from embedded.captions import sample_captions
    picked, seen = [], set()
    for c in sample_captions(200, "heldout", sepia="none"):
        if not is_digit(c) and c.source not in seen and c.size >= 0.3:
            picked.append(c)
            seen.add(c.source)
    return [c.with_sepia(sepia).prompt() if sepia else c.prompt() for c in picked[:n]]


class Denoised:
    """Sampler callback keeping the model's denoised estimate at every step (step = call count)."""

    def __init__(self):
        self.steps: dict[int, object] = {}

    def __call__(self, i, x0, x, total):
        self.steps[len(self.steps)] = x0.detach().clone()


def conditioning(m: Models, prompts: list[str]):
    from kb_tools.comfy.plain import batch_conditioning
    return batch_conditioning([m.encode(p) for p in prompts]), batch_conditioning([m.encode("")] * len(prompts))


def denoised_at(m: Models, latent, step: int, prompts: list[str], model=None):
    """The model's denoised estimate of a latent sitting at `step` (one evaluation): what that latent will become."""
    import torch
    from kb_tools.comfy.model_facts import schedule_sigmas
    from kb_tools.comfy.plain import cfg_guider
    from kb_tools.comfy.counted import sample_counted
    model = model or m.large
    pos, neg = conditioning(m, prompts)
    seen = Denoised()
    sample_counted(cfg_guider(model, pos, neg, CFG), latent.clone(), [0] * len(prompts),
                   schedule_sigmas(model, SAMPLER, SCHEDULER, STEPS)[step:step + 2], SAMPLER, noise=torch.zeros_like(latent),
                   callback=seen)
    return seen.steps[0]


def plain(m: Models, prompts: list[str], model=None, seeds=None, callback=None):
    """Plain sampling of `prompts` (seed 0 each, the KB's seed, unless given): the final latents."""
    from kb_tools.comfy.plain import sample_prompts
    return sample_prompts(model or m.large, m.encode, prompts, seeds or [0] * len(prompts), recipe(),
                          latent_shape=m.kb.latent_shape, batch_size=len(prompts), callback=callback).latents


def redi_query(m: Models, prompts: list[str], resume_prompts: list[str] | None = None):
    """ReDi through Algorithm 2's four parts (the four-node chain): (the blended value, the ReDiResult).

    The blended value carries the query x_k (`.neighbours.query.latent`) and the blend x_v_hat (`.latent`).
    """
    import torch
    from kb_tools.samplers import redi_chain as redi
    pos, neg = conditioning(m, prompts)
    query = redi.sample_to_key(m.kb, m.large, pos, neg, torch.zeros((len(prompts), *m.kb.latent_shape)),
                               [0] * len(prompts), KEY)
    value = redi.blend_at(redi.find_neighbours(query, H), VALUE, "lstsq")
    resume_pos = conditioning(m, resume_prompts)[0] if resume_prompts else pos
    return value, redi.resume(value, m.large, resume_pos, neg, guard=1.0)


# --------------------------------------------------------------------------- recipes

def draw_build(m: Models, template: Template):
    entries = m.kb.entries
    rows = [i for i, (p, _) in enumerate(entries) if not p.startswith("digit")][:2] + [i for i, (p, _) in enumerate(entries) if p.startswith("digit")][:2]
    seen = Denoised()
    plain(m, [entries[i][0] for i in rows], seeds=[entries[i][1] for i in rows], callback=seen)  # the stored trajectories, replayed
    steps = [1, 3, 5, 7, 9]
    img, draw = canvas("Build a knowledge base", f"each prompt sampled once, its latents stored at steps {m.kb.stored_steps[0]}..{m.kb.stored_steps[-1]} "
                                                 f"of {STEPS} (shown denoised)")
    px, gap, x0, y0 = 58, 10, 24, 104
    for c, step in enumerate(steps):
        label(draw, (x0 + c * (px + gap) + px // 2, y0 - 20), f"step {step}", size=12, fill=MUTED, anchor="ma")
    for r in range(len(rows)):
        for c, step in enumerate(steps):
            paste(img, draw, seen.steps[step][r], x0 + c * (px + gap), y0 + r * (px + gap), px)
    arrow(draw, (x0, 376), (x0 + len(steps) * (px + gap) - gap, 376), fill=ACCENT)
    label(draw, (x0, 384), f"{len(m.kb)} trajectories in the knowledge base", size=12, fill=MUTED)
    return img


def draw_redi(m: Models, template: Template, four_nodes: bool = False):
    prompts = queries(1)
    value, result = redi_query(m, prompts)
    neighbour_pairs = [m.kb.entries[int(i)] for i in result.neighbour_ids[0]]
    neighbour_images = plain(m, [p for p, _ in neighbour_pairs], seeds=[s for _, s in neighbour_pairs])
    query_view = denoised_at(m, value.neighbours.query.latent, KEY, prompts)
    blend_view = denoised_at(m, value.latent, VALUE, prompts)
    title = "ReDi in four nodes" if four_nodes else "ReDi Sampler"
    img, draw = canvas(title, f"sample to step {KEY}, retrieve {H} stored trajectories, blend at step {VALUE}, finish: "
                              f"{VALUE - KEY} of {STEPS} steps skipped (shown denoised)")
    big, small_px = 96, 52
    stages = ["Partial Sample", "Retrieve", "Blend", "Resume"]
    boxes = [(16, 88), (208, 88), (16, 246), (208, 246)]
    if four_nodes:
        for name, (bx, by) in zip(stages, boxes):
            draw.rounded_rectangle([bx, by, bx + 176, by + 148], radius=8, fill=PANEL)
            label(draw, (bx + 10, by + 5), name, size=13)
    top = 26 if four_nodes else 8
    paste(img, draw, query_view[0], boxes[0][0] + 40, boxes[0][1] + top, big, caption=f"query at step {KEY}")
    for j in range(H):
        x = boxes[1][0] + 6 + j * (small_px + 6)
        paste(img, draw, neighbour_images[j], x, boxes[1][1] + top + 14, small_px)
        label(draw, (x + small_px // 2, boxes[1][1] + top + 20 + small_px), f"w {result.weights[0, j]:+.2f}", size=12, fill=MUTED, anchor="ma")
    label(draw, (boxes[1][0] + 88, boxes[1][1] + top + 90), "retrieved trajectories", size=12, fill=MUTED, anchor="ma")
    paste(img, draw, blend_view[0], boxes[2][0] + 40, boxes[2][1] + top, big, caption=f"blend at step {VALUE}")
    paste(img, draw, result.latent[0], boxes[3][0] + 40, boxes[3][1] + top, big, outline=ACCENT, caption="finished image")
    arrow(draw, (170, 150), (212, 150))
    arrow(draw, (292, 226), (150, 262))
    arrow(draw, (170, 310), (212, 310))
    return img


def draw_four_nodes(m: Models, template: Template):
    return draw_redi(m, template, four_nodes=True)


def draw_stylize(m: Models, template: Template):
    prompts = queries(3)
    styled = queries(3, sepia=1.0)
    content = plain(m, prompts)
    _, result = redi_query(m, prompts, resume_prompts=styled)
    img, draw = canvas("Stylize with ReDi", "key from the content prompt, resumed with content + style (sepia)")
    px, x_content, x_styled, y0 = 96, 60, 244, 92
    label(draw, (x_content + px // 2, y0 - 4), "content", size=13, anchor="md")
    label(draw, (x_styled + px // 2, y0 - 4), "ReDi, styled resume", size=13, anchor="md")
    for r in range(3):
        y = y0 + r * (px + 6)
        paste(img, draw, content[r], x_content, y, px)
        arrow(draw, (x_content + px + 14, y + px // 2), (x_styled - 14, y + px // 2), fill=ACCENT)
        paste(img, draw, result.latent[r], x_styled, y, px)
    return img


def draw_tstitch(m: Models, template: Template):
    import torch
    from kb_tools.samplers.tstitch import tstitch_sample
    prompt = queries(1)
    pos, neg = conditioning(m, prompt)
    seen = Denoised()
    stitched, run = tstitch_sample(m.small, m.large, small_positive=pos, small_negative=neg, large_positive=pos,
                                   large_negative=neg, latent={"samples": torch.zeros((1, *m.kb.latent_shape))}, seed=0,
                                   sampler_name=SAMPLER, scheduler=SCHEDULER, steps=STEPS, cfg=CFG,
                                   small_fraction=0.4, callback=seen)
    out, switch = stitched["samples"], run.small_steps
    large_only = plain(m, prompt)
    img, draw = canvas("T-Stitch", f"the small model runs the first {switch} of {STEPS} steps, the large model the rest (steps shown denoised)")
    bar_y, x0, step_w = 90, 20, 36
    for s in range(STEPS):
        draw.rectangle([x0 + s * step_w, bar_y, x0 + (s + 1) * step_w - 3, bar_y + 14], fill=SMALL_MODEL if s < switch else LARGE_MODEL)
    label(draw, (x0, bar_y + 20), "small model", size=12, fill=SMALL_MODEL)
    label(draw, (x0 + switch * step_w, bar_y + 20), "large model", size=12, fill=LARGE_MODEL)
    px = 72
    for i, s in enumerate([1, 3, 5, 7]):
        x = x0 + i * (px + 20) + 4
        paste(img, draw, seen.steps[s][0], x, 134, px, outline=SMALL_MODEL if s < switch else LARGE_MODEL, caption=f"step {s}")
    big = 104
    paste(img, draw, out[0], 60, 252, big, outline=ACCENT, caption="T-Stitch")
    paste(img, draw, large_only[0], 236, 252, big, caption="large model only")
    return img


def draw_calibrated(m: Models, template: Template):
    """Fresh seeds and held-out captions at CALIBRATED_NFE evaluations: euler/normal, what the calibration chose for
    this model, and the converged image they are scored against (mean squared error under each)."""
    import torch
    from kb_tools import calibrate_sampler, cfg_guider, plain_sigmas, sample_counted, seeded_noise
    calibration = calibrate_sampler(m.kb, m.large, m.encode, nfe=(CALIBRATED_NFE,), cfgs=(CFG,),
                                    teachers=CALIBRATION_TEACHERS, latent_shape=m.kb.latent_shape)
    choice = calibration.choice(m.large, CFG, m.kb.latent_shape, CALIBRATED_NFE)
    prompts, seeds = queries(3), FRESH_SEEDS
    pos, neg = conditioning(m, prompts)
    latent = torch.zeros((len(prompts), *m.kb.latent_shape))

    def plain_run(sampler: str, schedule: str, steps: int):
        guider = cfg_guider(m.large, pos, neg, CFG)
        return sample_counted(guider, latent, seeds, plain_sigmas(m.large, sampler, schedule, steps), sampler)[0]

    with torch.no_grad():
        ran = cfg_guider(m.large, pos, neg, CFG).sample(
            seeded_noise(latent, seeds), latent, choice.ksampler(), torch.as_tensor(choice.sigmas).float(),
            disable_pbar=True, seed=seeds[0]).float().cpu()
    euler = plain_run("euler", "normal", CALIBRATED_NFE)
    converged = plain_run(*CONVERGED)
    chosen = "calibrated" if choice.kind == "calibrated" else f"{choice.sampler_name}/{choice.schedule}"
    img, draw = canvas("Calibrated sampler", f"{CALIBRATED_NFE} model evaluations on fresh seeds: euler, what the "
                                             "calibration chose for this model, and the converged image")
    px, y0 = 96, 96
    columns = [("euler/normal", euler), (chosen, ran), ("converged", converged)]
    for c, (name, latents) in enumerate(columns):
        x = 24 + c * (px + 28)
        label(draw, (x + px // 2, y0 - 6), name, size=13, anchor="md")
        for r in range(3):
            y = y0 + r * (px + 4)
            mse = float(((latents[r] - converged[r]) ** 2).mean())
            paste(img, draw, latents[r], x, y, px, outline=ACCENT if latents is ran else None)
            if latents is not converged:
                label(draw, (x + px + 2, y + px - 2), f"{mse:.0e}", size=11, fill=MUTED, anchor="rd")
    return img


def draw_diagram(m: Models | None, template: Template):
    """The template's stages (its groups, read me excepted) as boxes with arrows, band by band."""
    stages = [g for g in template.groups if g.title.lower() != "read me"]
    img, draw = canvas(template.file.split(". ", 1)[-1][:30], "stages of this template")
    y = 84
    height = min(64, (SIZE - y - 16) // max(1, len(stages)) - 14)
    for i, g in enumerate(stages):
        draw.rounded_rectangle([40, y, SIZE - 40, y + height], radius=8, fill=PANEL, outline=ACCENT if i == len(stages) - 1 else None)
        label(draw, (SIZE // 2, y + height // 2), g.title, size=14, anchor="mm")
        if i + 1 < len(stages):
            arrow(draw, (SIZE // 2, y + height + 2), (SIZE // 2, y + height + 12))
        y += height + 14
    return img


RECIPES = {"build": draw_build, "redi": draw_redi, "redi_four_nodes": draw_four_nodes, "stylize": draw_stylize,
           "tstitch": draw_tstitch, "calibrated": draw_calibrated, "diagram": draw_diagram}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", help="template files to redraw (default: all)")
    a = p.parse_args(argv)
    catalog = [t for t in load_catalog() if not a.only or t.file in a.only]
    unknown = sorted({t.thumbnail for t in catalog} - set(RECIPES))
    if unknown:
        raise SystemExit(f"templates.toml names thumbnail recipes {unknown}; known: {sorted(RECIPES)}")
    DOCS_IMG.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="redi-thumbnails-") as work:
        models = setup(Path(work)) if any(t.thumbnail != "diagram" for t in catalog) else None
        for t in catalog:
            img = RECIPES[t.thumbnail](models, t)
            img.save(t.thumbnail_path, "JPEG", quality=85, optimize=True)
            if t.thumbnail != "diagram":
                shutil.copyfile(t.thumbnail_path, DOCS_IMG / f"{t.thumbnail}.jpg")
            print(f"wrote {t.thumbnail_path.relative_to(PACK_DIR)} ({t.thumbnail_path.stat().st_size // 1024} KB, recipe {t.thumbnail})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
