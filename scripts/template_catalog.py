"""The pack's workflow templates as data: example_workflows/templates.toml plus the canvas geometry of a UI file.

    python scripts/template_catalog.py     # rewrite README's template table from templates.toml

Used by scripts/layout_workflows.py, scripts/make_thumbnails.py and the tests; no ComfyUI import.
Geometry follows the pinned front end's LiteGraph: a node's box is its `pos`/`size` plus the
title bar above it (NODE_TITLE_HEIGHT), a group's box is its `bounding`, with a title bar of
font_size * 1.4 at the top.
"""
from __future__ import annotations

import json
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent
WORKFLOWS = PACK_DIR / "example_workflows"
API_DIR = WORKFLOWS / "api"
CATALOG = WORKFLOWS / "templates.toml"
README = PACK_DIR / "README.md"
README_BLOCK = re.compile(r"(<!-- templates:start[^>]*-->\n)(.*?)(<!-- templates:end -->)", re.S)

NODE_TITLE_HEIGHT = 30       # LiteGraph.NODE_TITLE_HEIGHT
GROUP_FONT_SIZE = 24         # LiteGraph.DEFAULT_GROUP_FONT
GROUP_TITLE_HEIGHT = GROUP_FONT_SIZE * 1.4


@dataclass(frozen=True)
class Group:
    title: str
    band: int
    columns: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class Template:
    file: str
    description: str
    thumbnail: str
    groups: tuple[Group, ...]
    sizes: dict

    @property
    def ui_path(self) -> Path:
        return WORKFLOWS / f"{self.file}.json"

    @property
    def api_path(self) -> Path:
        return API_DIR / f"{self.file}.api.json"

    @property
    def thumbnail_path(self) -> Path:
        return WORKFLOWS / f"{self.file}.jpg"

    @property
    def number(self) -> int:
        return int(self.file.split(".", 1)[0])


def load_catalog(path: Path = CATALOG) -> list[Template]:
    """The [[template]] entries of templates.toml, in order."""
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    out = []
    for t in data.get("template", []):
        groups = tuple(Group(g["title"], int(g["band"]), tuple(tuple(int(i) for i in col) for col in g["columns"]))
                       for g in t.get("group", []))
        sizes = {int(k): tuple(v) for k, v in t.get("size", {}).items()}
        out.append(Template(t["file"], t["description"], t["thumbnail"], groups, sizes))
    return out


def ui_files() -> list[Path]:
    """Every UI-format workflow file the template list offers (example_workflows/*.json)."""
    return sorted(p for p in WORKFLOWS.glob("*.json") if is_ui_format(json.loads(p.read_text(encoding="utf-8"))))


def is_ui_format(graph) -> bool:
    return isinstance(graph, dict) and "nodes" in graph and "links" in graph


# --------------------------------------------------------------------------- geometry

Box = tuple[float, float, float, float]  # x, y, width, height


def node_box(node: dict) -> Box:
    """A node's box on the canvas, title bar included."""
    x, y = node["pos"][:2] if isinstance(node["pos"], list) else (node["pos"]["0"], node["pos"]["1"])
    w, h = node["size"][:2] if isinstance(node["size"], list) else (node["size"]["0"], node["size"]["1"])
    return float(x), float(y) - NODE_TITLE_HEIGHT, float(w), float(h) + NODE_TITLE_HEIGHT


def group_box(group: dict) -> Box:
    x, y, w, h = group["bounding"]
    return float(x), float(y), float(w), float(h)


def group_body(group: dict) -> Box:
    """The part of a group below its title bar, where its nodes sit."""
    x, y, w, h = group_box(group)
    title = group.get("font_size", GROUP_FONT_SIZE) * 1.4
    return x, y + title, w, h - title


def overlap(a: Box, b: Box) -> bool:
    """True when two boxes share any area (touching edges do not count)."""
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def inside(inner: Box, outer: Box) -> bool:
    return (inner[0] >= outer[0] and inner[1] >= outer[1] and inner[0] + inner[2] <= outer[0] + outer[2]
            and inner[1] + inner[3] <= outer[1] + outer[3])


def layout_problems(graph: dict) -> list[str]:
    """What is wrong with a UI graph's layout: overlapping nodes or groups, nodes outside groups, wires running right to left."""
    problems = []
    nodes = {n["id"]: n for n in graph["nodes"]}
    boxes = {nid: node_box(n) for nid, n in nodes.items()}
    label = {nid: f"{n['type']} {nid}" + (f" '{n['title']}'" if n.get("title") else "") for nid, n in nodes.items()}
    ids = sorted(boxes)
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            if overlap(boxes[a], boxes[b]):
                problems.append(f"{label[a]} overlaps {label[b]}")
    groups = graph.get("groups") or []
    for i, g in enumerate(groups):
        for h in groups[i + 1:]:
            if overlap(group_box(g), group_box(h)):
                problems.append(f"group '{g['title']}' overlaps group '{h['title']}'")
    if groups:
        for nid in ids:
            owners = [g["title"] for g in groups if inside(boxes[nid], group_body(g))]
            if len(owners) != 1:
                problems.append(f"{label[nid]} sits in {len(owners)} groups {owners} (every node belongs below the title of exactly one)")
    for link in graph["links"]:
        lid, src, _, dst, *_ = link
        sx, _, sw, _ = boxes[src]
        dx = boxes[dst][0]
        if sx + sw >= dx:
            problems.append(f"link {lid} runs right to left: {label[src]} ends at x={sx + sw:g}, {label[dst]} starts at x={dx:g}")
    return problems


# --------------------------------------------------------------------------- README

def readme_table(catalog: list[Template]) -> str:
    return "".join(f"| *{t.file}* | {t.description} |\n" for t in catalog)


def readme_with_table(text: str, catalog: list[Template]) -> str:
    if not README_BLOCK.search(text):
        raise SystemExit("README.md has no <!-- templates:start --> ... <!-- templates:end --> block")
    return README_BLOCK.sub(lambda m: m.group(1) + readme_table(catalog) + m.group(3), text)


if __name__ == "__main__":
    README.write_text(readme_with_table(README.read_text(encoding="utf-8"), load_catalog()), encoding="utf-8")
    print(f"wrote the template table in {README.name}")
    sys.exit(0)
