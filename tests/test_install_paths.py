"""The ways users install and run the pack, checked: a ComfyUI-Manager / git-clone install, the offline
command with no device flag, a clone folder that is not a Python name, and the Comfy Registry fields.

The install test copies the pinned ComfyUI tree, copies the pack's tracked files into its
custom_nodes/comfyui-redi (what `git clone` and ComfyUI-Manager produce), and runs
`pip install -r requirements.txt` into "that ComfyUI's environment": a new virtual environment
that sees the packages a ComfyUI install already has (this suite's environment, which holds
ComfyUI's requirements) except faiss-cpu, so pip resolves the pack's requirements against a
ComfyUI that lacks only what the pack adds, without rebuilding torch. pip's own install report
must list faiss-cpu and nothing else; then the copied ComfyUI starts with that environment and
must load every node with no import error.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_checkpoint import make_sd15_checkpoint  # noqa: E402
from server_harness import ComfyServer, prepare_layout  # noqa: E402

PACK_DIR = Path(__file__).resolve().parent.parent
CLONE_NAME = "comfyui-redi"  # README's `git clone ... comfyui-redi`: not a Python identifier on purpose
SUBPROCESS_TIMEOUT_S = 3600  # safety net for pip and a checkpoint load on a busy machine
NEW_PACKAGES = {"faiss-cpu"}
COMFY_CLI = "comfy-cli==1.23.0"


def tracked_files(root: Path) -> list[Path]:
    """The files a clone of the pack holds: git's tracked files plus new ones it does not ignore (without git: all but caches, outputs)."""
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"], capture_output=True, text=True, check=True,
                             timeout=SUBPROCESS_TIMEOUT_S).stdout
        return [Path(p) for p in out.split("\0") if p and (root / p).is_file()]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", "output", "__pycache__", ".pytest_cache", ".ruff_cache", ".venv"}
        return [p.relative_to(root) for p in root.rglob("*") if p.is_file() and not skip & set(p.relative_to(root).parts)]


def copy_pack(dest: Path) -> Path:
    for rel in tracked_files(PACK_DIR):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PACK_DIR / rel, dest / rel)
    return dest


def environment_without(packages: set[str], venv: Path) -> Path:
    """A venv whose python sees this suite's site-packages (ComfyUI's requirements) minus `packages`; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=SUBPROCESS_TIMEOUT_S)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True, timeout=SUBPROCESS_TIMEOUT_S).stdout.strip())
    visible = venv / "comfyui-packages"
    visible.mkdir()
    hidden = {re.sub(r"[-_.]+", "_", p).lower() for p in packages}
    ours = Path(sysconfig.get_paths()["purelib"])
    for entry in ours.iterdir():
        stem = re.sub(r"[-_.]+", "_", entry.name.split("-")[0]).lower()
        if stem in hidden or stem in {"faiss"} & {h.split("_")[0] for h in hidden}:
            continue
        (visible / entry.name).symlink_to(entry)
    # site.addsitedir (not a plain path line) so the .pth files there run too, as in the real environment.
    (site / "comfyui_packages.pth").write_text(f"import site; site.addsitedir({str(visible)!r})\n")
    return python


@pytest.fixture(scope="module")
def installed(comfy_root, tmp_path_factory):
    """(ComfyUI copy, its python, pip's install report) after a Manager-style install of the pack."""
    root = tmp_path_factory.mktemp("install")
    comfy = root / "ComfyUI"
    top_level = {"custom_nodes", "models", "output", "input", "temp", "user"}  # a fresh install's empty folders

    def fresh(folder, names):
        return {n for n in names if n == "__pycache__" or (Path(folder) == Path(comfy_root) and n in top_level)}
    shutil.copytree(comfy_root, comfy, ignore=fresh)
    (comfy / "custom_nodes").mkdir()
    pack = copy_pack(comfy / "custom_nodes" / CLONE_NAME)
    python = environment_without(NEW_PACKAGES, root / "venv")
    report = root / "pip-report.json"
    pip = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-input", "--report", str(report),
                          "-r", str(pack / "requirements.txt")], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    if pip.returncode != 0 and re.search(r"(?i)connection|network|resolve host|No matching distribution", pip.stderr):
        pytest.skip(f"pip cannot reach a package index here: {pip.stderr[-500:]}")
    assert pip.returncode == 0, pip.stderr[-3000:]
    return comfy, python, json.loads(report.read_text())


def test_requirements_pull_in_nothing_but_faiss(installed):
    _, python, report = installed
    pulled = {item["metadata"]["name"].lower() for item in report["install"]}
    assert pulled == NEW_PACKAGES, f"pip install -r requirements.txt into a ComfyUI environment would also install {sorted(pulled - NEW_PACKAGES)}"
    check = subprocess.run([str(python), "-c", "import faiss, numpy, safetensors, tqdm, torch; print(faiss.__version__)"],
                           capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert check.returncode == 0, check.stderr[-2000:]


def test_manager_style_install_loads_every_node(installed, tmp_path):
    comfy, python, _ = installed
    layout = prepare_layout(tmp_path / "work", PACK_DIR, {"test.safetensors": make_sd15_checkpoint()}, with_pack=False)
    server = ComfyServer(comfy, layout, python=str(python))
    try:
        server.start()
        log = server.log_text()
        # (ComfyUI's own audio nodes may report IMPORT FAILED here: the test environment has no torchaudio.)
        failed = [line for line in log.splitlines() if CLONE_NAME in line and ("IMPORT FAILED" in line or "Cannot import" in line)]
        assert not failed, server.log_tail()
        assert f"custom_nodes/{CLONE_NAME}" in log, "the start-up log does not list the pack among the loaded custom nodes"
        info = server.object_info()
        ours = {n for n, d in info.items() if d.get("python_module") == f"custom_nodes.{CLONE_NAME}"}
        expected = {"ReDiLoadKnowledgeBase", "BuildKnowledgeBase", "ReDiPartialSample", "ReDiRetrieve", "ReDiBlend",
                    "ReDiResumeSample", "ReDiSampler", "TStitchSampler"}
        assert expected <= ours, (sorted(ours), server.log_tail())
        assert f"/extensions/{CLONE_NAME}/redi_canvas_feedback.js" in server.get("/extensions")
        templates = server.get("/workflow_templates").get(CLONE_NAME, [])
        assert len(templates) == len(list((comfy / "custom_nodes" / CLONE_NAME / "example_workflows").glob("*.json"))) > 0
        i18n = server.get("/i18n")
        assert i18n["en"]["templateWorkflows"]["category"][CLONE_NAME] == "ReDi Sampling"
    finally:
        server.stop()


def test_the_suite_runs_from_a_clone_folder_that_is_not_a_python_name(installed):
    """pytest imports the pack root's __init__.py as a package named after the folder; 'comfyui-redi' must not break it."""
    comfy, _, _ = installed
    clone = comfy / "custom_nodes" / CLONE_NAME
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_records.py"], cwd=clone,
                         capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert out.returncode == 0 and " passed" in out.stdout, out.stdout[-3000:] + out.stderr[-2000:]


def test_offline_build_picks_the_device_without_a_flag(comfy_root, tmp_path):
    """No --cpu: the command uses the accelerator torch sees, else the CPU, and says which in one line."""
    import torch

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    env = dict(os.environ, COMFYUI_PATH=str(comfy_root))
    out = subprocess.run([sys.executable, "-m", "kb_tools", "build", "--ckpt", str(make_sd15_checkpoint()), "--prompts", str(prompts),
                          "--out", str(tmp_path / "kb"), "--steps", "2", "--store-steps", "1", "--width", "64", "--height", "64",
                          "--batch-size", "1"], cwd=PACK_DIR, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("kb_tools: running on ")]
    assert len(lines) == 1, out.stderr[-3000:]
    expected = "cpu" if not torch.cuda.is_available() else "cuda"
    assert lines[0].startswith(f"kb_tools: running on {expected}"), lines[0]
    assert "added 1 trajectories" in out.stdout


def test_device_choice_rules():
    from kb_tools.comfy.env import device_choice as choice
    assert choice(False, None) == (True, "this torch sees no CUDA, MPS or XPU device")
    assert choice(False, "cuda") == (False, "cuda available; add --cpu to use the CPU instead")
    assert choice(True, "cuda") == (True, "--cpu given")


# --------------------------------------------------------------------------- Comfy Registry

def test_registry_fields_are_complete():
    """What `comfy node validate` and `comfy node publish` read from pyproject.toml (comfy_cli/registry/config_parser.py)."""
    data = tomllib.loads((PACK_DIR / "pyproject.toml").read_text(encoding="utf-8"))
    project, comfy = data["project"], data["tool"]["comfy"]
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", project["name"]) and "comfyui" not in project["name"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["description"] and (project["license"].get("text") or project["license"].get("file"))
    for key in ("Repository", "Documentation", "Issues"):
        assert project["urls"][key].startswith("https://"), key
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["Icon"].startswith("https://")
    part = r"(?:(==|>=|<=|!=|~=|>|<|<>|=)\s*)?(\d+\.\d+\.\d+(?:-[a-zA-Z0-9]+)?)?"
    assert all(re.fullmatch(part, p.strip()) for p in comfy["requires-comfyui"].split(","))
    for c in project.get("classifiers", []):
        if c.startswith("Operating System :: "):
            assert c[len("Operating System :: "):].split(" ::")[0] in {"Microsoft", "POSIX", "MacOS", "OS Independent"}, c
    # The web folder is registered once, through WEB_DIRECTORY (served under the pack's folder name, where the
    # front end looks for node help); [tool.comfy] web would serve it a second time and load the script twice.
    assert "web" not in comfy
    readme = (PACK_DIR / "README.md").read_text(encoding="utf-8")
    assert comfy["PublisherId"] in readme and project["urls"]["Repository"] in readme and "placeholder" in readme


@pytest.fixture(scope="module")
def comfy_cli(tmp_path_factory) -> Path:
    """comfy-cli from PyPI, once per machine (cached next to the test environment)."""
    cache = Path(os.environ.get("REDI_CACHE_DIR", Path.home() / ".cache" / "comfyui-redi")) / f"comfy-cli-{COMFY_CLI.split('==')[1]}"
    comfy = cache / "bin" / "comfy"
    if not (cache / ".complete").is_file():
        shutil.rmtree(cache, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(cache)], check=True, timeout=SUBPROCESS_TIMEOUT_S)
        pip = subprocess.run([str(cache / "bin" / "python"), "-m", "pip", "install", "-q", COMFY_CLI, "ruff"],
                             capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
        if pip.returncode != 0:
            shutil.rmtree(cache, ignore_errors=True)
            pytest.skip(f"cannot install {COMFY_CLI} from the package index: {pip.stderr[-500:]}")
        (cache / ".complete").touch()
    return comfy


def test_comfy_node_validate_passes(comfy_cli, tmp_path):
    """The registry's own check (offline): `comfy node validate` on a clone of the pack."""
    clone = copy_pack(tmp_path / CLONE_NAME)
    env = dict(os.environ, HOME=str(tmp_path))  # comfy-cli keeps its config (and telemetry consent) under HOME
    out = subprocess.run([str(comfy_cli), "--skip-prompt", "--no-enable-telemetry", "node", "validate"], cwd=clone, env=env,
                         capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=SUBPROCESS_TIMEOUT_S)
    text = out.stdout + out.stderr
    assert out.returncode == 0 and "All validation checks passed" in text, text[-3000:]
    assert "Warning" not in text, text[-3000:]
