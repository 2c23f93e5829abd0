"""Lay out the template workflows from example_workflows/templates.toml: node positions, sizes and titled groups.

    python scripts/layout_workflows.py            # rewrite every listed UI file
    python scripts/layout_workflows.py --check    # exit 1 if a file differs from what this would write

Only positions, sizes and the `groups` list change; node types, widget values and links stay
as they are (the API twins in example_workflows/api/ are not touched). Groups of one band sit
in one column of the canvas, stacked; inside a group its columns run left to right, each one
stacking its nodes top to bottom. A node keeps its size unless the catalog gives one (sizes must
not be below what the front end needs for the node's widgets: the browser test checks the page).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from template_catalog import GROUP_FONT_SIZE, GROUP_TITLE_HEIGHT, NODE_TITLE_HEIGHT, Template, layout_problems, load_catalog  # noqa: E402

ORIGIN = (0.0, 0.0)
BAND_GAP = 60          # between columns of groups
GROUP_GAP = 40         # between stacked groups of one band
COLUMN_GAP = 50        # between node columns inside a group (room for the wires)
NODE_GAP = 20          # between stacked nodes (below the next node's title bar)
PADDING = 20           # between a group's edge and its nodes
# LGraphCanvas.node_colors[*].groupcolor: cyan for the read-me group, then one colour per stage.
READ_ME_COLOUR = "#8AA"
STAGE_COLOURS = ["#3f789e", "#b58b2a", "#8A8", "#a1309b", "#b06634", "#88A"]


def node_size(node: dict, template: Template) -> list[float]:
    want = template.sizes.get(node["id"])
    return list(want) if want else list(node["size"][:2])


def layout(graph: dict, template: Template) -> dict:
    """A copy of the UI graph with positions, sizes and groups from the template's catalog entry."""
    graph = json.loads(json.dumps(graph))
    nodes = {n["id"]: n for n in graph["nodes"]}
    listed = [nid for g in template.groups for col in g.columns for nid in col]
    if sorted(listed) != sorted(nodes):
        raise SystemExit(f"{template.file}: templates.toml lists nodes {sorted(listed)}, the file has {sorted(nodes)}; list each node once.")
    for n in nodes.values():
        n["size"] = node_size(n, template)

    def column_size(col) -> tuple[float, float]:
        return (max(nodes[i]["size"][0] for i in col),
                sum(nodes[i]["size"][1] + NODE_TITLE_HEIGHT for i in col) + NODE_GAP * (len(col) - 1))

    def group_size(g) -> tuple[float, float]:
        sizes = [column_size(c) for c in g.columns]
        width = sum(w for w, _ in sizes) + COLUMN_GAP * (len(sizes) - 1) + 2 * PADDING
        height = GROUP_TITLE_HEIGHT + max(h for _, h in sizes) + 2 * PADDING
        return width, height

    groups_out = []
    x = ORIGIN[0]
    stage = 0
    for band in sorted({g.band for g in template.groups}):
        members = [g for g in template.groups if g.band == band]
        band_width = max(group_size(g)[0] for g in members)
        y = ORIGIN[1]
        for g in members:
            _, gh = group_size(g)
            cx = x + PADDING
            for col in g.columns:
                cw, _ = column_size(col)
                cy = y + GROUP_TITLE_HEIGHT + PADDING
                for nid in col:
                    cy += NODE_TITLE_HEIGHT
                    nodes[nid]["pos"] = [round(cx), round(cy)]
                    cy += nodes[nid]["size"][1] + NODE_GAP
                cx += cw + COLUMN_GAP
            read_me = g.title.lower() == "read me"
            colour = READ_ME_COLOUR if read_me else STAGE_COLOURS[stage % len(STAGE_COLOURS)]
            stage += 0 if read_me else 1
            groups_out.append({"id": len(groups_out) + 1, "title": g.title, "bounding": [round(x), round(y), round(band_width), round(gh)],
                               "color": colour, "font_size": GROUP_FONT_SIZE, "flags": {}})
            y += gh + GROUP_GAP
        x += band_width + BAND_GAP
    graph["groups"] = groups_out
    problems = layout_problems(graph)
    if problems:
        raise SystemExit(f"{template.file}: the catalog's columns give a bad layout:\n  " + "\n  ".join(problems))
    return graph


def dump(graph: dict) -> str:
    return json.dumps(graph, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only report files whose layout differs")
    a = p.parse_args(argv)
    stale = []
    for template in load_catalog():
        text = template.ui_path.read_text(encoding="utf-8")
        new = dump(layout(json.loads(text), template))
        if new != text:
            stale.append(template.ui_path.name)
            if not a.check:
                template.ui_path.write_text(new, encoding="utf-8")
    if a.check and stale:
        print("layout out of date (run python scripts/layout_workflows.py): " + ", ".join(stale))
        return 1
    print(("rewrote: " + ", ".join(stale)) if stale and not a.check else "layouts up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
