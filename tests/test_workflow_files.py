"""The shipped example workflows are well-formed files (no ComfyUI needed).

example_workflows/<name>.json is the UI graph the front end offers as a template;
example_workflows/api/<name>.api.json is its /prompt (API format) twin, kept in a sub-folder so
the template list (which globs only example_workflows/*.json) does not offer it.
The checks against a real server's /object_info are in test_e2e_server.py.
"""
from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

WORKFLOWS = Path(__file__).resolve().parent.parent / "example_workflows"
API_DIR = WORKFLOWS / "api"
UI_FILES = sorted(WORKFLOWS.glob("*.json"))
API_FILES = sorted(API_DIR.glob("*.json"))
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
# The use cases the pack ships: the templates listed in example_workflows/templates.toml.
EXPECTED = {t["file"] for t in tomllib.loads((WORKFLOWS / "templates.toml").read_text(encoding="utf-8"))["template"]}
#: Earlier versions' files, byte for byte as users saved them: they must keep loading and running.
LEGACY = Path(__file__).resolve().parent / "fixtures" / "workflows_0_1_0"
LEGACY_UI = sorted(LEGACY.glob("*.json"))


def api_name(path: Path) -> str:
    assert path.name.endswith(".api.json"), f"{path}: API twins are named <name>.api.json"
    return path.name[: -len(".api.json")]


def load(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_every_use_case_is_shipped():
    assert {p.stem for p in UI_FILES} == EXPECTED


def test_every_ui_file_has_an_api_twin_and_vice_versa():
    assert {p.stem for p in UI_FILES} == {api_name(p) for p in API_FILES}
    assert not list(WORKFLOWS.glob("*.api.json")), "API twins belong in example_workflows/api/, not in the template list"


def test_legacy_files_are_kept_with_their_twins():
    # Version 0.1.0 shipped these five files under these names; users have saved and shared them.
    assert {p.stem for p in LEGACY_UI} == {"redi_build_knowledge_base", "redi_generate_four_nodes", "redi_sampler",
                                           "redi_stylize", "tstitch_sampler"}
    assert {p.stem for p in LEGACY_UI} == {api_name(p) for p in sorted((LEGACY / "api").glob("*.json"))}


@pytest.mark.parametrize("path", UI_FILES + API_FILES, ids=lambda p: str(p.relative_to(WORKFLOWS)))
def test_parses_as_a_json_object(path):
    assert isinstance(load(path), dict)


@pytest.mark.parametrize("path", UI_FILES + LEGACY_UI, ids=lambda p: str(p.relative_to(p.parent.parent)))
def test_ui_graph_is_consistent(path):
    graph = load(path)
    for key in ("nodes", "links", "version", "last_node_id", "last_link_id", "groups", "config", "extra"):
        assert key in graph, f"{path.name}: no {key!r}"
    assert graph["version"] == 0.4
    nodes = {}
    for node in graph["nodes"]:
        keys = ("id", "type", "pos", "size", "widgets_values")
        if node["type"] not in FRONTEND_ONLY:
            keys += ("inputs", "outputs")
        for key in keys:
            assert key in node, f"{path.name}: node {node.get('id')} has no {key!r}"
        assert node["id"] not in nodes, f"{path.name}: node id {node['id']} twice"
        nodes[node["id"]] = node
    assert graph["last_node_id"] >= max(nodes)
    links = {}
    for link in graph["links"]:
        assert len(link) == 6, link
        assert link[0] not in links, f"{path.name}: link id {link[0]} twice"
        links[link[0]] = link
    assert graph["last_link_id"] >= max(links, default=0)

    # Every link's endpoints point back at it, with matching types.
    for lid, src, src_slot, dst, dst_slot, typ in links.values():
        assert src in nodes and dst in nodes, f"{path.name}: link {lid} joins unknown nodes"
        out = nodes[src]["outputs"][src_slot]
        assert lid in (out.get("links") or []), f"{path.name}: link {lid} is not listed by node {src} output {src_slot}"
        assert out["type"] == typ, (path.name, lid, out["type"], typ)
        inp = nodes[dst]["inputs"][dst_slot]
        assert inp.get("link") == lid, f"{path.name}: node {dst} input {dst_slot} does not hold link {lid}"
        assert inp["type"] == typ, (path.name, lid, inp["type"], typ)
    # Every link a node mentions exists, with this node at the right end and slot.
    for node in nodes.values():
        for slot, inp in enumerate(node.get("inputs", [])):
            if inp.get("link") is not None:
                link = links.get(inp["link"])
                assert link is not None, f"{path.name}: node {node['id']} input {inp['name']} names missing link {inp['link']}"
                assert (link[3], link[4]) == (node["id"], slot), (path.name, node["id"], inp)
        for slot, out in enumerate(node.get("outputs", [])):
            for lid in out.get("links") or []:
                link = links.get(lid)
                assert link is not None, f"{path.name}: node {node['id']} output {out['name']} names missing link {lid}"
                assert (link[1], link[2]) == (node["id"], slot), (path.name, node["id"], out)


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_ui_graph_explains_itself_in_a_note(path):
    notes = [n for n in load(path)["nodes"] if n["type"] == "Note"]
    assert notes and all(isinstance(n["widgets_values"][0], str) and n["widgets_values"][0].strip() for n in notes)


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_api_twin_has_the_same_nodes_links_and_values(path):
    graph, api = load(path), load(API_DIR / f"{path.stem}.api.json")
    nodes = {str(n["id"]): n for n in graph["nodes"] if n["type"] not in FRONTEND_ONLY}
    assert sorted(nodes) == sorted(api), f"{path.name}: node ids differ from the API twin"
    links = {lk[0]: lk for lk in graph["links"]}
    for nid, entry in api.items():
        assert set(entry) >= {"class_type", "inputs"}, (path.name, nid)
        node = nodes[nid]
        assert entry["class_type"] == node["type"], (path.name, nid)
        ui_links = {inp["name"]: [str(links[inp["link"]][1]), links[inp["link"]][2]]
                    for inp in node.get("inputs", []) if inp.get("link") is not None}
        api_links = {k: v for k, v in entry["inputs"].items() if isinstance(v, list)}
        assert ui_links == api_links, (path.name, nid, ui_links, api_links)
        for ref in api_links.values():
            assert ref[0] in api, f"{path.stem}.api.json: node {nid} links to missing node {ref[0]}"
        # Widget values: the API values appear in widgets_values in the same order (the UI adds
        # 'control after generate' values such as "fixed" after seeds).
        values = [v for v in entry["inputs"].values() if not isinstance(v, list)]
        it = iter(node.get("widgets_values") or [])
        for v in values:
            assert any(w == v for w in it), f"{path.name}: node {nid} {node['type']}: API value {v!r} is not in widgets_values in order"
