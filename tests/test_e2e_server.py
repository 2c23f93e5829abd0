"""End to end: a real ComfyUI server loads the pack from outside its tree and runs the shipped example workflows,
and the workflow files of earlier versions (tests/fixtures/workflows_0_1_0, byte for byte as users saved them).

One server for the module (about 12 s to start), a real SD1.5-format checkpoint with random
weights (tests/make_checkpoint.py), every workflow at 64x64 pixels and 8 steps on the CPU.
The 0.1.0 build workflow runs first (its first prompt also loads the checkpoint); the query
workflows of both sets use the knowledge base it made, by name, as a user would.
"""
from __future__ import annotations

import json
import sys
import urllib.parse
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_checkpoint import check_checkpoint, make_sd15_checkpoint  # noqa: E402
from server_harness import PACK_NAME, server_for_prompts  # noqa: E402

pytestmark = [pytest.mark.comfy, pytest.mark.server, pytest.mark.slow]

PACK_DIR = Path(__file__).resolve().parent.parent
WORKFLOWS = PACK_DIR / "example_workflows"
API_DIR = WORKFLOWS / "api"
#: Workflow sets: the shipped templates, and earlier versions' files exactly as users saved them.
SETS = {"templates": WORKFLOWS, "0.1.0": PACK_DIR / "tests" / "fixtures" / "workflows_0_1_0"}
UI_NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
CASES = [(s, p.stem) for s, folder in SETS.items() for p in sorted(folder.glob("*.json"))]
PACK_NODES = ["ReDiLoadKnowledgeBase", "BuildKnowledgeBase", "ReDiPartialSample", "ReDiRetrieve", "ReDiBlend",
              "ReDiResumeSample", "ReDiSampler", "TStitchSampler", "SamplerReDi", "ReDiKBNoise", "ReDiKBSigmas",
              "TStitchGuider", "SamplerReDiCorrected", "ReDiLearningSampler"]
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Safety nets only (a busy 2-core machine is slow); the tests poll for completion.
BUILD_TIMEOUT_S = 1800
QUERY_TIMEOUT_S = 1800


def load_ui(name: str, which: str = "templates") -> dict:
    return json.loads((SETS[which] / f"{name}.json").read_text(encoding="utf-8"))


def load_api(name: str, which: str = "templates") -> dict:
    return json.loads((SETS[which] / "api" / f"{name}.api.json").read_text(encoding="utf-8"))


def build_name(which: str) -> str:
    """The set's build workflow: the one with the BuildKnowledgeBase node (the others query its KB)."""
    names = [n for s, n in CASES if s == which]
    return next(n for n in names if any(node["class_type"] == "BuildKnowledgeBase" for node in load_api(n, which).values()))


QUERY_CASES = [(s, n) for s, n in CASES if n != build_name(s)]


def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def checkpoint(comfy_root) -> Path:
    return make_sd15_checkpoint()


@pytest.fixture(scope="module")
def server(comfy_root, checkpoint, tmp_path_factory):
    # Every checkpoint name the workflows ask for is a link to the one test checkpoint.
    with server_for_prompts(comfy_root, tmp_path_factory.mktemp("comfy-e2e"), PACK_DIR,
                            [load_api(n, which) for which, n in CASES], checkpoint) as srv:
        yield srv


@pytest.fixture(scope="module")
def object_info(server) -> dict:
    return server.object_info()


@pytest.fixture(scope="module")
def built_kb(server):
    """Run the 0.1.0 build workflow, unchanged, once; return (history entry, API prompt)."""
    prompt = load_api(build_name("0.1.0"), "0.1.0")
    return server.run(prompt, timeout=BUILD_TIMEOUT_S), prompt


def widget_specs(info: dict, node_type: str) -> list[tuple[str, str, dict]]:
    """(name, type, options) of a node type's widget inputs, in the front end's widget order."""
    d = info[node_type]
    order = d.get("input_order") or {s: list(d["input"].get(s, {})) for s in ("required", "optional")}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = d["input"][section][name]
            typ = "COMBO" if isinstance(spec[0], list) else spec[0]
            opts = dict(spec[1]) if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if isinstance(spec[0], list):
                opts["options"] = spec[0]
            if typ in WIDGET_TYPES and not opts.get("forceInput"):
                out.append((name, typ, opts))
    return out


def has_control_widget(name: str, typ: str, opts: dict) -> bool:
    """The front end adds a 'control after generate' value after such INT widgets (seed and noise_seed by default)."""
    return typ == "INT" and bool(opts.get("control_after_generate", name in ("seed", "noise_seed")))


def split_widget_values(info: dict, node: dict) -> dict:
    """Map a UI node's widgets_values to widget names (dropping control-after-generate values)."""
    values = list(node.get("widgets_values") or [])
    specs = widget_specs(info, node["type"])
    sizes = [2 if has_control_widget(*s) else 1 for s in specs]
    # A file saved before trailing optional widgets were added lacks their values; the front end
    # gives those widgets their defaults (as the server does for the absent API inputs).
    optional = set(info[node["type"]]["input"].get("optional", {}))
    while specs and sum(sizes) > len(values) and specs[-1][0] in optional:
        specs, sizes = specs[:-1], sizes[:-1]
    expected = sum(sizes)
    assert len(values) == expected, (
        f"{node['type']} (node {node['id']}) has {len(values)} widget values, /object_info implies {expected}: "
        f"{[s[0] for s in specs]}")
    out, i = {}, 0
    for name, typ, opts in specs:
        out[name] = values[i]
        i += 1
        if has_control_widget(name, typ, opts):
            assert values[i] in ("fixed", "increment", "decrement", "randomize"), (node["type"], name, values[i])
            i += 1
    return out


# --------------------------------------------------------------------------- tests

def test_checkpoint_loads_and_decodes(checkpoint):
    """The shipped test checkpoint is detected as SD1.5 and its VAE decodes a 64x64 image to finite pixels."""
    facts = check_checkpoint(checkpoint)
    assert facts["model_config"] == "SD15"
    assert facts["cond_shape"] == (1, 77, 768)
    assert facts["pixels_shape"] == (1, 64, 64, 3)


def test_pack_loads_in_a_real_server(server, object_info):
    missing = [n for n in PACK_NODES if n not in object_info]
    assert not missing, f"nodes missing from /object_info: {missing}\n{server.log_tail()}"
    log = server.log_text()
    failed = [line for line in log.splitlines() if "IMPORT FAILED" in line and PACK_NAME in line]
    assert not failed, "\n".join(failed)
    assert f"custom_nodes/{PACK_NAME}" in log, "the start-up log does not list the pack among the loaded custom nodes"
    for node_id in PACK_NODES:
        assert object_info[node_id]["python_module"] == f"custom_nodes.{PACK_NAME}", object_info[node_id]["python_module"]


def test_build_workflow_writes_the_knowledge_base(server, built_kb):
    entry, prompt = built_kb
    assert entry["status"]["status_str"] == "success"
    builds = [node for node in prompt.values() if node["class_type"] == "BuildKnowledgeBase"]
    assert len(builds) == 1
    inputs = builds[0]["inputs"]
    kb_dir = server.layout.redi_kb / inputs["kb_name"]
    manifest = json.loads((kb_dir / "manifest.json").read_text(encoding="utf-8"))
    prompts = [p for p in inputs["prompts"].splitlines() if p.strip()]
    assert manifest["count"] == len(prompts) * inputs["seeds_per_prompt"]
    settings = manifest["settings"]
    assert settings["steps"] == inputs["steps"]
    assert settings["sampler"] == inputs["sampler_name"] and settings["scheduler"] == inputs["scheduler"]
    assert settings["stored_steps"] == sorted(int(s) for s in inputs["store_steps"].split(","))
    assert list(settings["latent_shape"]) == [4, inputs["height"] // 8, inputs["width"] // 8]


def test_kb_combo_lists_the_built_kb(server, built_kb):
    """ReDiLoadKnowledgeBase's kb_name options are recomputed when /object_info is fetched again."""
    _, prompt = built_kb
    kb_name = next(n["inputs"]["kb_name"] for n in prompt.values() if n["class_type"] == "BuildKnowledgeBase")
    spec = server.get("/object_info/ReDiLoadKnowledgeBase")["ReDiLoadKnowledgeBase"]["input"]["required"]["kb_name"]
    options = spec[0] if isinstance(spec[0], list) else spec[1].get("options", [])
    assert kb_name in options, options


def test_template_build_workflow_runs_on_the_same_kb(server, built_kb):
    """The shipped build template resumes the KB the 0.1.0 file made (same settings, nothing to add)."""
    entry = server.run(load_api(build_name("templates")), timeout=BUILD_TIMEOUT_S)
    assert entry["status"]["status_str"] == "success"


@pytest.mark.parametrize("which, name", QUERY_CASES)
def test_query_workflow_runs_and_saves_an_image(server, object_info, built_kb, which, name):
    prompt = load_api(name, which)
    entry = server.run(prompt, timeout=QUERY_TIMEOUT_S)
    assert entry["status"]["status_str"] == "success"
    output_nodes = [nid for nid, node in prompt.items() if object_info[node["class_type"]].get("output_node")]
    assert output_nodes, "a workflow without an output node runs nothing"
    for nid in output_nodes:
        assert prompt[nid]["class_type"] == "SaveImage", f"no check written for output node {prompt[nid]['class_type']}"
        images = entry["outputs"].get(nid, {}).get("images", [])
        assert len(images) == 1, entry["outputs"]
        image = images[0]
        assert image["type"] == "output"
        path = server.layout.output / image["subfolder"] / image["filename"]
        assert path.is_file(), path
        from PIL import Image

        with Image.open(path) as im:
            assert im.size == (64, 64)


@pytest.mark.parametrize("which, name", CASES)
def test_ui_workflow_matches_object_info(object_info, which, name):
    """Every node type exists, every linked input name exists, widget values fit the widget inputs."""
    graph = load_ui(name, which)
    for node in graph["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        assert node["type"] in object_info, f"{name}: unknown node type {node['type']}"
        d = object_info[node["type"]]
        declared = {**d["input"].get("required", {}), **d["input"].get("optional", {})}
        for inp in node.get("inputs", []):
            assert inp["name"] in declared, f"{name}: {node['type']} has no input {inp['name']!r}"
            if "widget" not in inp:
                assert inp["type"] == declared[inp["name"]][0], (name, node["type"], inp)
        assert [o["type"] for o in node.get("outputs", [])] == d["output"], (name, node["type"])
        values = split_widget_values(object_info, node)
        for wname, typ, opts in widget_specs(object_info, node["type"]):
            if wname not in values:  # a trailing optional widget the file predates: its default applies
                continue
            v = values[wname]
            if typ == "COMBO" and not (node["type"] == "ReDiLoadKnowledgeBase" and wname == "kb_name"):
                # kb_name names a KB that exists only after the build workflow ran (checked below).
                assert v in opts.get("options", []), f"{name}: {node['type']}.{wname} = {v!r} is not an option"
            elif typ in ("INT", "FLOAT"):
                assert isinstance(v, (int, float)) and not isinstance(v, bool), (name, node["type"], wname, v)
                assert opts.get("min", v) <= v <= opts.get("max", v), (name, node["type"], wname, v)
            elif typ == "STRING":
                assert isinstance(v, str), (name, node["type"], wname, v)


@pytest.mark.parametrize("which, name", CASES)
def test_ui_and_api_twins_agree(object_info, which, name):
    """The UI graph and its API twin have the same nodes, widget values and links."""
    graph, api = load_ui(name, which), load_api(name, which)
    nodes = {str(n["id"]): n for n in graph["nodes"] if n["type"] not in FRONTEND_ONLY}
    assert sorted(nodes) == sorted(api), f"{name}: node ids differ"
    links = {lk[0]: lk for lk in graph["links"]}
    for nid, node in nodes.items():
        assert api[nid]["class_type"] == node["type"], (name, nid)
        api_inputs = api[nid]["inputs"]
        widgets = split_widget_values(object_info, node)
        for wname, value in widgets.items():
            assert api_inputs.get(wname) == value, f"{name}: node {nid} {node['type']}.{wname}: UI {value!r}, API {api_inputs.get(wname)!r}"
        linked = {}
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                _, src, slot, *_ = links[inp["link"]]
                linked[inp["name"]] = [str(src), slot]
        api_links = {k: v for k, v in api_inputs.items() if is_link(v)}
        assert linked == api_links, f"{name}: node {nid} {node['type']} links differ: UI {linked}, API {api_links}"
        assert set(api_inputs) == set(widgets) | set(linked), (name, nid, sorted(api_inputs))


def test_workflow_templates_list_the_examples(server):
    templates = server.get("/workflow_templates")
    assert sorted(templates.get(PACK_NAME, [])) == UI_NAMES, templates
    # The front end fetches a template from here; it must be the UI-format file, unchanged.
    # Template names are human titles (spaces, dots): the page requests them percent-encoded.
    for name in UI_NAMES:
        served = server.get(f"/api/workflow_templates/{PACK_NAME}/{urllib.parse.quote(name)}.json")
        assert served == load_ui(name)


def test_native_redi_sampler_shows_its_summary_on_its_node(server, built_kb):
    """SamplerReDi runs inside SamplerCustomAdvanced, after its own node finished: the run summary
    reaches the SamplerReDi node as progress text, the same message the page draws on a node."""
    prompt = load_api("6. ReDi as a SamplerCustomAdvanced sampler")
    sampler_ids = [nid for nid, node in prompt.items() if node["class_type"] == "SamplerReDi"]
    assert len(sampler_ids) == 1
    # Another prompt text, so the server samples again instead of answering from its cache.
    prompt["2"]["inputs"]["text"] = "a photograph of a dog"
    assert prompt["2"]["class_type"] == "CLIPTextEncode" and prompt["10"]["inputs"]["guider"][0] == "7"
    entry, texts = server.run_collecting_texts(prompt, timeout=QUERY_TIMEOUT_S)
    assert entry["status"]["status_str"] == "success"
    on_sampler = [text for nid, text in texts if nid == sampler_ids[0]]
    assert on_sampler, f"no progress text for node {sampler_ids[0]}; texts sent: {texts}"
    assert "model evaluations in all" in on_sampler[-1] and "item 0:" in on_sampler[-1], on_sampler[-1]


def test_learning_workflow_creates_its_kb_and_learns_each_full_generation(server):
    """Template 8 twice on its own KB: the first run creates the KB and stores its trajectory; a small prompt change
    from the same seed then runs ReDi against it (one stored entry has no spread to match against, so the guard
    sends it back to plain sampling) and is learned too."""
    from kb_tools.store import KnowledgeBase

    prompt = load_api("8. Generate with a learning knowledge base")
    node = prompt["3"]
    assert node["class_type"] == "ReDiLearningSampler"
    node["inputs"]["kb_name"] = "redi-learning-e2e"  # not the KB the generic query test may have made
    texts = []
    for text in ("a photograph of a cat", "a photograph of a cat, sitting"):
        node["inputs"]["prompt"] = text
        entry = server.run(prompt, timeout=QUERY_TIMEOUT_S)
        assert entry["status"]["status_str"] == "success"
        texts.append(entry["outputs"]["3"]["text"][0])
    assert "the KB was empty" in texts[0] and "learned 1" in texts[0], texts[0]
    assert texts[1].startswith("ReDi:") and "learned 1" in texts[1], texts[1]
    kb = KnowledgeBase.open(server.layout.redi_kb / "redi-learning-e2e", verify="full")
    assert kb.entries == [("a photograph of a cat", 0), ("a photograph of a cat, sitting", 0)] and kb.verify() == []


def test_learning_workflow_with_the_corrected_solver_corrects_a_repeat_and_never_stores_it(server):
    """Template 8 with solver 'corrected euler' on its own KB: the first two generations are sampled in full and learned
    (one stored entry has no spread, so the second is refused and restarts in full), a repeat of the first prompt and
    seed is then corrected at the grid's NFE and not stored."""
    from kb_tools.store import KnowledgeBase

    prompt = load_api("8. Generate with a learning knowledge base")
    node = prompt["3"]
    node["inputs"].update(kb_name="redi-learning-corrected-e2e", solver="corrected euler", nfe=5, neighbours=1, guard=100.0,
                          store_steps="auto")
    texts = []
    for text in ("a photograph of a cat", "a photograph of a cat, sitting", "a photograph of a cat"):
        node["inputs"]["prompt"] = text
        node["inputs"]["max_entries"] = 10000 + len(texts)  # another input, so the server never answers from its cache
        entry = server.run(prompt, timeout=QUERY_TIMEOUT_S)
        assert entry["status"]["status_str"] == "success"
        texts.append(entry["outputs"]["3"]["text"][0])
    assert "fewer than H entries" in texts[0] and "learned 1" in texts[0], texts[0]
    assert "0 of 1 item(s) on the corrected grid" in texts[1] and "learned 1" in texts[1], texts[1]
    assert "1 of 1 item(s) on the corrected grid" in texts[2] and "5 evaluations per item" in texts[2], texts[2]
    assert "learned 0" in texts[2], texts[2]
    kb = KnowledgeBase.open(server.layout.redi_kb / "redi-learning-corrected-e2e", verify="full")
    assert kb.entries == [("a photograph of a cat", 0), ("a photograph of a cat, sitting", 0)] and kb.verify() == []
    assert list(kb.settings.stored_steps) == list(range(1, kb.settings.steps))  # 'auto' stores every step for this solver
