"""The templates read well on the canvas and in the template browser (no ComfyUI needed).

Every UI-format file under example_workflows/: no two nodes (notes included, title bars
included) overlap, every node sits in exactly one titled group, groups do not overlap, wires run
left to right; every file is listed in templates.toml, numbered in the user's order, with its
thumbnail. The same checks on the live page (sizes as the front end draws them) are in
test_frontend_browser.py.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from layout_workflows import layout  # noqa: E402
from template_catalog import README, layout_problems, load_catalog, node_box, readme_with_table, ui_files  # noqa: E402

CATALOG = load_catalog()
UI_FILES = ui_files()
WINDOWS_UNSAFE = set('<>:"/\\|?*')


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_every_ui_file_is_in_the_catalog_and_vice_versa():
    assert sorted(p.stem for p in UI_FILES) == sorted(t.file for t in CATALOG), \
        "add each example_workflows/*.json to example_workflows/templates.toml (and remove entries whose file is gone)"


def test_names_are_numbered_titles_in_the_users_order():
    """The front end shows the file name as title and sorts 'A -> Z' by it: '1. ...', '2. ...' in catalog order."""
    for i, t in enumerate(CATALOG, 1):
        assert t.file.startswith(f"{i}. ") and t.file[len(f"{i}. "):][:1].isupper(), t.file
        assert not WINDOWS_UNSAFE & set(t.file), f"{t.file!r}: a character Windows cannot have in a file name"
        assert "_" not in t.file, f"{t.file!r}: the front end shows '_' as a space in the description"
        assert t.description.strip() and "\n" not in t.description and len(t.description) <= 160
    assert len(CATALOG) <= 9, "with ten or more templates, renumber all with two digits so 'A -> Z' keeps the order"


def test_readme_lists_the_templates_with_their_descriptions():
    text = README.read_text(encoding="utf-8")
    assert readme_with_table(text, CATALOG) == text, "run python scripts/template_catalog.py to update README's template table"


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_layout_has_no_overlap_every_node_in_a_group_and_wires_left_to_right(path):
    graph = load(path)
    assert graph.get("groups"), f"{path.name}: group the nodes of each stage (scripts/layout_workflows.py)"
    assert all(g["title"].strip() for g in graph["groups"])
    problems = layout_problems(graph)
    assert not problems, f"{path.name}:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("template", CATALOG, ids=lambda t: t.file)
def test_layout_is_what_the_catalog_describes(template):
    graph = load(template.ui_path)
    assert layout(graph, template) == graph, f"{template.ui_path.name}: run python scripts/layout_workflows.py"


@pytest.mark.parametrize("template", CATALOG, ids=lambda t: t.file)
def test_thumbnail_is_a_small_square_jpeg(template):
    from PIL import Image
    path = template.thumbnail_path
    assert path.is_file(), f"no thumbnail {path.name}: run python scripts/make_thumbnails.py"
    assert path.stat().st_size < 80_000, f"{path.name} is {path.stat().st_size} bytes"
    with Image.open(path) as im:
        assert im.format == "JPEG" and im.size == (400, 400)


# --------------------------------------------------------------------------- the checker itself

def _graph(nodes, links=(), groups=()):
    return {"nodes": [{"id": i, "type": "Note", "pos": list(pos), "size": list(size)} for i, pos, size in nodes],
            "links": [list(lk) for lk in links], "groups": list(groups)}


def test_checker_finds_an_overlap_that_only_the_title_bar_makes():
    # Node 2 starts 10 px below node 1's bottom edge, but its 30 px title bar reaches into node 1.
    graph = _graph([(1, (0, 0), (100, 100)), (2, (0, 110), (100, 50))])
    assert node_box(graph["nodes"][1])[1] == 80
    assert layout_problems(graph) == ["Note 1 overlaps Note 2"]
    assert layout_problems(_graph([(1, (0, 0), (100, 100)), (2, (0, 131), (100, 50))])) == []


def test_checker_finds_nodes_outside_groups_and_backward_wires():
    group = {"title": "1. stage", "bounding": [-20, -80, 300, 250], "font_size": 24}
    graph = _graph([(1, (0, 0), (100, 100)), (2, (400, 0), (100, 100))], links=[(1, 2, 0, 1, 0, "LATENT")], groups=[group])
    problems = layout_problems(graph)
    assert problems == ["Note 2 sits in 0 groups [] (every node belongs below the title of exactly one)",
                        "link 1 runs right to left: Note 2 ends at x=500, Note 1 starts at x=0"]
