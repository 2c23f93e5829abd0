"""A KB build killed with SIGKILL mid-append opens as before and resumes without loss or duplicates."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from kb_crash_helper import chunk_pairs, manifest_of, toy_latents

from kb_tools.store import KnowledgeBase

HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kb_crash_helper.py")
N_CHUNKS, CHUNK = 60, 8
ALL_PAIRS = [p for c in range(N_CHUNKS) for p in chunk_pairs(c, CHUNK)]

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")


def _start(kbdir, pause=0.0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, HELPER, str(kbdir), str(N_CHUNKS), str(CHUNK), str(pause)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _read_until(proc, predicate, timeout=1800.0) -> list[str]:  # a safety net: the helper is polled line by line
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"helper exited early: {proc.stderr.read()}")
        lines.append(line.split())
        if predicate(lines):
            return lines
    raise AssertionError(f"the helper printed nothing decisive within {timeout:.0f} s (safety net; is it stuck?)")


def _kill(proc) -> list[list[str]]:
    proc.send_signal(signal.SIGKILL)
    rest, _ = proc.communicate(timeout=1800)
    assert proc.returncode == -signal.SIGKILL
    return [line.split() for line in rest.splitlines()]


def _committed(lines) -> int:
    return max((int(n) for tag, n in lines if tag == "COMMITTED"), default=0)


def _resume_and_check(kbdir) -> None:
    """Append what is missing; every pair must then be stored once, with its own latents."""
    kb = KnowledgeBase.open(kbdir)
    todo = kb.missing(ALL_PAIRS)
    kb.append(toy_latents(todo), [p for p, _ in todo], [s for _, s in todo])
    kb = KnowledgeBase.open(kbdir, verify="full")
    assert kb.entries == ALL_PAIRS  # order and multiplicity: nothing lost, nothing twice
    assert kb.verify() == []
    want = toy_latents(ALL_PAIRS)
    for step, x in want.items():
        np.testing.assert_array_equal(kb.latents(step, np.arange(len(kb))), x)  # float32 KB: bit-exact
    referenced = {s[k] for s in manifest_of(kbdir)["shards"] for k in ("file", "entries_file")}
    on_disk = {f"shards/{n}" for n in os.listdir(os.path.join(kbdir, "shards"))}
    assert on_disk == referenced  # the crashed append's files were collected


@pytest.mark.parametrize("seed", [1, 2])
def test_kill_at_random_point(tmp_path, seed):
    kbdir = tmp_path / "kb"
    proc = _start(kbdir)
    lines = _read_until(proc, lambda ls: _committed(ls) >= 3 * CHUNK)
    time.sleep(random.Random(seed).uniform(0.0, 0.05))  # somewhere inside a later append
    lines += _kill(proc)
    last = _committed(lines)
    kb = KnowledgeBase.open(kbdir, verify="full")
    assert kb.verify() == []
    # The helper prints after each commit returns: a commit can land just before the kill
    # and its line not, never the other way round.
    assert len(kb) in (last, last + CHUNK)
    assert kb.entries == ALL_PAIRS[: len(kb)]
    assert len(kb) < len(ALL_PAIRS), "the build finished before the kill: the test proved nothing"
    _resume_and_check(kbdir)


def test_kill_between_shard_write_and_commit(tmp_path):
    kbdir = tmp_path / "kb"
    proc = _start(kbdir, pause=30.0)
    lines = _read_until(proc, lambda ls: _committed(ls) >= 2 * CHUNK and ls[-1][0] == "BEFORE_COMMIT")
    lines += _kill(proc)
    last = _committed(lines)
    assert int(lines[-1][1]) == last  # killed inside the append that follows the last commit
    shards = os.listdir(kbdir / "shards")
    kb = KnowledgeBase.open(kbdir, verify="full")
    assert len(kb) == last
    assert kb.entries == ALL_PAIRS[:last]
    assert kb.verify() == []
    referenced = {s[k] for s in manifest_of(kbdir)["shards"] for k in ("file", "entries_file")}
    assert len(shards) == len(referenced) + 2  # the uncommitted shard and its entries were written
    _resume_and_check(kbdir)
