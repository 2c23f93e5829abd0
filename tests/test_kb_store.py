"""The KB store: round trips, merge, memory maps, indexes, and every bad input, on real files."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import faiss
import numpy as np
import pytest
from kb_crash_helper import LATENT_SHAPE, STORED_STEPS, manifest_of, toy_latents, toy_settings, write_manifest

from kb_tools import store as kbmod
from kb_tools.core.errors import KBError, KBMismatchError
from kb_tools.store import KBSettings, KnowledgeBase, auto_reduce, merge, open_or_create, step_name
from kb_tools.store.safetensors_file import read_header

faiss.omp_set_num_threads(1)  # the test machine's cores are shared


def pairs(n, start=0, seed=0):
    return [(f"a photo of thing {i}", seed) for i in range(start, start + n)]


def make_kb(path, n=40, start=0, dtype="float32", chunks=1, **kw) -> KnowledgeBase:
    kb = KnowledgeBase.create(path, toy_settings(**kw.pop("settings", {})), dtype=dtype, **kw)
    for c in range(chunks):
        ps = pairs(n, start + c * n)
        kb.append(toy_latents(ps), [p for p, _ in ps], [s for _, s in ps])
    return kb


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def shard_file(kb, i=0, key="file") -> str:
    return os.path.join(kb.path, manifest_of(kb.path)["shards"][i][key])


def index_file(kb, step=2) -> str:
    return os.path.join(kb.path, manifest_of(kb.path)["indexes"][str(step)]["file"])


# --------------------------------------------------------------------------- round trips


def test_round_trip_float32_is_bit_exact(tmp_path):
    kb = make_kb(tmp_path / "kb", n=30, chunks=2)
    kb = KnowledgeBase.open(tmp_path / "kb", verify="full")
    ps = pairs(60)
    assert len(kb) == 60 and kb.entries == ps
    assert kb.has_entry(*ps[45]) and not kb.has_entry(ps[45][0], 1)
    want = toy_latents(ps)
    ids = np.array([59, 0, 31, 31, 7])  # any order, repeats, across both shards
    for step in STORED_STEPS:
        got = kb.latents(step, ids)
        assert got.dtype == np.float32 and got.shape == (5, *LATENT_SHAPE)
        np.testing.assert_array_equal(got, want[step][ids])
        np.testing.assert_array_equal(kb.keys_flat(step, ids), want[step][ids].reshape(5, -1))
        np.testing.assert_allclose(kb.mean_key(step), want[step].reshape(60, -1).mean(0), rtol=1e-5, atol=1e-5)
    assert kb.verify() == []
    assert kb.info()["count"] == 60 and kb.info()["shards"] == 2


def test_round_trip_float16_within_precision(tmp_path):
    make_kb(tmp_path / "kb", n=20, chunks=2, dtype="float16")
    kb = KnowledgeBase.open(tmp_path / "kb")
    assert kb.dtype == "float16"
    want = toy_latents(pairs(40))[4]
    got = kb.latents(4, np.arange(40))
    np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32))  # exactly the fp16 rounding
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    assert not np.array_equal(got, want)  # it really was stored in half precision


def test_float16_widening_is_exact_for_every_bit_pattern():
    """The torch widening used for reads agrees with numpy on all 65,536 float16 values (NaN stays NaN)."""
    from kb_tools.store.generation import as_float32

    every = np.arange(2**16, dtype=np.uint16).view(np.float16).reshape(2, 32768)  # crosses the chunk size
    got, want = as_float32(every), every.astype(np.float32)
    assert got.dtype == np.float32 and got.shape == every.shape
    np.testing.assert_array_equal(got, want)  # assert_array_equal treats NaN == NaN
    num = ~np.isnan(want)
    assert np.array_equal(np.signbit(got[num]), np.signbit(want[num]))  # -0.0 stays -0.0 (a NaN's sign may not)
    assert as_float32(np.zeros((0, 4), np.float16)).shape == (0, 4)


def test_gather_reads_ids_spread_over_many_shards_in_any_order(tmp_path):
    kb = make_kb(tmp_path / "kb", n=5, chunks=8, dtype="float16")  # 8 shards of 5
    want = toy_latents(pairs(40))[4].astype(np.float16).astype(np.float32)
    ids = np.array([39, 0, 17, 17, 5, 33, 4, 20])
    np.testing.assert_array_equal(kb.latents(4, ids), want[ids])


def test_latents_are_memory_mapped_and_read_lazily(tmp_path):
    kb = make_kb(tmp_path / "kb", n=10, chunks=2)
    kb = KnowledgeBase.open(tmp_path / "kb", verify="size")
    views = kb.shard_views(2)
    assert len(views) == 2 and all(not v.flags.owndata and not v.flags.writeable for v in views)
    # Values are read at access, not at open: a change on disk after open is visible.
    path = shard_file(kb, 1)
    with open(path, "r+b") as f:
        f.seek(-4, os.SEEK_END)  # last float32 of the last tensor in the file
        f.write(np.float32(1234.5).tobytes())
    header = read_header(path)
    last_step = max(STORED_STEPS, key=lambda s: header[step_name(s)].end)
    assert kb.latents(last_step, [19])[0, -1, -1, -1] == np.float32(1234.5)


def test_missing_keeps_order_and_skips_stored(tmp_path):
    kb = make_kb(tmp_path / "kb", n=5)
    query = [("new b", 1), pairs(5)[2], ("new a", 1), ("new b", 1)]
    assert kb.missing(query) == [("new b", 1), ("new a", 1)]


def test_garbage_is_ignored_at_open_and_removed_at_next_commit(tmp_path):
    kb = make_kb(tmp_path / "kb", n=5)
    root = tmp_path / "kb"
    # Leftovers of crashed writers: names the store writes.
    junk = [root / "shards" / "00009-deadbeef.safetensors", root / "shards" / "00009-deadbeef.entries.json",
            root / "index" / "step_002-000042-0badf00d.safetensors", root / "index" / "step_004-000041-0badf00d.faiss",
            root / "stats-999999-00000000.safetensors", root / "manifest.json.tmp-123-abcdef01",
            root / "shards" / "00001-12345678.safetensors.tmp-77-00ff00ff"]
    # Not the store's: a user's notes, another tool's files, a folder and a link named like ours.
    foreign = [root / "notes.txt", root / "shards" / "README", root / "index" / "step_002-custom.faiss",
               root / "shards" / "00010-cafebabe.bin"]
    for j in junk + foreign:
        j.write_bytes(b"garbage")
    (root / "index" / "step_006-000001-aaaaaaaa.safetensors").mkdir()
    (root / "shards" / "00011-bbbbbbbb.safetensors").symlink_to(root / "notes.txt")
    kb = KnowledgeBase.open(root, verify="full")
    assert len(kb) == 5 and kb.verify() == []
    previous = manifest_of(root)
    ps = pairs(3, start=100)
    kb.append(toy_latents(ps), [p for p, _ in ps], [s for _, s in ps])
    assert not any(j.exists() for j in junk)
    assert all(f.read_bytes() == b"garbage" for f in foreign)
    assert (root / "index" / "step_006-000001-aaaaaaaa.safetensors").is_dir()
    assert (root / "shards" / "00011-bbbbbbbb.safetensors").is_symlink()
    # The replaced generation's index and stats files stay for readers that read its manifest ...
    old = [previous["stats"]["file"], *(i["file"] for i in previous["indexes"].values())]
    assert all((root / rel).exists() for rel in old)
    assert len(KnowledgeBase.open(root)) == 8
    ps = pairs(3, start=200)
    kb.append(toy_latents(ps), [p for p, _ in ps], [s for _, s in ps])
    assert not any((root / rel).exists() for rel in old)  # ... until the next commit


def test_set_calibration_persists(tmp_path):
    kb = make_kb(tmp_path / "kb", n=5)
    kb.set_calibration(4, {"h": 2, "centered_p95": 0.5})
    again = KnowledgeBase.open(tmp_path / "kb")
    assert again.calibration(4) == {"h": 2, "centered_p95": 0.5} and again.calibration(2) is None
    with pytest.raises(KBError, match="stores steps"):
        kb.set_calibration(5, {})


# --------------------------------------------------------------------------- merge


def test_merge_links_shards_and_finds_entries_of_both(tmp_path):
    a = make_kb(tmp_path / "a", n=20, chunks=2)
    b = make_kb(tmp_path / "b", n=15, start=1000)
    before = {p: sha(p) for p in [shard_file(a, 0), shard_file(a, 1), shard_file(b, 0)]}
    out = merge(tmp_path / "m", [tmp_path / "a", tmp_path / "b"])
    assert len(out) == 55 and out.entries == a.entries + b.entries
    assert out.verify() == []
    for i, src in enumerate(before):
        dst = shard_file(out, i)
        assert os.path.samefile(src, dst)  # a hard link: the latents were not rewritten
        assert sha(src) == before[src]
    np.testing.assert_array_equal(out.latents(6, [0, 54]), np.concatenate([a.latents(6, [0]), b.latents(6, [14])]))
    ids, dist = out.search(2, np.concatenate([a.latents(2, [25]), b.latents(2, [3])]), 1)
    assert ids[:, 0].tolist() == [25, 43] and np.allclose(dist, 0)


def test_merge_refuses_mismatched_settings(tmp_path):
    make_kb(tmp_path / "a", n=5)
    make_kb(tmp_path / "b", n=5, start=10, settings={"sampler": "dpmpp_2m"})
    with pytest.raises(KBMismatchError, match=r"sampler.*'euler'.*'dpmpp_2m'.*same settings"):
        merge(tmp_path / "m", [tmp_path / "a", tmp_path / "b"])
    assert not (tmp_path / "m").exists()
    make_kb(tmp_path / "c", n=5, start=10, settings={"model_fingerprint": {"name": "other"}})
    with pytest.raises(KBMismatchError, match="model_fingerprint"):
        merge(tmp_path / "m", [tmp_path / "a", tmp_path / "c"])


def test_merge_refuses_duplicate_entries(tmp_path):
    make_kb(tmp_path / "a", n=5)
    make_kb(tmp_path / "b", n=5, start=3)
    with pytest.raises(KBError, match=r"thing 3.*in both.*Remove it from one source"):
        merge(tmp_path / "m", [tmp_path / "a", tmp_path / "b"])


def test_open_or_create(tmp_path):
    kb = open_or_create(tmp_path / "kb", toy_settings())
    assert kb.index_type == "auto" and kb.dtype == "float16"  # the defaults
    ps = pairs(4)
    kb.append(toy_latents(ps), [p for p, _ in ps], [s for _, s in ps])
    assert len(open_or_create(tmp_path / "kb", toy_settings(cfg=7.0 + 1e-9))) == 4  # float tolerance
    assert len(open_or_create(tmp_path / "kb", toy_settings(sigmas=[s * (1 + 1e-8) for s in toy_settings().sigmas]))) == 4
    with pytest.raises(KBMismatchError, match=r"sampler: KB has 'euler', request has 'dpmpp_2m'.*new KB path"):
        open_or_create(tmp_path / "kb", toy_settings(sampler="dpmpp_2m"))
    with pytest.raises(KBMismatchError, match=r"sigmas: KB has .*; steps: KB has 10, request has 12; stored_steps"):
        open_or_create(tmp_path / "kb", toy_settings(steps=12, stored_steps=[2], sigmas=list(range(13))[::-1]))
    with pytest.raises(KBMismatchError, match=r"dtype: KB has 'float16', request has 'float32'"):
        open_or_create(tmp_path / "kb", toy_settings(), dtype="float32")
    with pytest.raises(KBMismatchError, match=r"index_type: KB has 'auto', request has 'hnsw'"):
        open_or_create(tmp_path / "kb", toy_settings(), index_type="hnsw")
    with pytest.raises(KBError, match="already holds a knowledge base"):
        KnowledgeBase.create(tmp_path / "kb", toy_settings())


# --------------------------------------------------------------------------- indexes


def test_auto_reduce():
    assert auto_reduce((4, 64, 64)) == 8 and auto_reduce((4, 8, 8)) == 1
    assert auto_reduce((16, 128, 128)) == 32 and auto_reduce((4, 128, 128)) == 16
    assert auto_reduce((4, 96, 72)) == 8  # 72 is not divisible by 16: coarsest that divides


@pytest.mark.parametrize("index_type, reduce, candidates", [
    ("flat", 1, None), ("hnsw", 1, None),
    ("flat", 2, 120),  # pooled keys of white-noise toys rank poorly: all candidates -> exact
])
def test_search_matches_brute_force(tmp_path, index_type, reduce, candidates):
    kb = make_kb(tmp_path / "kb", n=60, chunks=2, index_type=index_type, reduce=reduce)
    kb = KnowledgeBase.open(tmp_path / "kb")
    q = toy_latents([("query one", 0), ("query two", 0)])[4]
    ids, dist = kb.search(4, q, 5, candidates=candidates)
    keys = kb.keys_flat(4, np.arange(len(kb))).astype(np.float64)
    d = np.linalg.norm(keys[None] - q.reshape(2, 1, -1), axis=2)
    np.testing.assert_array_equal(ids, np.argsort(d, axis=1)[:, :5])
    np.testing.assert_allclose(dist, np.sort(d, axis=1)[:, :5], rtol=1e-5)
    assert dist.dtype == np.float32 and ids.dtype == np.int64


def test_ivf_index_trains_once_enough_keys(tmp_path):
    settings = toy_settings(latent_shape=(1, 4, 4), stored_steps=[2])
    kb = KnowledgeBase.create(tmp_path / "kb", settings, index_type="ivf", dtype="float32")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((700, 1, 4, 4)).astype(np.float32)
    kb.append({2: x[:100]}, [f"p{i}" for i in range(100)], [0] * 100)
    assert (kb.info()["index_structure"], kb.info()["ivf_nlist"]) == ("flat", None)  # too few keys to train
    n = 24336  # 39 * nlist with nlist = 4 * sqrt(n) = 624
    big = rng.standard_normal((n - 100, 1, 4, 4)).astype(np.float32)
    kb.append({2: big}, [f"p{i}" for i in range(100, n)], [0] * (n - 100))
    kb = KnowledgeBase.open(tmp_path / "kb")
    assert (kb.info()["index_type"], kb.info()["index_structure"], kb.info()["ivf_nlist"]) == ("ivf", "ivf", 624)
    ids, dist = kb.search(2, x[:3], 2)
    assert ids[:, 0].tolist() == [0, 1, 2] and np.allclose(dist[:, 0], 0)
    assert kb.verify() == []


def test_auto_index_is_flat_up_to_the_threshold_then_hnsw(tmp_path, monkeypatch):
    monkeypatch.setattr(kbmod.index, "AUTO_FLAT_MAX_ENTRIES", 50)  # the rule, on a small KB
    settings = toy_settings(latent_shape=(1, 4, 4), stored_steps=[2, 4])
    kb = KnowledgeBase.create(tmp_path / "kb", settings, dtype="float32")  # index_type defaults to "auto"
    x = np.random.default_rng(0).standard_normal((80, 1, 4, 4)).astype(np.float32)
    kb.append({2: x[:50], 4: -x[:50]}, [f"p{i}" for i in range(50)], [0] * 50)
    assert manifest_of(kb.path)["indexes"]["2"] == {**manifest_of(kb.path)["indexes"]["2"], "type": "auto", "structure": "flat"}
    kb.append({2: x[50:], 4: -x[50:]}, [f"p{i}" for i in range(50, 80)], [0] * 30)
    for rec in manifest_of(kb.path)["indexes"].values():
        assert (rec["type"], rec["structure"], rec["ntotal"]) == ("auto", "hnsw", 80)
    kb = KnowledgeBase.open(tmp_path / "kb")
    assert kb.index_type == "auto" and kb.info()["index_structure"] == "hnsw"
    ids, dist = kb.search(4, -x[[3, 77]], 1)
    assert ids[:, 0].tolist() == [3, 77] and np.allclose(dist, 0)
    assert kb.verify() == []


def test_large_hnsw_kbs_search_with_a_wider_beam(tmp_path, monkeypatch):
    monkeypatch.setattr(kbmod.index, "AUTO_FLAT_MAX_ENTRIES", 50)
    settings = toy_settings(latent_shape=(1, 4, 4), stored_steps=[2, 4])
    kb = KnowledgeBase.create(tmp_path / "kb", settings, dtype="float32")
    x = np.random.default_rng(0).standard_normal((80, 1, 4, 4)).astype(np.float32)
    kb.append({2: x, 4: -x}, [f"p{i}" for i in range(80)], [0] * 80)
    efs = lambda kb: {st: kb._gen.index(st, None, None).hnsw.efSearch for st in (2, 4)}  # noqa: E731
    assert efs(KnowledgeBase.open(tmp_path / "kb")) == {2: 64, 4: 64}
    monkeypatch.setattr(kbmod.index, "LARGE_HNSW_MIN_ENTRIES", 60)  # the rule, on a small KB
    kb = KnowledgeBase.open(tmp_path / "kb")
    assert efs(kb) == {2: 512, 4: 512}
    kb.set_search_params(ef_search=32)  # a session's own choice wins
    assert efs(kb) == {2: 32, 4: 32}


def test_rebuild_indexes_repairs_a_corrupt_index(tmp_path):
    kb = make_kb(tmp_path / "kb", n=10)
    p = index_file(kb)
    size = os.path.getsize(p)
    with open(p, "wb") as f:
        f.write(b"\0" * size)
    with pytest.raises(KBError, match=r"index.*checksum.*rebuild_indexes"):
        KnowledgeBase.open(tmp_path / "kb")
    kb = KnowledgeBase.open(tmp_path / "kb", verify="size")
    kb.rebuild_indexes()
    kb = KnowledgeBase.open(tmp_path / "kb", verify="full")
    assert kb.verify() == [] and kb.search(2, kb.latents(2, [7]), 1)[0][0, 0] == 7


def test_rebuild_indexes_repairs_corrupt_stats(tmp_path):
    kb = make_kb(tmp_path / "kb", n=10)
    want = kb.mean_key(4)
    p = os.path.join(kb.path, manifest_of(kb.path)["stats"]["file"])
    data = bytearray(Path(p).read_bytes())
    data[-3] ^= 0x55
    Path(p).write_bytes(bytes(data))
    with pytest.raises(KBError, match=r"stats-.*checksum.*stats file is corrupt.*rebuild_indexes"):
        KnowledgeBase.open(tmp_path / "kb")
    kb = KnowledgeBase.open(tmp_path / "kb", verify="size")  # derived data: opens so it can be repaired
    assert any("stats file" in p for p in kb.verify())
    with pytest.raises(KBError, match=r"stats-.*checksum.*stats file is corrupt.*rebuild_indexes"):
        kb.mean_key(4)
    kb.rebuild_indexes()
    np.testing.assert_allclose(KnowledgeBase.open(tmp_path / "kb", verify="full").mean_key(4), want, rtol=1e-6)


# --------------------------------------------------------------------------- bad files


def test_missing_directory_and_manifest(tmp_path):
    with pytest.raises(KBError, match=r"No knowledge base.*does not exist.*build a KB"):
        KnowledgeBase.open(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(KBError, match=r"no manifest.json.*not a knowledge base.*build one"):
        KnowledgeBase.open(tmp_path / "empty")


def test_manifest_not_json(tmp_path):
    make_kb(tmp_path / "kb", n=3)
    (tmp_path / "kb" / "manifest.json").write_text("{not json")
    with pytest.raises(KBError, match=r"not valid JSON.*damaged.*Restore.*rebuild"):
        KnowledgeBase.open(tmp_path / "kb")


def test_manifest_newer_format(tmp_path):
    make_kb(tmp_path / "kb", n=3)
    m = manifest_of(tmp_path / "kb")
    m["format_version"] = kbmod.FORMAT_VERSION + 1
    write_manifest(tmp_path / "kb", m)
    with pytest.raises(KBError, match=r"format version 3.*reads versions up to 2.*Upgrade the pack"):
        KnowledgeBase.open(tmp_path / "kb")
    m["format_version"] = 0
    write_manifest(tmp_path / "kb", m)
    with pytest.raises(KBError, match=r"unknown format version 0.*Rebuild"):
        KnowledgeBase.open(tmp_path / "kb")


def test_missing_shard_file(tmp_path):
    kb = make_kb(tmp_path / "kb", n=3)
    os.remove(shard_file(kb))
    with pytest.raises(KBError, match=r"missing shards/.*safetensors.*Restore the file, or rebuild"):
        KnowledgeBase.open(tmp_path / "kb")


def test_truncated_shard(tmp_path):
    kb = make_kb(tmp_path / "kb", n=3)
    p = shard_file(kb)
    os.truncate(p, os.path.getsize(p) - 100)
    with pytest.raises(KBError, match=r"bytes, the manifest records.*truncated.*Restore the file"):
        KnowledgeBase.open(tmp_path / "kb", verify="size")


def test_corrupt_shard_bytes(tmp_path):
    kb = make_kb(tmp_path / "kb", n=3)
    p = shard_file(kb)
    data = bytearray(Path(p).read_bytes())
    data[-10] ^= 0xFF  # inside the latent data, not the header
    Path(p).write_bytes(bytes(data))
    with pytest.raises(KBError, match=r"shard.*fails its sha256 checksum.*corrupt.*Restore"):
        KnowledgeBase.open(tmp_path / "kb", verify="full")
    kb = KnowledgeBase.open(tmp_path / "kb", verify="size")  # sizes alone cannot see it
    problems = kb.verify()
    assert "checksum" in problems[0] and manifest_of(kb.path)["shards"][0]["file"] in problems[0]
    assert any("index of step 6 holds no key equal to entry 2" in p for p in problems)  # the flipped value is in step 6


def test_corrupt_entries_file(tmp_path):
    kb = make_kb(tmp_path / "kb", n=3)
    p = shard_file(kb, key="entries_file")
    Path(p).write_bytes(Path(p).read_bytes().replace(b"thing 1", b"thing 7"))
    with pytest.raises(KBError, match=r"entries.json.*checksum.*entries file.*Restore"):
        KnowledgeBase.open(tmp_path / "kb", verify="size")


def test_corrupt_index_is_caught_and_faiss_never_parses_a_file(tmp_path, monkeypatch):
    def refuse(*a):
        raise AssertionError("FAISS was asked to parse a file")

    for name in ("deserialize_index", "read_index"):
        monkeypatch.setattr(faiss, name, refuse)
    kb = make_kb(tmp_path / "kb", n=5)
    p = index_file(kb, 4)
    size = os.path.getsize(p)
    Path(p).write_bytes(os.urandom(size))  # same size: only the checksum can tell
    with pytest.raises(KBError, match=r"index.*fails its sha256 checksum.*rebuild_indexes"):
        KnowledgeBase.open(tmp_path / "kb")  # verify="auto" on a small KB hashes indexes at open
    kb = KnowledgeBase.open(tmp_path / "kb", verify="size")
    kb.search(2, kb.latents(2, [0]), 1)  # the intact index of step 2 loads
    with pytest.raises(KBError, match=r"index.*fails its sha256 checksum"):
        kb.search(4, kb.latents(4, [0]), 1)


# --------------------------------------------------------------------------- bad input


def test_search_rejects_bad_queries(tmp_path):
    empty = KnowledgeBase.create(tmp_path / "empty", toy_settings())
    with pytest.raises(KBError, match=r"is empty: build or append entries first"):
        empty.search(2, np.zeros((1, *LATENT_SHAPE), np.float32), 1)
    kb = make_kb(tmp_path / "kb", n=6)
    q = kb.latents(2, [0])
    with pytest.raises(KBError, match=r"shape \[4, 16, 16\] differs from the KB's \[4, 8, 8\].*different latent size"):
        kb.search(2, np.zeros((1, 4, 16, 16), np.float32), 1)
    with pytest.raises(KBError, match=r"dtype int64 is not a floating-point type.*float32"):
        kb.search(2, np.zeros((1, *LATENT_SHAPE), np.int64), 1)
    with pytest.raises(KBError, match=r"has only 6 entries; lower H"):
        kb.search(2, q, 7)
    with pytest.raises(KBError, match=r"must be an int >= 1"):
        kb.search(2, q, 0)
    bad = q.copy()
    bad[0, 1, 2, 3] = np.nan
    with pytest.raises(KBError, match=r"query 0 .*NaN/Inf.*diverged"):
        kb.search(2, bad, 1)
    with pytest.raises(KBError, match=r"has no step 3; it stores steps \[2, 4, 6\].*rebuild the KB"):
        kb.search(3, q, 1)
    with pytest.raises(KBError, match=r"has no step 5; it stores steps"):
        kb.latents(5, [0])
    with pytest.raises(KBError, match=r"id 6 is out of range.*6 entries"):
        kb.latents(2, [6])


def test_append_rejects_bad_latents(tmp_path):
    kb = make_kb(tmp_path / "kb", n=4)
    ps = pairs(3, start=50)
    prompts, seeds = [p for p, _ in ps], [s for _, s in ps]
    lat = toy_latents(ps)
    lat[4][1, 0, 0, 0] = np.inf
    with pytest.raises(KBError, match=r"step 4, entry 1 \(prompt 'a photo of thing 51', seed 0\) contain NaN/Inf.*regenerate"):
        kb.append(lat, prompts, seeds)
    with pytest.raises(KBError, match=r"already in the KB.*kb.missing"):
        kb.append(toy_latents(pairs(1)), [pairs(1)[0][0]], [0])
    with pytest.raises(KBError, match=r"twice in this append"):
        kb.append(toy_latents([ps[0], ps[0]]), [ps[0][0]] * 2, [0, 0])
    with pytest.raises(KBError, match=r"steps \[2, 4\], the KB stores steps \[2, 4, 6\]"):
        kb.append({k: v for k, v in toy_latents(ps).items() if k != 6}, prompts, seeds)
    with pytest.raises(KBError, match=r"shape \[3, 4, 4, 4\], expected \[3, 4, 8, 8\]"):
        kb.append({k: v[:, :, :4, :4] for k, v in toy_latents(ps).items()}, prompts, seeds)
    with pytest.raises(KBError, match=r"3 prompts and 2 seeds"):
        kb.append(toy_latents(ps), prompts, seeds[:2])
    assert len(kb) == 4 and len(KnowledgeBase.open(tmp_path / "kb", verify="full")) == 4
    assert len(os.listdir(tmp_path / "kb" / "shards")) == 2  # failed appends left no files


def test_append_float16_overflow_is_named(tmp_path):
    kb = make_kb(tmp_path / "kb", n=1, dtype="float16")
    ps = pairs(2, start=9)
    lat = toy_latents(ps)
    lat[2][0] *= 1e5
    with pytest.raises(KBError, match=r"step 2, entry 0.*overflow float16.*dtype='float32'"):
        kb.append(lat, [p for p, _ in ps], [s for _, s in ps])


def test_append_accepts_torch_tensors(tmp_path):
    torch = pytest.importorskip("torch")
    kb = make_kb(tmp_path / "kb", n=1)
    ps = pairs(2, start=9)
    lat = toy_latents(ps)
    kb.append({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in lat.items()}, [p for p, _ in ps], [0, 0])
    np.testing.assert_allclose(kb.latents(2, [1, 2]), lat[2], rtol=1e-2, atol=1e-1)


@pytest.mark.parametrize("override, words", [
    ({"stored_steps": [2, 10]}, r"stored_steps \[10\] are outside \[0, 10\).*Store steps between 0"),
    ({"sigmas": [1.0, 0.0]}, r"sigmas must list steps \+ 1 = 11 values, got 2"),
    ({"latent_shape": (4, 8)}, r"latent_shape must be 3 positive ints"),
    ({"seed_policy": "random"}, r"seed_policy 'random' is unknown.*fixed"),
    ({"denoise": 0.0}, r"denoise must be in \(0, 1\]"),
])
def test_settings_validation(override, words):
    with pytest.raises(KBError, match=words):
        toy_settings(**override)


def test_settings_round_trip_and_unknown_keys():
    s = toy_settings(key_model_fingerprint={"name": "small"}, extra={"note": 1})
    assert KBSettings.from_dict(s.to_dict()) == s
    with pytest.raises(KBError, match=r"unknown keys \['sampler_name'\]"):
        KBSettings.from_dict({**s.to_dict(), "sampler_name": "euler"})


def test_verify_reports_a_shard_truncated_after_open(tmp_path):
    kb = make_kb(tmp_path / "kb", n=4)
    os.truncate(shard_file(kb), 100)  # reading the mapped tail now would raise SIGBUS
    problems = kb.verify()
    assert problems and "truncated" in problems[0]
    with pytest.raises(KBError, match=r"truncated to 100 bytes after the KB was opened.*Restore"):
        kb.latents(2, [0])
