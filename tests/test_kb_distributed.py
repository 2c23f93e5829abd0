"""The pieces of a distributed KB build that need no Ray: merging shards into an existing KB, the shard
plan, and the optional `ray` import (tests/test_kb_ray.py runs the build itself on a local Ray cluster)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
from kb_crash_helper import STORED_STEPS, toy_latents, toy_settings

from kb_tools.core.errors import KBError, KBMismatchError
from kb_tools.store import KnowledgeBase, merge_into
from kb_tools.build.distributed import plan_shards, shard_name

faiss.omp_set_num_threads(1)
PACK_DIR = Path(__file__).resolve().parent.parent


def make_kb(path, n, start=0, index_type="auto", **settings) -> KnowledgeBase:
    kb = KnowledgeBase.create(path, toy_settings(**settings), dtype="float32", index_type=index_type)
    ps = [(f"a photo of thing {i}", 0) for i in range(start, start + n)]
    kb.append(toy_latents(ps), [p for p, _ in ps], [s for _, s in ps])
    return kb


@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_merge_into_links_shards_and_grows_the_index(tmp_path, index_type):
    base = make_kb(tmp_path / "kb", 20, index_type=index_type)
    a, b = make_kb(tmp_path / "a", 7, 100, index_type=index_type), make_kb(tmp_path / "b", 5, 200, index_type=index_type)
    out = merge_into(str(tmp_path / "kb"), [str(tmp_path / "a"), b])
    assert out.entries == base.entries + a.entries + b.entries
    assert out.verify() == []
    shards = sorted((tmp_path / "kb" / "shards").glob("*.safetensors"))
    assert os.path.samefile(shards[1], next((tmp_path / "a" / "shards").glob("*.safetensors")))  # linked, not rewritten
    for step in STORED_STEPS:
        np.testing.assert_array_equal(out.latents(step, [20, 31]), np.concatenate([a.latents(step, [0]), b.latents(step, [4])]))
    ids, dist = out.search(STORED_STEPS[0], np.concatenate([a.latents(STORED_STEPS[0], [3]), base.latents(STORED_STEPS[0], [2])]), 1)
    assert ids[:, 0].tolist() == [23, 2] and np.allclose(dist, 0)
    again = KnowledgeBase.open(tmp_path / "kb", verify="full")
    assert len(again) == 32
    # the mean the guard uses covers the merged entries
    want = np.concatenate([base.latents(STORED_STEPS[0], range(20)), a.latents(STORED_STEPS[0], range(7)),
                           b.latents(STORED_STEPS[0], range(5))]).mean(axis=0)
    np.testing.assert_allclose(again.mean_key(STORED_STEPS[0]).reshape(want.shape), want, rtol=1e-5, atol=1e-6)


def test_merge_into_refuses_duplicates_and_other_settings_and_changes_nothing(tmp_path):
    make_kb(tmp_path / "kb", 10)
    make_kb(tmp_path / "dup", 3, 8)
    make_kb(tmp_path / "other", 3, 50, sampler="dpmpp_2m")
    before = sorted(os.listdir(tmp_path / "kb" / "shards"))
    with pytest.raises(KBError, match=r"thing 8.*in both.*Remove it"):
        merge_into(str(tmp_path / "kb"), [str(tmp_path / "dup")])
    with pytest.raises(KBMismatchError, match=r"sampler.*same settings"):
        merge_into(str(tmp_path / "kb"), [str(tmp_path / "other")])
    assert sorted(os.listdir(tmp_path / "kb" / "shards")) == before and len(KnowledgeBase.open(tmp_path / "kb")) == 10


def test_shard_plan_keeps_whole_batches_and_is_stable():
    todo = [(f"p{i}", s) for i in range(11) for s in (0, 1)]  # 22 pairs
    plan = plan_shards(todo, 4, 4)
    assert [len(s) for s in plan] == [8, 8, 6] and sum(plan, []) == todo
    assert all(len(s) % 4 == 0 for s in plan[:-1])
    assert plan_shards(todo, 100, 1) == [[p] for p in todo] and plan_shards([], 4, 2) == []
    assert shard_name(plan[0]) == shard_name(list(plan[0])) != shard_name(plan[1])


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=PACK_DIR, capture_output=True, text=True, timeout=1800)


def test_missing_ray_names_the_install_command():
    # A Python where `import ray` fails (sys.modules entry None makes the import raise ImportError).
    out = _python("import sys; sys.modules['ray'] = None\n"
                  "from kb_tools.build.distributed import import_ray\n"
                  "try:\n    import_ray()\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("KBError") and 'pip install "redi-sampling[ray]"' in out.stdout


def test_ray_is_imported_only_by_a_build_that_asks_for_it():
    out = _python("import sys\nimport kb_tools.build.cli, kb_tools.build.job, kb_tools.build.distributed, kb_tools.store\n"
                  "print('ray' in sys.modules)")
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
    shipped = [p for p in PACK_DIR.rglob("*.py") if p.parts[len(PACK_DIR.parts)] in ("nodes", "kb_tools", "embedded")]
    importing = [p.relative_to(PACK_DIR).as_posix() for p in shipped if "import ray" in p.read_text()]
    assert importing == ["kb_tools/build/distributed.py"]
