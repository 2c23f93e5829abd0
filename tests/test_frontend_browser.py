"""The pack in the real front end: ComfyUI 0.3.75 with its pinned front end (1.32.9), driven in headless Chromium.

A real server on 127.0.0.1 loads the pack; Debian's Chromium and chromedriver (installed by
scripts/install_browser.sh when missing and the user is root, else the module is skipped with
the command to run) open the page through selenium. As a user would, the tests open the template
browser, load every template from it (no missing-node dialog, the layout as drawn on the page
has no overlaps), run the build template and a generate template from the page (summary boxes
on the nodes, the new KB in ReDiLoadKnowledgeBase's list without a reload, neighbour previews),
and compare the console with a server that runs without the pack. Screenshots go to
output/frontend-screenshots/ (REDI_SCREENSHOT_DIR to change it). Every wait polls for a state;
the time limits are safety nets for a busy machine.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from make_checkpoint import make_sd15_checkpoint  # noqa: E402
from server_harness import PACK_NAME, ComfyServer, prepare_layout  # noqa: E402
from template_catalog import layout_problems, load_catalog  # noqa: E402

pytestmark = [pytest.mark.comfy, pytest.mark.server, pytest.mark.slow]

PACK_DIR = Path(__file__).resolve().parent.parent
SHOTS = Path(os.environ.get("REDI_SCREENSHOT_DIR", PACK_DIR / "output" / "frontend-screenshots"))
CATALOG = load_catalog()
PAGE_TIMEOUT_S = 600      # page start, template loads (safety nets, polled)
RUN_TIMEOUT_S = 1800      # a queued workflow on a busy CPU
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1600,1400", "--force-device-scale-factor=1"]  # 1400 px: all nine template cards on screen (the front end renders a card's image only when visible)
SUMMARY_NODES = {"BuildKnowledgeBase", "ReDiRetrieve", "ReDiResumeSample", "ReDiSampler", "ReDiLearningSampler",
                 "ReDiCalibrateSampler", "ReDiCalibratedSampler"}
# ReDiLoadKnowledgeBase's kb_name choices as the page knows them (V3 combos: ["COMBO", {options: [...]}]).
KB_OPTIONS = """const spec = LiteGraph.registered_node_types.ReDiLoadKnowledgeBase.nodeData.input.required.kb_name;
                const opts = Array.isArray(spec[0]) ? spec[0] : spec[1].options; return opts;"""
NAV_LABEL = json.loads((PACK_DIR / "locales" / "en" / "main.json").read_text())["templateWorkflows"]["category"].get(PACK_NAME, PACK_NAME)


# --------------------------------------------------------------------------- browser

def browser_paths() -> tuple[str | None, str | None]:
    chromium = os.environ.get("REDI_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("REDI_CHROMEDRIVER") or shutil.which("chromedriver")
    return chromium, driver


@pytest.fixture(scope="module")
def browser_binaries():
    chromium, driver = browser_paths()
    if not (chromium and driver):
        # As root, the test setup installs Debian's packages (the same script .ci/run calls).
        subprocess.run(["bash", str(PACK_DIR / "scripts" / "install_browser.sh")], check=False, timeout=3600)
        chromium, driver = browser_paths()
    # .ci/run sets REDI_REQUIRE_BROWSER=1: there a missing browser fails the run instead of skipping the test.
    missing = pytest.fail if os.environ.get("REDI_REQUIRE_BROWSER") == "1" else pytest.skip
    if not (chromium and driver):
        missing("the browser test needs Chromium and chromedriver: sudo apt-get install -y chromium chromium-driver "
                "(or set REDI_CHROMIUM and REDI_CHROMEDRIVER)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing("selenium is not installed: run the suite with `bash scripts/test.sh` (scripts/requirements-test.txt pins it)")
    return chromium, driver


class Page:
    """One Chromium page on one server; collects the console as it goes."""

    def __init__(self, binaries, server: ComfyServer, profile: Path):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        chromium, driver = binaries
        options = webdriver.ChromeOptions()
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={profile}")
        options.binary_location = chromium
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.server = server
        self.driver = webdriver.Chrome(service=Service(driver), options=options)
        self.driver.set_script_timeout(PAGE_TIMEOUT_S)
        # Keep every request's timing entry (the default buffer of 250 fills up while the app loads).
        self.driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                                    {"source": "performance.setResourceTimingBufferSize(100000);"})
        self.console: list[dict] = []

    def close(self) -> None:
        self.drain_console()
        self.driver.quit()

    def drain_console(self) -> list[dict]:
        entries = self.driver.get_log("browser")
        self.console.extend(entries)
        return entries

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def js_async(self, script: str, *args):
        return self.driver.execute_async_script(script, *args)

    def wait_for(self, what: str, script: str, *args, timeout: float = PAGE_TIMEOUT_S, every: float = 0.5):
        """Poll a JS expression (`return ...`) until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(script, *args)
            if value:
                return value
            if time.monotonic() > deadline:
                self.screenshot(f"timeout-{re.sub(r'[^a-z0-9]+', '-', what.lower())}")
                raise AssertionError(f"the page did not get to '{what}' within {timeout:.0f} s (safety net)")
            time.sleep(every)

    def open(self) -> None:
        self.driver.get(self.server.url)
        self.wait_for("the graph app is up", "return !!(window.app && window.app.graph && window.app.canvas && window.app.extensionManager)")

    def screenshot(self, name: str) -> Path:
        SHOTS.mkdir(parents=True, exist_ok=True)
        path = SHOTS / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def click_text(self, text: str, within: str = "body") -> None:
        """Click the innermost visible element whose text is exactly `text`."""
        clicked = self.js("""
            const [text, within] = arguments;
            const root = document.querySelector(within) || document.body;
            const hits = Array.from(root.querySelectorAll('*')).filter(e => e.offsetParent !== null &&
                Array.from(e.childNodes).some(n => n.nodeType === 3 && n.textContent.trim() === text));
            if (!hits.length) return false;
            hits[hits.length - 1].click();
            return true;""", text, within)
        assert clicked, f"nothing on the page reads {text!r}"

    def close_dialogs(self) -> None:
        """Close the open dialogs with their close (x) buttons."""
        self.js("""document.querySelectorAll('.p-dialog button').forEach(b => { if (b.querySelector('.pi-times')) b.click(); });""")
        self.wait_for("the dialogs are closed", "return !document.querySelector('.p-dialog')")

    def open_template_browser(self) -> None:
        if not self.js("return !!document.querySelector('[data-testid=template-workflows-content]')"):
            self.js("window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
        self.wait_for("the template browser", "return !!document.querySelector('[data-testid=template-workflows-content]')")
        self.click_text(NAV_LABEL)
        self.wait_for("the pack's templates", "return document.querySelectorAll('[data-testid^=\"template-workflow-\"]').length > 0")

    def cards(self) -> list[dict]:
        """The template cards shown, in page order: title, description, thumbnail URL and whether it loaded."""
        return self.js("""
            return Array.from(document.querySelectorAll('[data-testid^="template-workflow-"]')).map(card => {
              const img = card.querySelector('img');
              const texts = Array.from(card.querySelectorAll('h3, p')).map(e => e.textContent.trim());
              return {name: card.dataset.testid.replace('template-workflow-', ''), title: texts[0], description: texts[1],
                      src: img ? img.src : null, loaded: !!(img && img.complete && img.naturalWidth > 0)};
            });""")

    def load_template(self, name: str) -> None:
        """Open the template browser, click the template's card, wait until its graph is on the canvas."""
        count = len(json.loads(next(t for t in CATALOG if t.file == name).ui_path.read_text(encoding="utf-8"))["nodes"])
        self.open_template_browser()
        card = f'[data-testid="template-workflow-{name}"]'
        self.wait_for(f"the card of {name}", "return !!document.querySelector(arguments[0])", card)
        self.js("document.querySelector(arguments[0]).click()", card)
        self.wait_for(f"{name} on the canvas", """
            const wf = window.app.extensionManager.workflow.activeWorkflow;
            // A template opened twice gets a numbered tab name ("<name> (2)").
            return !document.querySelector('[data-testid=template-workflows-content]') && wf && wf.filename.startsWith(arguments[0])
                   && window.app.graph._nodes.length === arguments[1];""", name, count)

    def graph_as_drawn(self) -> dict:
        """The canvas graph with positions and sizes as the front end drew them (UI-file shape)."""
        return self.js("""
            const g = window.app.graph;
            return {nodes: g._nodes.map(n => ({id: n.id, type: n.type, title: n.title, pos: Array.from(n.pos), size: Array.from(n.size)})),
                    links: Object.values(g.links).map(l => [l.id, l.origin_id, l.origin_slot, l.target_id, l.target_slot, l.type]),
                    groups: g._groups.map(gr => ({title: gr.title, bounding: Array.from(gr._bounding), font_size: gr.font_size}))};""")

    def fit_view(self, *node_types: str) -> None:
        """Fit the canvas to the nodes of these types (all nodes when none are given), for a screenshot."""
        self.js("""
            const types = arguments[0];
            const canvas = window.app.canvas;
            const clear = () => (canvas.deselectAll || canvas.deselectAllNodes).call(canvas);
            clear();
            for (const n of window.app.graph._nodes.filter(n => types.includes(n.type))) (canvas.select || canvas.selectNode).call(canvas, n);
            window.app.extensionManager.command.execute('Comfy.Canvas.FitView');
            clear();
            canvas.setDirty(true, true);""", list(node_types))
        time.sleep(0.5)  # one animation frame to draw; the screenshot is not a check

    def visible_dialogs(self) -> list[str]:
        return self.js("return Array.from(document.querySelectorAll('.p-dialog')).filter(d => d.offsetParent !== null).map(d => d.innerText.slice(0, 500))")

    def node_summaries(self) -> dict:
        return self.js("""
            const out = {};
            for (const n of window.app.graph._nodes) {
              const w = (n.widgets || []).find(w => w.name === 'redi_summary');
              if (w) out[n.type] = w.value;
            }
            return out;""")

    def run_workflow(self, what: str) -> dict:
        """Press the page's Run button and wait until the server's history has the prompt; return its entry."""
        before = set(self.server.get("/history"))
        pressed = self.js("""
            const run = Array.from(document.querySelectorAll('button')).find(b => b.offsetParent !== null && b.innerText.trim() === 'Run');
            if (!run) return false;
            run.click();
            return true;""")
        assert pressed, "no Run button on the page"
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while True:
            history = self.server.get("/history")
            new = [entry for pid, entry in history.items() if pid not in before and entry.get("status", {}).get("completed") is not None]
            if new:
                entry = new[0]
                assert entry["status"]["status_str"] == "success", f"{what} failed: {json.dumps(entry['status'])[:3000]}\n{self.server.log_tail()}"
                return entry
            assert time.monotonic() < deadline, f"{what} did not finish within {RUN_TIMEOUT_S} s (safety net)\n{self.server.log_tail()}"
            time.sleep(1.0)


def is_environment_error(entry: dict) -> bool:
    """Console errors that only say this machine is offline (requests to the internet), not that anything is broken."""
    msg = entry["message"]
    return "net::ERR_NAME_NOT_RESOLVED" in msg or "net::ERR_INTERNET_DISCONNECTED" in msg or "api.comfy.org" in msg


def normalise(entry: dict, port: int) -> str:
    """A console message without what differs between two servers: port, ids, line:column, counts."""
    msg = entry["message"].replace(f"127.0.0.1:{port}", "HOST")
    msg = re.sub(r"\b[0-9a-f]{8}-[0-9a-f-]{27}\b", "UUID", msg)
    msg = re.sub(r"\d+", "N", msg)
    return msg.split("\n")[0]


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def checkpoint_names() -> set[str]:
    return {node["inputs"]["ckpt_name"] for t in CATALOG for node in json.loads(t.api_path.read_text(encoding="utf-8")).values()
            if node["class_type"] == "CheckpointLoaderSimple"}


@pytest.fixture(scope="module")
def baseline_console(browser_binaries, comfy_root, checkpoint_names, tmp_path_factory):
    """Console errors of the same page on the same ComfyUI without the pack (opened, template browser shown)."""
    root = tmp_path_factory.mktemp("browser-baseline")
    layout = prepare_layout(root, PACK_DIR, {n: make_sd15_checkpoint() for n in checkpoint_names}, with_pack=False)
    server = ComfyServer(Path(comfy_root), layout)
    page = None
    try:
        server.start()
        page = Page(browser_binaries, server, root / "chromium-profile")
        page.open()
        page.js("window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
        page.wait_for("the template browser", "return !!document.querySelector('[data-testid=template-workflows-content]')")
        page.close_dialogs()
        page.drain_console()
        return [e for e in page.console if e["level"] == "SEVERE"], server.port
    finally:
        if page is not None:
            page.close()
        server.stop()


@pytest.fixture(scope="module")
def page(browser_binaries, comfy_root, checkpoint_names, tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    layout = prepare_layout(root, PACK_DIR, {n: make_sd15_checkpoint() for n in checkpoint_names})
    server = ComfyServer(Path(comfy_root), layout)
    p = None
    try:
        server.start()
        if SHOTS.exists():
            shutil.rmtree(SHOTS)
        # A user who sorted the template list "A -> Z" (the only order the front end lets a pack control).
        server.post("/settings/Comfy.Templates.SortBy", "alphabetical")
        # Draw nodes in full at every zoom, so a whole template fits in a legible screenshot.
        server.post("/settings/LiteGraph.Canvas.MinFontSizeForLOD", 0)
        p = Page(browser_binaries, server, root / "chromium-profile")
        p.open()
        yield p
    finally:
        if p is not None:
            p.close()
        server.stop()


# --------------------------------------------------------------------------- tests

def test_template_browser_shows_titles_thumbnails_in_the_users_order(page):
    page.open_template_browser()
    page.wait_for("every thumbnail loaded", """
        const imgs = Array.from(document.querySelectorAll('[data-testid^="template-workflow-"] img'));
        return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);""")
    page.screenshot("01-template-browser")
    cards = page.cards()
    assert [c["name"] for c in cards] == [t.file for t in CATALOG], "sorted A -> Z, the cards follow the user's path"
    # The page fetches each thumbnail and shows it from a blob: the fetches must have found the files.
    fetched = {urllib.parse.unquote(e["name"]): e["status"] for e in page.js(
        "return performance.getEntriesByType('resource').map(e => ({name: e.name, status: e.responseStatus}))")}
    for card in cards:
        assert card["title"] == card["name"], card
        assert card["loaded"], card
        url = f"{page.server.url}/api/workflow_templates/{PACK_NAME}/{card['name']}.jpg"
        assert fetched.get(url) == 200, (url, {k: v for k, v in fetched.items() if "workflow_templates" in k})
    nav = page.js("return document.querySelector('[data-testid=template-workflows-content]') ? document.body.innerText : ''")
    assert NAV_LABEL in nav
    page.close_dialogs()


def test_every_template_loads_from_the_browser_without_missing_nodes_or_overlaps(page):
    problems = {}
    for i, template in enumerate(CATALOG, 2):
        page.load_template(template.file)
        wanted = {n["type"] for n in json.loads(template.ui_path.read_text(encoding="utf-8"))["nodes"]}
        unknown = page.js("return arguments[0].filter(t => !LiteGraph.registered_node_types[t])", sorted(wanted))
        dialogs = page.visible_dialogs()
        drawn = page.graph_as_drawn()
        found = layout_problems(drawn)
        if unknown or dialogs or found:
            problems[template.file] = {"unknown node types": unknown, "dialogs": dialogs, "layout": found}
        summaries = {n["type"] for n in drawn["nodes"]} & SUMMARY_NODES
        assert set(page.node_summaries()) == summaries, "the summary box is there before the first run"
        page.fit_view()
        page.screenshot(f"{i:02d}-template-{template.file}")
    assert not problems, json.dumps(problems, indent=1)


def test_node_help_pages_are_served_where_the_front_end_looks(page):
    """The front end's node help reads /extensions/<pack folder>/docs/<node>.md for a custom node."""
    info = page.server.object_info()
    ours = sorted(n for n, d in info.items() if d.get("python_module") == f"custom_nodes.{PACK_NAME}")
    assert ours
    for node in ours:
        text = page.js_async("""
            const [url, done] = arguments;
            fetch(url).then(r => r.ok ? r.text() : 'HTTP ' + r.status).then(done, e => done(String(e)));""",
                             f"/extensions/{PACK_NAME}/docs/{node}.md")
        assert text.startswith(f"# {info[node]['display_name']}"), (node, text[:200])


def test_build_then_generate_from_the_page(page):
    build = CATALOG[0]
    page.load_template(build.file)
    page.js("window.__redi_same_page = true;")
    kb_name = next(n["inputs"]["kb_name"] for n in json.loads(build.api_path.read_text(encoding="utf-8")).values()
                   if n["class_type"] == "BuildKnowledgeBase")
    assert kb_name not in page.js(KB_OPTIONS), "the KB exists before the build ran"

    entry = page.run_workflow("the build template")
    text = page.wait_for("the build summary on the node", "return (window.app.graph._nodes.find(n => n.type === 'BuildKnowledgeBase')"
                                                           ".widgets.find(w => w.name === 'redi_summary') || {}).value")
    assert "added 4 trajectories" in text and "on disk" in text, text
    assert entry["outputs"], "BuildKnowledgeBase sent its ui output"
    page.wait_for("the new KB in ReDiLoadKnowledgeBase's list", KB_OPTIONS.replace("return opts", "return opts.includes(arguments[0])"), kb_name)
    assert not layout_problems(page.graph_as_drawn()), "the summary moved or grew a node onto another"
    page.fit_view("BuildKnowledgeBase")
    page.screenshot("20-run-build-summary")

    generate = CATALOG[1]
    page.load_template(generate.file)
    options = page.js("""return window.app.graph._nodes.find(n => n.type === 'ReDiLoadKnowledgeBase')
                          .widgets.find(w => w.name === 'kb_name').options.values""")
    assert kb_name in options, options
    assert page.js("return window.__redi_same_page === true"), "the page was reloaded"
    page.run_workflow("the generate template")
    text = page.wait_for("the ReDi summary on the node", "return (window.app.graph._nodes.find(n => n.type === 'ReDiSampler')"
                                                         ".widgets.find(w => w.name === 'redi_summary') || {}).value")
    assert text.startswith("ReDi: ") and "item 0:" in text, text
    page.wait_for("the saved image on SaveImage", "return (window.app.graph._nodes.find(n => n.type === 'SaveImage').imgs || []).length > 0")
    assert not page.visible_dialogs()
    assert not layout_problems(page.graph_as_drawn()), "the summary or the image moved or grew a node onto another"
    page.fit_view()
    page.screenshot("21-run-generate-summary")


def test_retrieve_shows_neighbours_when_the_vae_is_connected(page):
    """Connect the checkpoint's VAE to ReDi Retrieve in the four-node template, run it, see the neighbours on the node."""
    four = next(t for t in CATALOG if "four" in t.file)
    page.load_template(four.file)
    connected = page.js("""
        const g = window.app.graph;
        const ckpt = g._nodes.find(n => n.type === 'CheckpointLoaderSimple');
        const retrieve = g._nodes.find(n => n.type === 'ReDiRetrieve');
        const slot = retrieve.inputs.findIndex(i => i.name === 'vae');
        return slot >= 0 && !!ckpt.connect(2, retrieve, slot);""")
    assert connected
    page.run_workflow("the four-node template with a VAE on ReDi Retrieve")
    page.wait_for("neighbour images on ReDi Retrieve", "return (window.app.graph._nodes.find(n => n.type === 'ReDiRetrieve').imgs || []).length > 0")
    text = page.node_summaries()["ReDiRetrieve"]
    assert text.startswith("ReDi retrieve: step ") and "item 0:" in text and "Images: the first" in text, text
    assert page.node_summaries()["ReDiResumeSample"].startswith("ReDi: ")
    assert not layout_problems(page.graph_as_drawn()), "the neighbour images grew ReDi Retrieve onto another node or out of its group"
    page.fit_view("ReDiRetrieve", "ReDiBlend", "ReDiResumeSample")
    page.screenshot("22-run-four-nodes-neighbours")


def test_no_console_error_caused_by_the_pack(page, baseline_console):
    baseline, base_port = baseline_console
    page.drain_console()
    errors = [e for e in page.console if e["level"] == "SEVERE" and not is_environment_error(e)]
    known = {normalise(e, base_port) for e in baseline if not is_environment_error(e)}
    ours = [e["message"][:400] for e in errors if normalise(e, page.server.port) not in known]
    assert not ours, "console errors that the page without the pack does not show:\n" + "\n".join(ours)
    pack_lines = [e["message"][:400] for e in page.console if f"/extensions/{PACK_NAME}/" in e["message"] and e["level"] in ("SEVERE", "WARNING")]
    assert not pack_lines, pack_lines
