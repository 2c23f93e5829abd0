"""Readers never fail because a writer committed: a reader process opens and searches a KB hundreds of
times while a writer process commits a hundred appends (real processes, real files)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from kb_crash_helper import chunk_pairs, toy_latents, toy_settings
from kb_reader_writer import CHUNK

from kb_tools.store import KnowledgeBase

HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kb_reader_writer.py")
APPENDS, MIN_OPENS = 110, 500


def test_reader_never_fails_while_a_writer_commits(tmp_path):
    kbdir = tmp_path / "kb"
    kb = KnowledgeBase.create(kbdir, toy_settings(), dtype="float32")
    first = chunk_pairs(0, CHUNK)
    kb.append(toy_latents(first), [p for p, _ in first], [s for _, s in first])
    initial = (kb.generation, len(kb))
    progress, done = str(tmp_path / "progress"), str(tmp_path / "writer-done")
    reader = subprocess.Popen([sys.executable, HELPER, "read", str(kbdir), progress, done, str(MIN_OPENS)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    writer = subprocess.Popen([sys.executable, HELPER, "write", str(kbdir), str(APPENDS), progress],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        w_out, w_err = writer.communicate(timeout=1800)  # safety nets, not speed requirements
    finally:
        with open(done, "w") as f:
            f.write("done")
    r_out, r_err = reader.communicate(timeout=1800)
    assert writer.returncode == 0, w_err[-3000:]
    assert reader.returncode == 0, r_err[-3000:]
    committed = {(int(g), int(n)) for tag, g, n in (line.split() for line in w_out.splitlines()) if tag == "COMMITTED"}
    assert len(committed) == APPENDS
    summary = json.loads(r_out.splitlines()[-1])
    print(f"reader/writer: {summary['opens']} opens, {summary['searches']} searches, {len(committed)} appends, "
          f"{len(summary['seen'])} generations seen, {summary['failure_count']} failures")
    assert summary["failure_count"] == 0, summary["failures"]
    assert summary["opens"] >= MIN_OPENS and summary["searches"] >= 2 * MIN_OPENS
    seen = {tuple(s) for s in summary["seen"]}
    assert seen <= committed | {initial}  # every result came from a committed generation ...
    assert len(seen) >= 2  # ... and the reader did see the KB change under it
    assert summary["held_generation"] == initial[0]  # the KB object opened first kept answering from its generation
    final = KnowledgeBase.open(kbdir, verify="full")
    assert len(final) == CHUNK * (APPENDS + 1) and final.verify() == []
    assert final.entries == [p for c in range(APPENDS + 1) for p in chunk_pairs(c, CHUNK)]
