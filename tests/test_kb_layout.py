"""What a KB folder may look like on disk: symbolic links to other folders (nothing outside the KB is ever
deleted), a KB written by the previous release (format version 1), and what verify() finds in forged indexes."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
from kb_crash_helper import (
    forge_safetensors, kb_file, manifest_of, replace_file_signed, toy_latents, toy_settings, write_manifest,
)

from kb_tools.core.errors import KBError
from kb_tools.store import KnowledgeBase, merge
from kb_tools.store.safetensors_file import tensors_from_bytes

PACK = Path(__file__).resolve().parent.parent
FIXTURE_V1 = Path(__file__).resolve().parent / "fixtures" / "kb_v1"


def add(kb, start, n, seed=0, **kw):
    ps = [(f"thing {i}", seed) for i in range(start, start + n)]
    kb.append(toy_latents(ps, **kw), [p for p, _ in ps], [s for _, s in ps])
    return ps


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- symbolic links


def test_shards_folder_linked_outside_the_kb_is_used_and_nothing_there_is_deleted(tmp_path):
    outside = tmp_path / "bigdisk" / "shared-shards"
    outside.mkdir(parents=True)
    # Another KB's files in the shared folder, named exactly like ours, and someone's notes.
    for name in ("00000-aaaaaaaa.safetensors", "00000-aaaaaaaa.entries.json", "00007-bbbbbbbb.safetensors.tmp-1-cccccccc",
                 "notes.txt"):
        (outside / name).write_bytes(b"not yours " + name.encode())
    before = snapshot(outside)
    root = tmp_path / "kb"
    root.mkdir()
    (root / "shards").symlink_to(outside, target_is_directory=True)
    kb = KnowledgeBase.create(root, toy_settings(), dtype="float32", exist_ok=True)
    pairs = add(kb, 0, 5) + add(kb, 5, 5)
    with pytest.raises(KBError, match="NaN/Inf"):  # a failed append discards only its own files
        bad = toy_latents([("bad", 0)])
        bad[2][:] = np.nan
        kb.append(bad, ["bad"], [0])
    kb.rebuild_indexes()
    kb.set_calibration(2, {"h": 1})
    kb = KnowledgeBase.open(root, verify="full")
    assert kb.entries == pairs and kb.verify() == [] and kb.info()["folders_linked_outside"] == ["shards"]
    ids, dist = kb.search(4, kb.latents(4, [7]), 1)
    assert ids[0, 0] == 7 and dist[0, 0] == 0
    merged = merge(tmp_path / "merged", [root])
    assert merged.entries == pairs and merged.verify() == []
    after = snapshot(outside)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing outside deleted or changed
    assert len(after) == len(before) + 4  # our two shards and their entries files were written there


def test_index_folder_linked_outside_the_kb_is_read_but_refuses_writes(tmp_path):
    root = tmp_path / "kb"
    kb = KnowledgeBase.create(root, toy_settings(), dtype="float32")
    pairs = add(kb, 0, 6)
    outside = tmp_path / "elsewhere" / "index"
    shutil.move(str(root / "index"), str(outside))
    (root / "index").symlink_to(outside, target_is_directory=True)
    (outside / "step_002-000099-dddddddd.safetensors").write_bytes(b"another KB's index")
    before, kb_before = snapshot(outside), snapshot(root / "shards")
    kb = KnowledgeBase.open(root, verify="full")
    assert kb.entries == pairs and kb.verify() == [] and kb.search(2, kb.latents(2, [4]), 1)[0][0, 0] == 4
    for write in (lambda: add(kb, 6, 2), kb.rebuild_indexes, lambda: kb.set_calibration(2, {"h": 1})):
        with pytest.raises(KBError, match=r"index is a symbolic link to .*outside the KB folder.*Replace the link"):
            write()
    assert snapshot(outside) == before and snapshot(root / "shards") == kb_before
    assert len(KnowledgeBase.open(root)) == 6


def test_folder_linked_inside_the_kb_is_cleaned_as_usual(tmp_path):
    root = tmp_path / "kb"
    (root / "data" / "shards").mkdir(parents=True)
    (root / "shards").symlink_to(root / "data" / "shards", target_is_directory=True)
    kb = KnowledgeBase.create(root, toy_settings(), dtype="float32", exist_ok=True)
    add(kb, 0, 3)
    leftover = root / "data" / "shards" / "00005-eeeeeeee.safetensors"
    leftover.write_bytes(b"a crashed append's shard")
    add(kb, 3, 3)
    assert not leftover.exists() and kb.info()["folders_linked_outside"] == []


# --------------------------------------------------------------------------- format version 1


def test_version_1_kb_opens_warns_once_and_is_upgraded_at_its_next_commit(tmp_path, caplog, monkeypatch):
    def refuse(*a):
        raise AssertionError("FAISS was asked to parse a file")

    for name in ("deserialize_index", "read_index"):
        monkeypatch.setattr(faiss, name, refuse)
    root = tmp_path / "kb"
    shutil.copytree(FIXTURE_V1, root)  # written by the previous release (commit 1d3c24e's kb.py)
    pairs = [(f"prompt {i}", i % 3) for i in range(10)]
    want = toy_latents(pairs, steps=[2, 4], shape=(1, 4, 4))
    with caplog.at_level(logging.WARNING):
        kb = KnowledgeBase.open(root, verify="full")
        KnowledgeBase.open(root)
    warned = [r.getMessage() for r in caplog.records if "format version 1" in r.getMessage()]
    assert len(warned) == 1 and f"python -m kb_tools upgrade {root}" in warned[0]
    assert kb.info()["format_version"] == 1 and kb.settings == toy_settings(latent_shape=(1, 4, 4), stored_steps=[2, 4])
    assert kb.entries == pairs and kb.calibration(2) == {"h": 2, "centered_p95": 0.5}
    np.testing.assert_array_equal(kb.latents(4, np.arange(10)), want[4])
    ids, dist = kb.search(2, want[2][[3, 8]], 1)
    assert ids[:, 0].tolist() == [3, 8] and np.allclose(dist, 0)
    assert kb.verify() == []
    v1_files = [i["file"] for i in manifest_of(root)["indexes"].values()]
    more = [("prompt 10", 1)]
    kb.append(toy_latents(more, steps=[2, 4], shape=(1, 4, 4)), ["prompt 10"], [1])
    m = manifest_of(root)
    assert m["format_version"] == 2 and len(m["checksum"]) == 64
    assert all(i["file"].endswith(".safetensors") and i["structure"] == "flat" for i in m["indexes"].values())
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        kb = KnowledgeBase.open(root, verify="full")
    assert not caplog.records and kb.info()["format_version"] == 2
    assert kb.entries == pairs + more and kb.calibration(2) == {"h": 2, "centered_p95": 0.5} and kb.verify() == []
    assert kb.search(2, want[2][[3]], 1)[0][0, 0] == 3
    assert all((root / f).exists() for f in v1_files)  # kept while readers of version 1 may open them ...
    kb.set_calibration(4, {"h": 1})
    assert not any((root / f).exists() for f in v1_files)  # ... collected at the commit after


def test_upgrade_command_rewrites_a_version_1_kb(tmp_path):
    root = tmp_path / "kb"
    shutil.copytree(FIXTURE_V1, root)
    run = [sys.executable, "-m", "kb_tools", "upgrade", str(root)]
    out = subprocess.run(run, cwd=PACK, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0 and "upgraded from format version 1 to 2 (10 trajectories)" in out.stdout, out.stderr
    assert manifest_of(root)["format_version"] == 2 and KnowledgeBase.open(root, verify="full").verify() == []
    out = subprocess.run(run, cwd=PACK, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0 and "already format version 2" in out.stdout


# --------------------------------------------------------------------------- verify() against forged indexes


def test_verify_detects_a_reordered_shard_list(tmp_path):
    root = tmp_path / "kb"
    kb = KnowledgeBase.create(root, toy_settings(), dtype="float32")
    pairs = add(kb, 0, 5) + add(kb, 5, 5, seed=1) + add(kb, 10, 5, seed=2)
    m = manifest_of(root)
    m["shards"] = m["shards"][::-1]  # every checksum still matches; ids now point at other entries
    write_manifest(root, m)
    kb = KnowledgeBase.open(root, verify="full")
    assert kb.entries == pairs[10:] + pairs[5:10] + pairs[:5]
    problems = kb.verify()
    assert problems and all("maps keys to the wrong entries" in p and "reordered" in p and "rebuild_indexes" in p for p in problems)
    assert len(problems) == 3  # one per stored step
    kb.rebuild_indexes()
    assert kb.verify() == []


def _forge_index_arrays(root: Path, step: int, edit) -> None:
    rel = manifest_of(root)["indexes"][str(step)]["file"]
    t = {k: v.copy() for k, v in tensors_from_bytes(Path(kb_file(root, rel)).read_bytes(), rel, "").items()}
    edit(t)
    replace_file_signed(root, rel, forge_safetensors(t))


def test_verify_and_search_refuse_an_index_with_ids_outside_the_kb(tmp_path):
    root = tmp_path / "kb"
    kb = KnowledgeBase.create(root, toy_settings(), dtype="float32", index_type="hnsw")
    add(kb, 0, 12)
    _forge_index_arrays(root, 4, lambda t: t["neighbors"].__setitem__(3, 12 + 5))
    kb = KnowledgeBase.open(root, verify="full")  # every checksum matches
    problems = kb.verify()
    assert len(problems) == 1 and "neighbour id is outside [0, 12)" in problems[0] and "rebuild_indexes" in problems[0]
    with pytest.raises(KBError, match=r"neighbour id is outside \[0, 12\)"):
        kb.search(4, kb.latents(4, [0]), 1)
    assert kb.search(2, kb.latents(2, [5]), 1)[0][0, 0] == 5  # the other steps work


def test_an_ivf_index_assigning_keys_to_lists_that_do_not_exist_is_refused(tmp_path):
    root = tmp_path / "kb"
    kb = KnowledgeBase.create(root, toy_settings(), dtype="float32", index_type="ivf")
    add(kb, 0, 12)
    m = manifest_of(root)
    rel = m["indexes"]["4"]["file"]
    keys = tensors_from_bytes(Path(kb_file(root, rel)).read_bytes(), rel, "")["keys"]
    forged = {"keys": keys, "centroids": keys[:2], "assign": np.array([0, 1] * 5 + [1, 7], np.int64)}
    m["indexes"]["4"].update(structure="ivf", nlist=2)
    write_manifest(root, m)
    replace_file_signed(root, rel, forge_safetensors(forged))
    kb = KnowledgeBase.open(root, verify="full")
    with pytest.raises(KBError, match=r"list assignments must be 12 int64 values in \[0, 2\)"):
        kb.search(4, kb.latents(4, [0]), 1)
    forged["assign"][-1] = 0  # a consistent forgery loads, and verify checks its answers
    replace_file_signed(root, rel, forge_safetensors(forged))
    assert KnowledgeBase.open(root, verify="full").verify() == []
