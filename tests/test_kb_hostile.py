"""Hand-edited, damaged and forged KB files, bad names and bad parameters: each a KBError naming the
problem and the fix, never a raw exception (real files on disk)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from kb_crash_helper import (
    LATENT_SHAPE, forge_safetensors, kb_file, manifest_of, replace_file_signed, toy_latents, toy_settings, write_manifest,
)

import kb_tools as retrieval  # the public names: nearest_keys, blend_entries, fit_weights, calibrate
from kb_tools.core.errors import KBError
from kb_tools.store import KnowledgeBase, check_kb_name, merge, open_or_create
from kb_tools.store.safetensors_file import tensors_from_bytes


def make(path, n=6, index_type="flat") -> KnowledgeBase:
    kb = KnowledgeBase.create(path, toy_settings(), dtype="float32", index_type=index_type)
    ps = [(f"thing {i}", i % 2) for i in range(n)]
    kb.append(toy_latents(ps), [p for p, _ in ps], [s for _, s in ps])
    return kb


@pytest.fixture
def kbdir(tmp_path):
    make(tmp_path / "kb")
    return tmp_path / "kb"


# --------------------------------------------------------------------------- the manifest


def test_manifest_edit_without_re_signing_is_refused(kbdir):
    m = manifest_of(kbdir)
    m["settings"]["sampler"] = "dpmpp_2m"  # a hand edit of the recipe
    write_manifest(kbdir, m, sign=False)
    with pytest.raises(KBError, match=r"manifest.json fails its checksum: it was edited by hand or damaged.*Restore"):
        KnowledgeBase.open(kbdir)


@pytest.mark.parametrize("edit, words", [
    (lambda m: m["shards"][0].update(file=5), r"shards\[0\].file names 5, which is not a file this store writes"),
    (lambda m: m["shards"][0].update(file="../../etc/passwd"), r"shards\[0\].file names '../../etc/passwd'"),
    (lambda m: m["shards"][0].update(file="/etc/passwd"), r"shards\[0\].file names '/etc/passwd'"),
    (lambda m: m["shards"][0].pop("sha256"), r"shards\[0\] lacks \['sha256'\]"),
    (lambda m: m["shards"][0].update(bytes=-1), r"shards\[0\].bytes must be an integer in \[8,"),
    (lambda m: m["shards"][0].update(count=True), r"shards\[0\].count must be an integer"),
    (lambda m: m.update(count=m["count"] + 1), r"count is 7 but the shards hold 6 entries"),
    (lambda m: m.update(shards={}), r"shards must be a list"),
    (lambda m: m.update(dtype="bfloat16"), r"dtype is 'bfloat16'; this pack reads \['float16', 'float32'\]"),
    (lambda m: m["indexes"]["2"].update(ntotal=2**50), r"indexes.2.ntotal must be an integer in"),
    (lambda m: m["indexes"]["2"].update(ntotal=10**30), r"holds an integer of 31 digits, beyond 64 bits"),
    (lambda m: m["indexes"]["2"].update(structure="hnsw"), r"indexes.2 has type 'flat' and structure 'hnsw'"),
    (lambda m: m["indexes"]["4"].update(reduce=3), r"indexes.4.reduce is 3, which does not divide"),
    (lambda m: m["indexes"].pop("6"), r"indexes lists steps \['2', '4'\], the settings store steps \[2, 4, 6\]"),
    (lambda m: m["settings"].update(steps="10"), r"settings are invalid.*steps must be an int"),
    (lambda m: m["settings"].update(sigmas=[1.0]), r"settings are invalid.*sigmas must list"),
    (lambda m: m["calibration"].update({"3": {"h": 1}}), r"calibration has a result for '3', which is not a stored step"),
    (lambda m: m.update(surprise=1), r"unknown fields \['surprise'\]"),
    (lambda m: m["stats"].update(file=m["shards"][0]["file"]), r"stats.file names 'shards/"),
    (lambda m: m["shards"].append(dict(m["shards"][0])) or m.update(count=m["count"] * 2), r"names one file twice"),
    (lambda m: m.update(generation=0), r"generation must be an integer in \[1,"),
])
def test_forged_manifest_fields_are_refused_with_the_field_named(kbdir, edit, words):
    m = manifest_of(kbdir)
    edit(m)
    write_manifest(kbdir, m)  # re-signed: only the field checks can refuse it
    with pytest.raises(KBError, match=words):
        KnowledgeBase.open(kbdir)


@pytest.mark.parametrize("text, words", [
    ('{"format_version": 2, "count": 1e999}', r"holds the number 1e999, beyond the float range"),
    ('{"format_version": 2, "count": NaN}', r"holds the non-number NaN"),
    ('{"format_version": 2, "count": 123456789012345678901234567890}', r"integer of 30 digits"),
    ('{"format_version": 2, "format_version": 1}', r"repeats the key 'format_version'"),
    ("[" * 100_000 + "]" * 100_000, r"nests its JSON too deeply"),
    ('{"a":' * 40 + "1" + "}" * 40, r"nests its JSON 40 levels deep"),
    ("\xff\xfe not utf-8", r"is not valid JSON|not UTF-8"),
    ("", r"is not valid JSON"),
    ("[]", r"has no format_version: it is not a KB manifest"),
    ('{"format_version": "2"}', r"unknown format version '2'"),
])
def test_malformed_manifest_json_is_refused(kbdir, text, words):
    (kbdir / "manifest.json").write_bytes(text.encode("latin-1") if text.startswith("\xff") else text.encode())
    with pytest.raises(KBError, match=words):
        KnowledgeBase.open(kbdir)


# --------------------------------------------------------------------------- entries and safetensors files


def test_null_prompt_in_an_entries_file_is_refused(kbdir):
    rel = manifest_of(kbdir)["shards"][0]["entries_file"]
    entries = json.loads(Path(kb_file(kbdir, rel)).read_text())
    entries[2]["prompt"] = None  # once silently read back as the string "None"
    replace_file_signed(kbdir, rel, json.dumps(entries).encode())
    with pytest.raises(KBError, match=r"entries.json: entry 2 is \{'prompt': None, 'seed': 0\}; each entry must be"):
        KnowledgeBase.open(kbdir)


@pytest.mark.parametrize("entries, words", [
    ([{"prompt": "a", "seed": 1.5}] * 6, r"entry 0 is .*64-bit integer"),
    ([{"prompt": "a", "seed": 2**70}] * 6, r"entry 0 is"),
    ([{"prompt": "a", "seed": 1, "extra": 1}] * 6, r"entry 0 is"),
    ([["a", 1]] * 6, r"entry 0 is \['a', 1\]"),
    ([{"prompt": "a", "seed": 1}] * 5, r"holds 5 entries; the manifest records 6"),
    ({"prompt": "a"}, r"holds an object; the manifest records 6"),
])
def test_forged_entries_are_refused(kbdir, entries, words):
    rel = manifest_of(kbdir)["shards"][0]["entries_file"]
    replace_file_signed(kbdir, rel, json.dumps(entries).encode())
    with pytest.raises(KBError, match=words):
        KnowledgeBase.open(kbdir)


def _shard_header_edit(kbdir, edit):
    rel = manifest_of(kbdir)["shards"][0]["file"]
    tensors = {k: v.copy() for k, v in tensors_from_bytes(Path(kb_file(kbdir, rel)).read_bytes(), rel, "").items()}
    replace_file_signed(kbdir, rel, forge_safetensors(tensors, edit))


@pytest.mark.parametrize("edit, words", [
    # an element count that wraps around 64 bits: 2**32 * 2**32 * 4 bytes
    (lambda h: h["step_002"].update(shape=[2**32, 2**32, 1, 1]), r"spans \d+ bytes, its shape .* needs"),
    (lambda h: h["step_002"].update(shape=[0, 4, 8, 8]), r"spans \d+ bytes, its shape \[0, 4, 8, 8\] needs 0"),
    (lambda h: h["step_002"].update(shape=[6, 4, 8, -8]), r"has shape .*non-negative integers"),
    (lambda h: h["step_002"].update(shape=[6.0, 4, 8, 8]), r"has shape"),
    (lambda h: h["step_002"].update(dtype="BF16"), r"dtype 'BF16'; a KB writes only"),
    (lambda h: h["step_002"].update(data_offsets=[0, 2**70]), r"beyond 64 bits"),
    (lambda h: h["step_002"].update(data_offsets=[0, 2**62 - 1]), r"outside the \d+-byte data"),
    (lambda h: h["step_002"].update(data_offsets=h["step_004"]["data_offsets"]), r"overlap or leave holes"),
    (lambda h: h.update(__metadata__={"a": 1}), r"__metadata__ is not a map of strings"),
    (lambda h: h.update(step_003=h.pop("step_002")), r"holds tensors .*step_003.*expected"),
    (lambda h: h["step_002"].update(extra=1), r"malformed entry"),
])
def test_forged_safetensors_headers_are_refused(kbdir, edit, words):
    _shard_header_edit(kbdir, edit)
    with pytest.raises(KBError, match=words):
        KnowledgeBase.open(kbdir, verify="size")


def test_truncated_and_overlong_header_lengths(kbdir):
    rel = manifest_of(kbdir)["shards"][0]["file"]
    data = Path(kb_file(kbdir, rel)).read_bytes()
    for forged in (b"\x01\x02" + bytes(6), (2**63).to_bytes(8, "little") + data[8:], (len(data)).to_bytes(8, "little") + data[8:]):
        replace_file_signed(kbdir, rel, forged)
        with pytest.raises(KBError, match=r"not a valid safetensors file.*(shorter than|does not fit)"):
            KnowledgeBase.open(kbdir, verify="size")


def test_forged_stats_are_refused_and_repairable(kbdir):
    rel = manifest_of(kbdir)["stats"]["file"]
    t = {k: v.copy() for k, v in tensors_from_bytes(Path(kb_file(kbdir, rel)).read_bytes(), rel, "").items()}
    t["sum_004"][3] = np.nan
    replace_file_signed(kbdir, rel, forge_safetensors(t))
    with pytest.raises(KBError, match=r"sum_004 float64 \[256\], expected finite float64.*rebuild_indexes"):
        KnowledgeBase.open(kbdir)
    kb = KnowledgeBase.open(kbdir, verify="size")
    assert any("sum_004" in p for p in kb.verify())
    kb.rebuild_indexes()
    assert KnowledgeBase.open(kbdir, verify="full").verify() == []


# --------------------------------------------------------------------------- names and paths


@pytest.mark.parametrize("path, words", [
    ("x" * 300, r"folder name of 300 bytes.*allow 255"),
    ("kb\0name", r"contains a NUL byte"),
    ("", r"is empty"),
    (12, r"must be a string or path, got int"),
])
def test_bad_kb_paths(tmp_path, path, words):
    full = path if not isinstance(path, str) or not path else os.path.join(tmp_path, path)
    for call in (lambda: KnowledgeBase.open(full), lambda: KnowledgeBase.create(full, toy_settings()),
                 lambda: open_or_create(full, toy_settings()), lambda: merge(full, [tmp_path / "nowhere"])):
        with pytest.raises(KBError, match=words if "nowhere" not in words else "."):
            call()


@pytest.mark.parametrize("name", ["x" * 256, "a/b", "..", "kb\0", " kb", "a:b", "", "con?"])
def test_check_kb_name_refuses_what_is_not_a_plain_folder_name(name):
    with pytest.raises(KBError, match=r"plain folder name such as 'coco-euler-20'"):
        check_kb_name(name)


def test_check_kb_name_accepts_plain_names():
    assert check_kb_name("coco-euler-20") == "coco-euler-20" and check_kb_name("ünï cödé kb") == "ünï cödé kb"


# --------------------------------------------------------------------------- query-side parameters


def test_query_parameters_name_value_and_fix(kbdir):
    kb = KnowledgeBase.open(kbdir)
    q = kb.latents(2, [0])
    cases = [
        (lambda: kb.search(2, q, 0), r"h \(number of neighbours\) must be an int >= 1, got 0. Use H between 1 and 6"),
        (lambda: kb.search(2, q, 2.0), r"must be an int >= 1, got 2.0"),
        (lambda: kb.search(None, q, 1), r"the step must be an integer step index, got None. Use one of the stored steps \[2, 4, 6\]"),
        (lambda: kb.search(2, q, 1, candidates="many"), r"candidates must be an int >= 1, or None for max\(4H, 32\); got 'many'"),
        (lambda: kb.search(2, np.zeros((0, *LATENT_SHAPE), np.float32), 1), r"query batch is empty. Pass at least one latent"),
        (lambda: kb.search(2, [np.zeros(LATENT_SHAPE), np.zeros((4, 8))], 1), r"numpy cannot stack.*Stack the latents"),
        (lambda: kb.search(2, "a latent", 1), r"not a floating-point type"),
        (lambda: kb.search(2, q * 1e30, 1), r"overflows float32.*order 1 to 100"),
        (lambda: kb.latents(2, [1.5]), r"ids must be a 1-D sequence of ints"),
        (lambda: kb.latents(2, [[0, 1]]), r"ids must be a 1-D sequence of ints"),
        (lambda: kb.key_spread(2, sample=2.5), r"sample must be an integer >= 1, got 2.5"),
        (lambda: kb.set_search_params(nprobe=0), r"nprobe must be a positive int or None"),
        (lambda: kb.set_calibration(2, {"x": float("nan")}), r"JSON-serialisable dict of finite numbers"),
        (lambda: kb.set_calibration(2, [1]), r"calibration must be a dict"),
        (lambda: KnowledgeBase.open(kbdir, verify="fast"), r"verify='fast' is unknown; use one of"),
        (lambda: KnowledgeBase.create(kbdir.parent / "n", toy_settings(), index_type="lsh"), r"index_type 'lsh' is unknown; use one of \['auto'"),
        (lambda: KnowledgeBase.create(kbdir.parent / "n", toy_settings(), reduce=3), r"reduce=3 does not divide"),
    ]
    for call, words in cases:
        with pytest.raises(KBError, match=words):
            call()
    near = retrieval.nearest_keys(kb, kb.as_queries(q), 2, 2)
    for call, words in [
        (lambda: retrieval.blend_entries(kb, near.ids, np.ones((1, 2)), None), r"value step must be an integer step index, got None"),
        (lambda: retrieval.blend_entries(kb, near.ids, np.ones((1, 2)), 4.0), r"value step must be an integer step index, got 4.0"),
        (lambda: retrieval.blend_entries(kb, near.ids, np.ones((1, 2)), 5), r"has no value step 5; it stores steps \[2, 4, 6\]"),
        (lambda: retrieval.fit_weights(kb.as_queries(q), near.keys, 1.0, mode="ridge", ridge="a"), r"ridge must be a finite number >= 0, got 'a'. Pass e.g."),
        (lambda: retrieval.calibrate(kb, 2, 2, sample=2.5), r"sample must be an integer >= 1, got 2.5"),
        (lambda: retrieval.calibrate(kb, 2, None), r"H \(neighbours\) must be an integer >= 1, got None"),
    ]:
        with pytest.raises(KBError, match=words):
            call()
