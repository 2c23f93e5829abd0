"""The pack's layering, read from the source (ast; nothing is imported, ComfyUI is not needed).

kb_tools/ is in rooms, each importing only the rooms before it:
    core         nothing of the pack
    store        core
    comfy        core
    calibration  core, store, comfy
    samplers     core, store, comfy, calibration
    build        every room
Imports within a room are free. nodes/ imports the pack only through its public API
(`from ..kb_tools import NAME`), and a node module imports no other node module but the
shared helpers (ALLOWED_NODE_HELPERS); nodes/__init__.py, the registry, imports them all.
Imports under `if TYPE_CHECKING:` are not runtime dependencies and are left out.
"""
from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACK = "kb_tools"
ROOMS = ("core", "store", "comfy", "calibration", "samplers", "build")
API = "the public API"  # kb_tools/__init__.py: loads any room on first use
#: room -> the other rooms it may import (build also the public API, kb_tools/__init__.py)
ALLOWED = {
    "core": set(),
    "store": {"core"},
    "comfy": {"core"},
    "calibration": {"core", "store", "comfy"},
    "samplers": {"core", "store", "comfy", "calibration"},
    "build": {*ROOMS, API},
}
#: node modules every node module may import (nodes/common.py, nodes/feedback.py)
ALLOWED_NODE_HELPERS = {"common", "feedback"}
MAX_LINES = 350
TOP_LEVEL = {"__init__.py", "__main__.py", *ROOMS}


# --------------------------------------------------------------------------- reading imports


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement under `node`, those inside `if TYPE_CHECKING:` bodies left out."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield from _import_nodes_of(other)
            continue
        yield from _import_nodes_of(child)


def _import_nodes_of(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
    else:
        yield from _import_nodes(node)


def imports(rel_path: str, source: str) -> Iterator[tuple[int, tuple[str, ...] | None, str, tuple[str, ...]]]:
    """(line, target, text, names) per runtime import of the file at `rel_path` (relative to the repo root).

    target: the imported module as a dotted path from the repo root, relative imports resolved
    (`..store` in kb_tools/core/x.py -> ("kb_tools", "store")); None for a relative import that
    climbs above the repo root. names: what a `from` import takes (empty for `import x`).
    """
    package = tuple(Path(rel_path).parent.parts)
    for node in _import_nodes(ast.parse(source, rel_path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, tuple(alias.name.split(".")), f"import {alias.name}", ()
            continue
        names = tuple(a.name for a in node.names)
        text = f"from {'.' * node.level}{node.module or ''} import {', '.join(names)}"
        if node.level == 0:
            yield node.lineno, tuple((node.module or "").split(".")), text, names
            continue
        up = node.level - 1
        if up > len(package):
            yield node.lineno, None, text, names
            continue
        base = package[: len(package) - up]
        yield node.lineno, base + (tuple(node.module.split(".")) if node.module else ()), text, names


def _room_of(rel_path: str) -> str | None:
    parts = Path(rel_path).parts
    return parts[1] if len(parts) > 2 and parts[0] == PACK and parts[1] in ROOMS else None


def kb_tools_violations(rel_path: str, source: str) -> list[str]:
    """The imports of a file in a kb_tools room that break the room order, as 'path:line: text (why)'."""
    room = _room_of(rel_path)
    if room is None:
        return []
    out = []
    for line, target, text, names in imports(rel_path, source):
        if target is None:
            out.append(f"{rel_path}:{line}: {text} (climbs out of the repository)")
            continue
        relative = text.startswith("from .")
        if not target or target[0] != PACK:
            if relative:  # a relative import out of kb_tools: the node layer or the repo package
                out.append(f"{rel_path}:{line}: {text} (kb_tools imports nothing outside kb_tools)")
            continue
        if len(target) > 1:
            used = {target[1]}
        else:  # the package itself: `from .. import store` names a room, anything else is the public API
            used = {n if n in ROOMS else API for n in names} or {API}
        for other in sorted(used):
            if other != room and other not in ALLOWED[room]:
                may = ", ".join(sorted(ALLOWED[room])) or "nothing of the pack"
                out.append(f"{rel_path}:{line}: {text} ({room} imports {other}; {room} may import {may})")
    return out


def node_api_violations(rel_path: str, source: str) -> list[str]:
    """Imports of kb_tools by a node module other than `from ..kb_tools import NAME` (the public API)."""
    out = []
    for line, target, text, names in imports(rel_path, source):
        if target == () and PACK in names:  # `from .. import kb_tools`
            out.append(f"{rel_path}:{line}: {text} (nodes import kb_tools' public names only: from ..kb_tools import NAME)")
        if not target or target[0] != PACK:
            continue
        if len(target) > 1 or not names or any(n in ROOMS for n in names):
            out.append(f"{rel_path}:{line}: {text} (nodes import kb_tools' public names only: from ..kb_tools import NAME)")
    return out


def node_to_node_violations(rel_path: str, source: str) -> list[str]:
    """Imports of another node module than the shared helpers (ALLOWED_NODE_HELPERS)."""
    if Path(rel_path).name == "__init__.py":
        return []  # the registry imports every node module
    out = []
    for line, target, text, names in imports(rel_path, source):
        if not target or target[0] != "nodes" or not text.startswith("from ."):
            continue
        used = set(target[1:2]) or set(names)  # `from .X import ...` or `from . import X`
        bad = sorted(used - ALLOWED_NODE_HELPERS)
        if bad:
            out.append(f"{rel_path}:{line}: {text} (a node module imports only {sorted(ALLOWED_NODE_HELPERS)}, not {bad})")
    return out


def _sources(folder: str) -> Iterator[tuple[str, str]]:
    for path in sorted((ROOT / folder).rglob("*.py")):
        if "__pycache__" not in path.parts:
            yield path.relative_to(ROOT).as_posix(), path.read_text(encoding="utf-8")


# --------------------------------------------------------------------------- the rules on the pack


def test_kb_tools_rooms_import_only_the_rooms_before_them():
    bad = [v for rel, src in _sources(PACK) for v in kb_tools_violations(rel, src)]
    assert not bad, "sideways or upward imports:\n" + "\n".join(bad)


def test_nodes_import_kb_tools_only_through_its_public_api():
    bad = [v for rel, src in _sources("nodes") for v in node_api_violations(rel, src)]
    assert not bad, "\n".join(bad)


def test_node_modules_import_no_other_node_module_but_the_shared_helpers():
    bad = [v for rel, src in _sources("nodes") for v in node_to_node_violations(rel, src)]
    assert not bad, "\n".join(bad)


def test_every_kb_tools_file_is_at_most_350_lines():
    long = []
    for path in sorted((ROOT / PACK).rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            n = len(path.read_text(encoding="utf-8").splitlines())
            if n > MAX_LINES:
                long.append(f"{path.relative_to(ROOT).as_posix()}: {n} lines")
    assert not long, f"split these by job (at most {MAX_LINES} lines each):\n" + "\n".join(long)


def test_kb_tools_top_level_holds_only_the_api_the_command_and_the_rooms():
    entries = {p.name for p in (ROOT / PACK).iterdir() if p.name != "__pycache__"}
    assert entries == TOP_LEVEL, f"unexpected: {sorted(entries - TOP_LEVEL)}, missing: {sorted(TOP_LEVEL - entries)}"
    for room in ROOMS:
        init = ROOT / PACK / room / "__init__.py"
        assert init.is_file(), f"{room}/ has no __init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc and len(doc.splitlines()) >= 2, f"{room}/__init__.py must say what the room holds and what it may import"


# --------------------------------------------------------------------------- the checker itself


@pytest.mark.parametrize(("rel_path", "source"), [
    ("kb_tools/core/weights.py", "from ..store import KnowledgeBase\n"),
    ("kb_tools/core/weights.py", "from .. import store\n"),
    ("kb_tools/core/weights.py", "from .. import KnowledgeBase\n"),
    ("kb_tools/core/weights.py", "import kb_tools.store\n"),
    ("kb_tools/core/weights.py", "from kb_tools.comfy.plain import cfg_guider\n"),
    ("kb_tools/core/weights.py", "def f():\n    from ..calibration.guard import GUARD_AUTO\n"),
    ("kb_tools/store/index.py", "from ..comfy.counted import sample_counted\n"),
    ("kb_tools/comfy/plain.py", "from ..store.format import MANIFEST\n"),
    ("kb_tools/calibration/guard.py", "from ..samplers.redi import make_run\n"),
    ("kb_tools/samplers/redi.py", "from ..build.builder import BuildSpec\n"),
    ("kb_tools/store/index.py", "from ...nodes.common import CATEGORY\n"),
    ("kb_tools/store/index.py", "from ....x import y\n"),
    ("kb_tools/store/index.py", "if TYPE_CHECKING:\n    pass\nelse:\n    from ..samplers import redi\n"),
])
def test_the_checker_catches_an_upward_or_sideways_import(rel_path, source):
    assert kb_tools_violations(rel_path, source)


@pytest.mark.parametrize(("rel_path", "source"), [
    ("kb_tools/core/weights.py", "import numpy as np\nfrom .errors import KBError\nfrom . import records\n"),
    ("kb_tools/store/index.py", "from ..core.errors import KBError\nfrom . import arguments as args\n"),
    ("kb_tools/store/writes.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..samplers.redi import ReDiRun\n"),
    ("kb_tools/calibration/guard.py", "from ..store import KnowledgeBase\nfrom ..comfy import plain\nfrom ..core.weights import fit_weights\n"),
    ("kb_tools/samplers/redi.py", "from ..calibration.guard import GUARD_AUTO\nfrom .result import ReDiResult\n"),
    ("kb_tools/build/cli.py", "from ..samplers.redi import make_run\nfrom .. import KnowledgeBase\n"),
])
def test_the_checker_lets_allowed_imports_through(rel_path, source):
    assert kb_tools_violations(rel_path, source) == []


def test_the_checker_catches_a_node_reaching_into_a_room_or_another_node():
    assert node_api_violations("nodes/redi_chain.py", "from ..kb_tools.store import KnowledgeBase\n")
    assert node_api_violations("nodes/redi_chain.py", "from ..kb_tools import store\n")
    assert node_api_violations("nodes/redi_chain.py", "from .. import kb_tools\n")
    assert node_api_violations("nodes/redi_chain.py", "from ..kb_tools import KnowledgeBase, generate\n") == []
    assert node_to_node_violations("nodes/redi_chain.py", "from .redi_sampler import ReDiSampler\n")
    assert node_to_node_violations("nodes/redi_chain.py", "from . import tstitch\n")
    assert node_to_node_violations("nodes/redi_chain.py", "from . import feedback\nfrom .common import CATEGORY\n") == []
    assert node_to_node_violations("nodes/__init__.py", "from .redi_sampler import NODES\n") == []


def test_the_public_api_table_and_its_type_checking_imports_name_the_same_things():
    """kb_tools/__init__.py lists each public name twice (the lazy loader's table, the imports type checkers read): one list."""
    tree = ast.parse((ROOT / PACK / "__init__.py").read_text())
    imported = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for imp in node.body:
                for alias in imp.names:
                    imported[alias.name] = imp.module
    import kb_tools
    assert imported == kb_tools._PUBLIC
