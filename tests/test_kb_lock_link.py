"""The KB writer lock (`.writer.lock`) never writes through a link or into anything but its own plain file.

Taking the lock opens `.writer.lock` for writing; the filelock versions the pack allows from its
floor on (3.8.0) open it with O_TRUNC and follow symbolic links, so a `.writer.lock` leading to a
user's file would empty it. Every write path must refuse such a lock with a KBError naming the
file and the fix, whatever filelock is installed, and leave the user's file byte-identical:
- with the installed (pinned) filelock, in this process: append, learn, merge, merge_into,
  evict, rebuild_indexes, set_calibration and create, for a symbolic link, a hard link, a FIFO
  and a directory at `.writer.lock`;
- with the oldest filelock the pack allows (scripts/env.sh installs it apart, in
  $REDI_OLDEST_FILELOCK), in a real subprocess that imports it first: the same refusal, and a
  plain append + reopen that works.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from kb_crash_helper import toy_latents, toy_settings

from kb_tools.core.errors import KBError
from kb_tools.store import KBBudget, KnowledgeBase, LOCK_FILE, evict_oldest, merge, merge_into
from kb_tools.store.learning import learn

PACK = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
USER_DATA = b"a user's own file: it must survive every KB write\n" * 20


def _pairs(c: int, n: int = 4) -> list[tuple[str, int]]:
    return [(f"lock test {c * n + i}", i % 2) for i in range(n)]


def _append(kb: KnowledgeBase, c: int) -> None:
    ps = _pairs(c)
    kb.append(toy_latents(ps), [p for p, _ in ps], [s for _, s in ps])


def _make_kb(root: Path, chunks: int = 2) -> Path:
    kb = KnowledgeBase.create(root, toy_settings(), dtype="float32")
    for c in range(chunks):
        _append(kb, c)
    return root


def _floor() -> str:
    """The filelock floor of requirements.txt; pyproject.toml must say the same."""
    floor = re.search(r"^filelock>=([0-9][0-9.]*)\s*$", (PACK / "requirements.txt").read_text(), re.M)
    assert floor, "requirements.txt lost its 'filelock>=X.Y.Z' line"
    assert f'"filelock>={floor.group(1)}"' in (PACK / "pyproject.toml").read_text(), \
        "pyproject.toml and requirements.txt must give the same filelock floor"
    return floor.group(1)


def _plant(kind: str, lock: Path, user: Path) -> None:
    """Put a `kind` of node at the lock path (user: a file outside the KB holding USER_DATA)."""
    if lock.is_dir() and not lock.is_symlink():
        lock.rmdir()
    elif lock.exists() or lock.is_symlink():
        lock.unlink()
    if kind == "symlink":
        lock.symlink_to(user)
    elif kind == "hardlink":
        os.link(user, lock)
    elif kind == "fifo":
        os.mkfifo(lock)
    elif kind == "directory":
        lock.mkdir()
    else:
        raise AssertionError(kind)


def _writes(root: Path, tmp: Path) -> dict:
    """Every write a KB offers, against the KB at `root` (each one a callable)."""
    source = tmp / "source"
    if not source.exists():
        kb = KnowledgeBase.create(source, toy_settings(), dtype="float32")
        ps = [("merged in", 0), ("merged in too", 1)]
        kb.append(toy_latents(ps), [p for p, _ in ps], [s for _, s in ps])
    states = toy_latents([("learned", 5)])
    return {
        "append": lambda: _append(KnowledgeBase.open(root), 7),
        "learn": lambda: learn(str(root), toy_settings(), states, ["learned"], [5], dtype="float32"),
        "merge_into": lambda: merge_into(str(root), [str(source)]),
        "evict": lambda: evict_oldest(KnowledgeBase.open(root), KBBudget(max_entries=4)),
        "rebuild": lambda: KnowledgeBase.open(root).rebuild_indexes(),
        "calibration": lambda: KnowledgeBase.open(root).set_calibration(4, {"h": 2, "centered_p95": 0.25}),
    }


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo", "directory"])
def test_every_write_refuses_a_lock_that_is_not_its_own_file(tmp_path, kind):
    root = _make_kb(tmp_path / "kb")
    user = tmp_path / "user-notes.txt"
    user.write_bytes(USER_DATA)
    lock = root / LOCK_FILE
    before = KnowledgeBase.open(root)
    entries, generation = before.entries, before.generation
    for name, write in _writes(root, tmp_path).items():
        _plant(kind, lock, user)
        with pytest.raises(KBError) as e:
            write()
        msg = str(e.value)
        assert LOCK_FILE in msg and ("rm " in msg or "Remove" in msg), (name, msg)
        assert user.read_bytes() == USER_DATA, f"{name} wrote through a {kind} lock into the user's file"
        assert lock.is_symlink() == (kind == "symlink") and lock.is_dir() == (kind == "directory"), name
        kb = KnowledgeBase.open(root, verify="full")
        assert (kb.entries, kb.generation) == (entries, generation), f"{name} committed despite the refusal"
        assert kb.verify() == []
    # A new KB in a folder holding such a lock, and a merge into one, refuse the same way.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    _plant(kind, fresh / LOCK_FILE, user)
    for name, write in (("create", lambda: KnowledgeBase.create(fresh, toy_settings(), exist_ok=True)),
                        ("merge", lambda: merge(str(fresh), [str(root)], exist_ok=True))):
        with pytest.raises(KBError, match=re.escape(LOCK_FILE)):
            write()
        assert user.read_bytes() == USER_DATA, name
        assert not (fresh / "manifest.json").exists(), name
    # The fix the message gives works: remove the node, and the next write recreates a plain lock file.
    if kind == "directory":
        lock.rmdir()
    else:
        lock.unlink()
    _append(KnowledgeBase.open(root), 9)
    assert lock.is_file() and not lock.is_symlink()
    assert len(KnowledgeBase.open(root, verify="full")) == len(entries) + 4
    assert user.read_bytes() == USER_DATA


def test_a_plain_lock_file_left_by_an_earlier_write_is_reused(tmp_path):
    root = _make_kb(tmp_path / "kb")
    lock = root / LOCK_FILE
    assert lock.is_file() and not lock.is_symlink() and os.stat(lock).st_nlink == 1
    _append(KnowledgeBase.open(root), 5)
    assert len(KnowledgeBase.open(root)) == 12


# --------------------------------------------------------------------------- the oldest filelock allowed

_OLDEST_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import filelock
    floor, root, user, user_copy = sys.argv[1:5]
    assert filelock.__version__ == floor, (filelock.__version__, floor, filelock.__file__)
    assert os.path.realpath(filelock.__file__).startswith(os.path.realpath(os.environ["REDI_OLDEST_FILELOCK"]))
    from kb_crash_helper import toy_latents
    from kb_tools.core.errors import KBError
    from kb_tools.store import KnowledgeBase
    out = {"version": filelock.__version__}

    # Why the check matters: this filelock, used bare, empties the file a lock link leads to.
    bare = os.path.join(os.path.dirname(user_copy), "bare.lock")
    os.symlink(user_copy, bare)
    with filelock.FileLock(bare):
        pass
    out["bare_truncates"] = os.path.getsize(user_copy) == 0

    lock = os.path.join(root, ".writer.lock")
    os.remove(lock)  # the plain lock file the KB's build left
    os.symlink(user, lock)
    ps = [("oldest filelock", 0), ("oldest filelock too", 1)]
    try:
        KnowledgeBase.open(root).append(toy_latents(ps), [p for p, _ in ps], [s for _, s in ps])
        out["refused"] = None
    except KBError as e:
        out["refused"] = str(e)
    out["link_kept"] = os.path.islink(lock)

    os.remove(lock)  # the fix the message gives; then a plain append and a reopen work with this filelock
    kb = KnowledgeBase.open(root)
    kb.append(toy_latents(ps), [p for p, _ in ps], [s for _, s in ps])
    again = KnowledgeBase.open(root, verify="full")
    out["count"], out["problems"] = len(again), again.verify()
    out["lock_is_plain"] = os.path.isfile(lock) and not os.path.islink(lock)
    print("RESULT " + json.dumps(out))
""")


def test_the_oldest_allowed_filelock_never_truncates_through_a_lock_link(tmp_path):
    oldest = os.environ.get("REDI_OLDEST_FILELOCK")
    if not oldest:
        pytest.skip("REDI_OLDEST_FILELOCK is not set: run the suite with `bash scripts/test.sh`, which installs "
                    "the oldest filelock the pack allows")
    floor = _floor()
    assert Path(oldest).name == f"filelock-{floor}" and (Path(oldest) / "filelock").is_dir(), oldest
    root = _make_kb(tmp_path / "kb")
    user = tmp_path / "user-notes.txt"
    user.write_bytes(USER_DATA)
    user_copy = tmp_path / "bare" / "copy.txt"
    user_copy.parent.mkdir()
    user_copy.write_bytes(USER_DATA)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([oldest, str(PACK), str(TESTS)])}
    proc = subprocess.run([sys.executable, "-c", _OLDEST_SCRIPT, floor, str(root), str(user), str(user_copy)],
                          capture_output=True, text=True, timeout=1800, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line[len("RESULT "):])
    assert out["version"] == floor
    assert out["bare_truncates"], "the floor filelock no longer truncates: this test no longer proves the check"
    assert out["refused"] and LOCK_FILE in out["refused"] and "rm " in out["refused"], out
    assert out["link_kept"]
    assert user.read_bytes() == USER_DATA, "the floor filelock emptied the user's file through the lock link"
    assert out["count"] == 10 and out["problems"] == [] and out["lock_is_plain"], out
    np.testing.assert_array_equal(KnowledgeBase.open(root).latents(4, np.arange(8)),
                                  _latents_of_first_chunks(), err_msg="the append under the floor filelock changed old entries")


def _latents_of_first_chunks() -> np.ndarray:
    return toy_latents(_pairs(0) + _pairs(1))[4]
