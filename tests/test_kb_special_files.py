"""A KB whose files are FIFOs, folders or links to them never hangs a reader and never writes through them.

Every file the store reads (manifest.json, each index file, the stats file, an entries file, a
shard) is replaced by a FIFO, or by a symbolic link to a FIFO outside the KB. A plain open()
of a FIFO with no writer blocks forever; the store must refuse instead, with a KBError naming
the file. Each case runs in a real subprocess with a generous timeout, so a regression fails
here rather than hanging the suite:
- KnowledgeBase.open(path) with verify "auto", "full" and "size" raises KBError naming the file;
- `python -m kb_tools verify PATH` exits non-zero and names the file.
A property-based test (hypothesis, derandomized, small like tests/test_kb_fuzz.py) then picks a
random KB file (the writer lock included) and a random special node (FIFO, link to a FIFO,
folder, link to a user's file outside the KB) and runs opens, reads and writes in-process under
an interval timer: only KBError escapes, nothing blocks, the node stays as it was and the user's
file is byte-identical.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from kb_crash_helper import STORED_STEPS, kb_file, manifest_of, toy_latents, toy_settings

from kb_tools.core.errors import KBError
from kb_tools.store import LOCK_FILE, KnowledgeBase, open_or_create
from kb_tools.store.learning import learn

PACK = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
TIMEOUT = 1200  # seconds: a safety net (a case takes about one); a hang fails instead of stalling the suite
FILE_KINDS = ["manifest", *(f"index-{s}" for s in STORED_STEPS), "stats", "entries", "shard"]
USER_DATA = b"{\"a user's file\": \"outside the KB, never to be written\"}\n" * 8


def _build(root: Path) -> None:
    kb = KnowledgeBase.create(root, toy_settings(), dtype="float32")
    for c in range(2):
        ps = [(f"special {c * 4 + i}", i % 2) for i in range(4)]
        kb.append(toy_latents(ps), [p for p, _ in ps], [s for _, s in ps])


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("special") / "kb"
    _build(root)
    return root


def _rel(root: Path, kind: str) -> str:
    """The KB-relative name of the file of `kind` (as manifest.json names it)."""
    m = manifest_of(root)
    if kind == "manifest":
        return "manifest.json"
    if kind == "lock":
        return LOCK_FILE
    if kind.startswith("index-"):
        return m["indexes"][kind[len("index-"):]]["file"]
    return {"stats": m["stats"]["file"], "entries": m["shards"][0]["entries_file"], "shard": m["shards"][0]["file"]}[kind]


def _replace(root: Path, rel: str, special: str, outside: Path) -> Path:
    """Replace the KB file `rel` by a `special` node; `outside`: a folder outside the KB for link targets."""
    target = Path(kb_file(root, rel))
    if target.exists() or target.is_symlink():
        target.unlink()
    if special == "fifo":
        os.mkfifo(target)
    elif special == "link-to-fifo":
        fifo = outside / f"fifo-{target.name}"
        os.mkfifo(fifo)
        target.symlink_to(fifo)
    elif special == "directory":
        target.mkdir()
    elif special == "link-to-user-file":
        user = outside / "user-file.json"
        user.write_bytes(USER_DATA)
        target.symlink_to(user)
    else:
        raise AssertionError(special)
    return target


# --------------------------------------------------------------------------- every file kind, in a subprocess

_PROBE = textwrap.dedent("""
    import json, sys
    from kb_tools.core.errors import KBError
    from kb_tools.store import KnowledgeBase
    out = {}
    for verify in ("auto", "full", "size"):
        try:
            KnowledgeBase.open(sys.argv[1], verify=verify)
            out[verify] = "opened"
        except KBError as e:
            out[verify] = "KBError: " + str(e)
        except BaseException as e:
            out[verify] = f"{type(e).__name__}: {e}"
    print("RESULT " + json.dumps(out))
""")


def _run(args: list[str], what: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACK), str(TESTS), os.environ.get("PYTHONPATH", "")])}
    try:
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=TIMEOUT, env=env,
                              cwd=str(PACK))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} did not return within {TIMEOUT} s: opening a KB blocks on a special file")


@pytest.mark.parametrize("special", ["fifo", "link-to-fifo"])
@pytest.mark.parametrize("kind", FILE_KINDS)
def test_open_and_verify_refuse_a_fifo_promptly(pristine, tmp_path, kind, special):
    root = tmp_path / "kb"
    shutil.copytree(pristine, root, symlinks=True)
    rel = _rel(root, kind)
    node = _replace(root, rel, special, tmp_path)
    name = os.path.basename(rel)

    proc = _run(["-c", _PROBE, str(root)], f"KnowledgeBase.open on a KB whose {rel} is a {special}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT "):])
    for verify, result in out.items():
        assert result.startswith("KBError: "), (verify, result)
        assert name in result and "FIFO" in result, (verify, result)

    proc = _run(["-m", "kb_tools", "verify", str(root)], f"`python -m kb_tools verify` on a KB whose {rel} is a {special}")
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert name in proc.stdout + proc.stderr and "Traceback" not in proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]

    assert node.is_symlink() == (special == "link-to-fifo") and stat.S_ISFIFO(os.stat(node).st_mode), \
        "the special file was replaced or removed"


def test_a_link_to_a_regular_file_inside_the_kb_still_reads(pristine, tmp_path):
    """The store's rules on links stand: a KB file that is a link to the real file (here, inside the KB) opens."""
    root = tmp_path / "kb"
    shutil.copytree(pristine, root, symlinks=True)
    rel = _rel(root, "shard")
    real = Path(kb_file(root, rel))
    moved = real.with_name("moved-" + real.name)
    real.rename(moved)
    real.symlink_to(moved.name)
    kb = KnowledgeBase.open(root, verify="full")
    assert len(kb) == 8 and kb.verify() == []


# --------------------------------------------------------------------------- property-based: random file, random node

_PRISTINE: dict[str, Path] = {}


class _Hang(Exception):
    """Raised by the interval timer: an operation blocked."""


@contextlib.contextmanager
def _deadline(seconds: float, what: str):
    def fire(signum, frame):
        raise _Hang(f"{what} blocked for {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _pristine() -> Path:
    if "kb" not in _PRISTINE:
        _PRISTINE["kb"] = Path(tempfile.mkdtemp(prefix="redi-special-")) / "kb"
        _build(_PRISTINE["kb"])
    return _PRISTINE["kb"]


def _operations(root: Path, outside: Path) -> dict:
    ps = [("a new entry", 3)]
    states = toy_latents(ps)
    query = toy_latents([("a query", 1)])[4]

    def read_and_write(verify: str) -> None:
        kb = KnowledgeBase.open(root, verify=verify)
        kb.verify()
        kb.search(4, query, 2)
        kb.append(states, ["a new entry"], [3])
        kb.rebuild_indexes()

    return {
        **{f"open({v})": (lambda v=v: read_and_write(v)) for v in ("auto", "full", "size")},
        "open_or_create": lambda: open_or_create(str(root), toy_settings(), dtype="float32"),
        "learn": lambda: learn(str(root), toy_settings(), states, ["a new entry"], [3], dtype="float32"),
        "create": lambda: KnowledgeBase.create(root, toy_settings(), exist_ok=True),
    }


@settings(max_examples=20, deadline=None, derandomize=True, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from([*FILE_KINDS, "lock"]),
       special=st.sampled_from(["fifo", "link-to-fifo", "directory", "link-to-user-file"]),
       order=st.permutations(["open(auto)", "open(full)", "open(size)", "open_or_create", "learn", "create"]))
def test_fuzz_special_files_only_kberror_never_hang_never_write_through(kind, special, order):
    work = Path(tempfile.mkdtemp(prefix="redi-special-case-"))
    try:
        root, outside = work / "kb", work / "outside"
        shutil.copytree(_pristine(), root, symlinks=True)
        outside.mkdir()
        rel = _rel(root, kind)
        node = _replace(root, rel, special, outside)
        note(f"{rel} replaced by a {special}")
        before = os.lstat(node)
        ops = _operations(root, outside)
        for name in order:
            try:
                with _deadline(1200, f"{name} on a KB whose {rel} is a {special}"):
                    ops[name]()
            except KBError as e:
                note(f"{name}: KBError {str(e)[:200]}")
                assert os.path.basename(rel) in str(e) or "already holds a knowledge base" in str(e), (name, str(e))
            else:
                # Only a KB whose special node is its writer lock may answer: reading never touches the lock.
                assert kind == "lock" and name not in ("create", "learn") and not name.startswith("open("), \
                    f"{name} succeeded on a KB whose {rel} is a {special}"
        after = os.lstat(node)
        assert stat.S_IFMT(after.st_mode) == stat.S_IFMT(before.st_mode) and after.st_ino == before.st_ino, \
            f"{rel} (a {special}) was replaced or removed"
        if special == "link-to-user-file":
            assert (outside / "user-file.json").read_bytes() == USER_DATA, "the user's file outside the KB changed"
        for fifo in outside.glob("fifo-*"):
            assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
        assert sorted(p.name for p in outside.iterdir()) == sorted(
            ["user-file.json"] if special == "link-to-user-file" else [f"fifo-{node.name}"] if special == "link-to-fifo" else [])
    finally:
        shutil.rmtree(work, ignore_errors=True)
