"""Node help pages: web/docs/<node id>.md for every node of the pack, written from the nodes' own schemas.

    bash -c 'source scripts/env.sh && "$REDI_PYTHON" scripts/make_node_docs.py'           # rewrite
    bash -c 'source scripts/env.sh && "$REDI_PYTHON" scripts/make_node_docs.py --check'   # exit 1 when stale

The pinned front end (1.32.9) opens a custom node's help from
/extensions/<pack folder>/docs/<node id>.md (NodeHelpService.fetchCustomNodeHelp, after trying
docs/<node id>/<locale>.md) and resolves relative links against /extensions/<pack folder>/docs/;
ComfyUI serves web/ there through the pack's WEB_DIRECTORY. Each page: what the node does (the
schema's description), a picture (the thumbnail of the first template that uses the node, copied
to web/docs/img/ by scripts/make_thumbnails.py), the templates it appears in, its inputs and
outputs with their tooltips, and what it shows on the canvas.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PACK_DIR / "scripts"))

from template_catalog import load_catalog  # noqa: E402

DOCS = PACK_DIR / "web" / "docs"
ON_THE_CANVAS = {
    "BuildKnowledgeBase": "When the build finishes, the box at the bottom of the node shows how many trajectories it added and "
                          "holds in total, how long it took, the size on disk and the stored steps. ReDi Load Knowledge Base "
                          "lists the new knowledge base right away (the page refreshes the node definitions by itself).",
    "ReDiSampler": "After a run, the box at the bottom shows the summary line (steps skipped, residual against the guard) and one "
                   "line per image: skipped steps, or fell back to plain sampling because the match was poor.",
    "ReDiLearningSampler": "After a run, the box at the bottom shows the summary line (steps skipped, or that the knowledge base "
                           "was empty and everything was sampled in full), one line per image, and what was learned: "
                           "trajectories added, the oldest dropped for the budget, how many the knowledge base holds.",
    "ReDiResumeSample": "After a run, the box at the bottom shows the summary line and, per image, whether it skipped steps or "
                        "fell back to plain sampling, with its residual and the guard.",
    "ReDiRetrieve": "After a run, the box lists each image's nearest stored trajectories: prompt, seed and distance (ReDi Blend solves their "
                    "weights). Connect the checkpoint's VAE to the optional `vae` input to see them as images on the node "
                    "(their latents at the knowledge base's last stored step, decoded).",
    "ReDiCalibrateSampler": "When the calibration finishes, the box at the bottom shows one line per step count: what the "
                            "held-out check chose for this model (the calibrated sampler, or a built-in sampler x "
                            "scheduler) and its error against the converged image next to the best alternative. The "
                            "`summary` output carries the same text.",
    "ReDiCalibratedSampler": "After a run, the box at the bottom shows the calibration's line for this step count, which "
                             "sampler ran (saying so when the held-out check chose a built-in one) and the model "
                             "evaluations counted.",
    "SamplerReDiCalibrated": "When SamplerCustomAdvanced has run it, the node shows the same lines as ReDi Calibrated "
                             "Sampler (ComfyUI's progress text): the choice for this step count, which sampler ran and "
                             "the model evaluations counted.",
}
README_LINK = "More: the pack's README (How it works, Knobs, Build, generate, stylize)."


def load_pack():
    """Import ComfyUI (scripts/env.sh's copy or COMFYUI_PATH) and this pack as a package, as ComfyUI does."""
    sys.path.insert(0, str(PACK_DIR))
    from embedded.models import setup_comfy
    setup_comfy(1)
    import nodes  # noqa: F401  ComfyUI's own nodes module first, as in a server (the pack's folder shares the name)
    spec = importlib.util.spec_from_file_location("redi_docs_pack", PACK_DIR / "__init__.py", submodule_search_locations=[str(PACK_DIR)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["redi_docs_pack"] = module
    spec.loader.exec_module(module)
    return module


def node_infos(pack) -> list[dict]:
    import asyncio
    return [cls.GET_NODE_INFO_V1() for cls in asyncio.run(pack.nodes.ReDiExtension().get_node_list())]


def describe_input(spec: list) -> tuple[str, str]:
    """(type, default) of an /object_info input spec."""
    kind, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    if isinstance(kind, list) or kind == "COMBO":
        kind = "choice"
    default = opts.get("default")
    if default is None or default == "":
        shown = "" if default is None else '""'
    elif isinstance(default, str) and "\n" in default:
        shown = "(a list, see the node)"
    else:
        shown = f"`{json.dumps(default) if isinstance(default, str) else default}`"
    return str(kind), shown


def cell(text: str) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ")


def render(info: dict, templates: list, picture: str | None) -> str:
    lines = [f"# {info['display_name']}", "", info["description"], ""]
    if picture:
        lines += [f"![{templates[0]}](img/{picture}.jpg)", ""]
    lines += [f"Node id `{info['name']}`, category `{info['category']}`."]
    if templates:
        lines += ["Templates that use it (template browser, ReDi Sampling): " + ", ".join(f"*{t}*" for t in templates) + "."]
    lines += ["", "## Inputs", "", "| input | type | default | what it does |", "| --- | --- | --- | --- |"]
    for section in ("required", "optional"):
        for name in info["input_order"].get(section, []):
            spec = info["input"][section][name]
            kind, default = describe_input(spec)
            tooltip = spec[1].get("tooltip", "") if len(spec) > 1 and isinstance(spec[1], dict) else ""
            lines.append(f"| `{name}`{' (optional)' if section == 'optional' else ''} | {kind} | {default} | {cell(tooltip)} |")
    lines += ["", "## Outputs", "", "| output | type | what it is |", "| --- | --- | --- |"]
    for name, kind, tooltip in zip(info["output_name"], info["output"], info.get("output_tooltips") or [None] * len(info["output"])):
        lines.append(f"| `{name}` | {kind} | {cell(tooltip or '')} |")
    if info["name"] in ON_THE_CANVAS:
        lines += ["", "## On the canvas", "", ON_THE_CANVAS[info["name"]]]
    lines += ["", README_LINK, ""]
    return "\n".join(lines)


def pages(pack) -> dict[str, str]:
    """file name -> page text for every node of the pack."""
    catalog = load_catalog()
    uses = {t.file: {n["type"] for n in json.loads(t.ui_path.read_text(encoding="utf-8"))["nodes"]} for t in catalog}
    out = {}
    for info in node_infos(pack):
        templates = [t for t in catalog if info["name"] in uses[t.file]]
        picture = next((t.thumbnail for t in templates if t.thumbnail != "diagram"), None)
        out[f"{info['name']}.md"] = render(info, [t.file for t in templates], picture)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only report pages that differ from the schemas")
    a = p.parse_args(argv)
    want = pages(load_pack())
    DOCS.mkdir(parents=True, exist_ok=True)
    stale = [name for name, text in want.items() if not (DOCS / name).is_file() or (DOCS / name).read_text(encoding="utf-8") != text]
    extra = sorted(p.name for p in DOCS.glob("*.md") if p.name not in want)
    if a.check:
        if stale or extra:
            print(f"node help pages out of date: {stale} (stale), {extra} (no such node); run python scripts/make_node_docs.py")
            return 1
        print("node help pages up to date")
        return 0
    for name in stale:
        (DOCS / name).write_text(want[name], encoding="utf-8")
    for name in extra:
        (DOCS / name).unlink()
    print(f"wrote {len(stale)} page(s), removed {len(extra)} in {DOCS.relative_to(PACK_DIR)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
