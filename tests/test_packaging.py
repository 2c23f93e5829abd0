"""Packaging and hygiene: registry metadata, imports without ComfyUI, no pickle/eval, lint."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent


def test_pyproject_has_comfy_registry_fields():
    data = tomllib.loads((PACK_DIR / "pyproject.toml").read_text())
    project, comfy = data["project"], data["tool"]["comfy"]
    assert "comfyui" not in project["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["license"] and project["urls"]["Repository"]
    deps = " ".join(project["dependencies"])
    for dep in ("torch", "numpy", "safetensors", "faiss-cpu", "tqdm"):
        assert dep in deps
    for key in ("PublisherId", "DisplayName", "Icon", "requires-comfyui"):
        assert key in comfy


def test_kb_tools_imports_and_runs_without_comfyui(tmp_path):
    """The library and its command line work in a plain Python with no ComfyUI on the path."""
    code = ("import sys; sys.path.insert(0, %r); import kb_tools.store, kb_tools.core.weights, kb_tools.core.schedule, "
            "kb_tools.build.prompts, kb_tools.samplers.tstitch, kb_tools.build.cli; "
            "assert not any(m == 'comfy' or m.startswith('comfy.') for m in sys.modules), 'comfy imported'" % str(PACK_DIR))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr


def test_pack_init_is_guarded_outside_comfyui(tmp_path):
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('p', %r, submodule_search_locations=[%r]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); assert m.ComfyExtension is None"
            % (str(PACK_DIR / "__init__.py"), str(PACK_DIR)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr


# The one place that names an install command: the error when the optional `ray` extra is missing.
INSTALL_HINTS = {("kb_tools/build/distributed.py", "RAY_INSTALL")}


def test_no_pickle_eval_exec_or_runtime_installs_in_the_pack():
    # Bare eval( / exec( only: `module.eval()` is torch's inference-mode switch, not Python's eval.
    pattern = re.compile(r"\bpickle\.loads?\(|(?<![\w.])eval\(|(?<![\w.])exec\(|allow_pickle\s*=\s*True|weights_only\s*=\s*False|pip install|subprocess.*pip")
    offenders = []
    for path in PACK_DIR.rglob("*.py"):
        rel = path.relative_to(PACK_DIR)
        if rel.parts[0] in ("tests", "benchmarks", ".git") or "site-packages" in rel.parts:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line) and (rel.as_posix(), line.split("=")[0].strip()) not in INSTALL_HINTS:
                offenders.append(f"{rel}:{n}: {line.strip()}")
    assert not offenders, offenders


def test_ruff_is_clean():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=PACK_DIR, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:]
