"""KB integrity: forged version-1 downgrades, values no KB can hold, full verify, repair from the shards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import faiss
import numpy as np
import pytest
import safetensors.numpy
from kb_crash_helper import kb_file, manifest_of, replace_file_signed, toy_latents, toy_settings, write_manifest

from kb_tools.core.errors import KBError
from kb_tools.store import KnowledgeBase, repair
from kb_tools.store import index as ix
from kb_tools.store.integrity import bad_rows
from kb_tools.store.verify import OWN_ID_SAMPLE

PACK = Path(__file__).resolve().parent.parent
FIXTURE_V1 = Path(__file__).resolve().parent / "fixtures" / "kb_v1"
V1_REFUSAL = "not checksummed"


def build(root: Path, shards: int = 3, per: int = 8, index_type: str = "flat") -> KnowledgeBase:
    kb = KnowledgeBase.create(root, toy_settings(), dtype="float32", index_type=index_type)
    for c in range(shards):
        ps = [(f"thing {c * per + i}", c) for i in range(per)]
        kb.append(toy_latents(ps), [p for p, _ in ps], [s for _, s in ps])
    kb.set_calibration(2, {"h": 2, "centered_p95": 0.5})
    return kb


def downgrade(root: Path, rename_files: bool = True, drop_structure: bool = True, drop_checksum: bool = True) -> None:
    """The forgery of the issue: format_version 1, checksum deleted, index records renamed as version 1 had them."""
    m = manifest_of(root)
    m["format_version"] = 1
    if drop_checksum:
        m.pop("checksum", None)
    for rec in m["indexes"].values():
        if drop_structure:
            rec.pop("structure", None)
        new = rec["file"].replace(".safetensors", ".faiss")
        if rename_files:
            os.rename(kb_file(root, rec["file"]), kb_file(root, new))
        rec["file"] = new
    write_manifest(root, m, sign=False)


def edit_manifest(root: Path, fn) -> None:
    m = manifest_of(root)
    fn(m)
    write_manifest(root, m, sign=False)


def shard_tensors(root: Path, i: int = 0) -> tuple[str, dict]:
    rel = manifest_of(root)["shards"][i]["file"]
    return rel, dict(safetensors.numpy.load(Path(kb_file(root, rel)).read_bytes()))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".writer.lock"}


# --------------------------------------------------------------------------- forged version-1 downgrades

EDITS = {
    "sampler": lambda m: m["settings"].update(sampler="heun"),
    "shard order": lambda m: m.update(shards=m["shards"][::-1]),
    "calibration": lambda m: m["calibration"].update({"2": {"h": 9, "centered_p95": 5.0}}),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
@pytest.mark.parametrize("rename_files", [True, False])
def test_a_hand_edit_relabelled_as_version_1_is_refused(tmp_path, edit, rename_files):
    root = tmp_path / "kb"
    build(root)
    edit_manifest(root, EDITS[edit])
    downgrade(root, rename_files=rename_files)
    for verify in ("size", "auto", "full"):
        with pytest.raises(KBError, match=V1_REFUSAL):
            KnowledgeBase.open(root, verify=verify)
    with pytest.raises(KBError, match=V1_REFUSAL):
        repair(root)


@pytest.mark.parametrize("forge, why", [
    (lambda m: m["indexes"]["2"].update(structure="flat"), "indexes.2 has the fields"),
    (lambda m: [r.update(type="auto") for r in m["indexes"].values()], "type is 'auto'"),
    (lambda m: m["indexes"]["2"].update(nlist=2), "nlist is 2"),
    (lambda m: m.update(checksum="0" * 64), "has a \"checksum\""),
    (lambda m: m["settings"].update(negative_prompt="caf\u00e9"), "outside ASCII"),
    (lambda m: m.update(generation=1), "generation after the manifest"),
    (lambda m: m["stats"].update(file="stats-000002-0000abcd.safetensors"), "different tags"),
])
def test_what_version_1_never_wrote_is_refused(tmp_path, forge, why):
    root = tmp_path / "kb"
    shutil.copytree(FIXTURE_V1, root)
    edit_manifest(root, forge)
    with pytest.raises(KBError, match=V1_REFUSAL) as e:
        KnowledgeBase.open(root, verify="size")
    assert why in str(e.value) and "manifest.json" in str(e.value) and "python -m kb_tools upgrade" in str(e.value)


def test_version_1_index_files_must_be_faiss_files(tmp_path):
    root = tmp_path / "kb"
    shutil.copytree(FIXTURE_V1, root)
    rel = manifest_of(root)["indexes"]["2"]["file"]
    data = Path(kb_file(root, rel)).read_bytes()
    Path(kb_file(root, rel)).write_bytes(b"XXXX" + data[4:])
    with pytest.raises(KBError, match=f"{rel}.*not a FAISS flat index"):
        KnowledgeBase.open(root, verify="size")
    Path(kb_file(root, rel)).write_bytes(data[:-1] + b"\0")  # same header, other bytes: the sha256 shows
    kb = KnowledgeBase.open(root, verify="size")
    assert any(rel in p and "sha256" in p for p in kb.verify())
    with pytest.raises(KBError, match="sha256"):
        kb.rebuild_indexes()  # the upgrade signs the manifest: only a genuine version-1 KB gets signed


def test_real_version_1_kbs_still_open_verify_and_upgrade(tmp_path):
    for i, how in enumerate(("repair", "rebuild", "cli")):
        root = tmp_path / f"kb{i}"
        shutil.copytree(FIXTURE_V1, root)
        kb = KnowledgeBase.open(root, verify="full")
        assert kb.verify() == [] and kb.verify(full=True) == [] and kb.info()["format_version"] == 1
        if how == "repair":
            kb = repair(root)
        elif how == "rebuild":
            kb.rebuild_indexes()
        else:
            out = subprocess.run([sys.executable, "-m", "kb_tools", "upgrade", str(root)], cwd=PACK, capture_output=True,
                                 text=True, timeout=1800)
            assert out.returncode == 0, out.stderr
        kb = KnowledgeBase.open(root, verify="full")
        assert kb.info()["format_version"] == 2 and kb.verify(full=True) == [] and len(kb) == 10


# --------------------------------------------------------------------------- values no KB can hold


@pytest.mark.parametrize("forge, match", [
    (lambda m: m["settings"].update(sigmas=m["settings"]["sigmas"][:3][::-1] + m["settings"]["sigmas"][3:]),
     "sigmas increase"),
    (lambda m: m["settings"].update(sampler="x" * 10_000), "not a ComfyUI sampler name"),
    (lambda m: m["settings"].update(scheduler="Karras!"), "not a ComfyUI scheduler name"),
    (lambda m: m["settings"].update(negative_prompt="\ud800"), "not valid Unicode"),
    (lambda m: m["calibration"]["2"].update(note="\udc80"), "not valid Unicode"),
])
def test_settings_no_kb_can_hold_are_refused_at_open(tmp_path, forge, match):
    root = tmp_path / "kb"
    build(root, shards=1)
    m = manifest_of(root)
    forge(m)
    try:
        write_manifest(root, m)  # re-signed: only the value checks can refuse it
    except UnicodeEncodeError:  # a lone surrogate cannot be signed: written as a JSON escape, checked before the checksum
        Path(kb_file(root, "manifest.json")).write_text(json.dumps(m))
    with pytest.raises(KBError, match=match) as e:
        KnowledgeBase.open(root, verify="size")
    assert "manifest.json" in str(e.value)


def test_nan_in_the_manifest_or_stats_is_refused(tmp_path):
    root = tmp_path / "kb"
    build(root, shards=1)
    text = Path(kb_file(root, "manifest.json")).read_text().replace('"cfg": 7.0', '"cfg": NaN')
    Path(kb_file(root, "manifest.json")).write_text(text)
    with pytest.raises(KBError, match="manifest.json"):
        KnowledgeBase.open(root, verify="size")
    root = tmp_path / "kb2"
    build(root, shards=1)
    rel = manifest_of(root)["stats"]["file"]
    sums = dict(safetensors.numpy.load(Path(kb_file(root, rel)).read_bytes()))
    sums["sum_004"][3] = np.inf
    replace_file_signed(root, rel, safetensors.numpy.save(sums))
    with pytest.raises(KBError, match=f"{rel}.*finite"):
        KnowledgeBase.open(root)


@pytest.mark.parametrize("prompt, match", [("\ud83d", "not valid Unicode"), ("p" * (2 * 2**20), "more than the 65536")])
def test_prompts_no_kb_can_hold_are_refused(tmp_path, prompt, match):
    root = tmp_path / "kb"
    kb = build(root, shards=1)
    with pytest.raises(KBError, match=match):
        kb.append(toy_latents([("x", 0)]), [prompt], [0])
    rel = manifest_of(root)["shards"][0]["entries_file"]
    entries = json.loads(Path(kb_file(root, rel)).read_text())
    entries[5]["prompt"] = prompt
    replace_file_signed(root, rel, json.dumps(entries).encode())  # ensure_ascii: the lone surrogate as an escape
    with pytest.raises(KBError, match=f"entry 5's prompt .*{match}") as e:
        KnowledgeBase.open(root, verify="size")
    assert rel in str(e.value)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_bad_rows_reads_float16_chunks_without_an_overflow_warning(dtype):
    chunk = np.zeros((4, 2, 3), dtype)
    chunk[1, 0, 0], chunk[3, 1, 2] = np.inf, np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # casting the 1e6 bound to float16 warned once per chunk in every benchmark log
        assert bad_rows(chunk).tolist() == [1, 3]
    if dtype is np.float32:
        chunk[2, 0, 1] = 2e6
        assert bad_rows(chunk).tolist() == [1, 2, 3]


@pytest.mark.parametrize("value", [1e17, np.nan, -np.inf])
def test_stored_latents_no_kb_can_hold_are_reported_and_never_indexed(tmp_path, value):
    root = tmp_path / "kb"
    kb = build(root, shards=2)
    with pytest.raises(KBError, match="beyond|NaN"):
        kb.append({s: np.where(np.arange(256).reshape(1, 4, 8, 8) == 7, value, a).astype(np.float32)
                   for s, a in toy_latents([("x", 0)]).items()}, ["x"], [0])
    rel, t = shard_tensors(root, 1)
    t["step_004"][3, 1, 2, 3] = value
    replace_file_signed(root, rel, safetensors.numpy.save(t))  # as if a writer had stored it
    kb = KnowledgeBase.open(root, verify="size")
    assert any(rel in p and "entry 3" in p and "'thing 11'" in p for p in kb.verify())
    before = snapshot(root)
    for fix in (lambda: repair(root), kb.rebuild_indexes):
        with pytest.raises(KBError, match=f"{rel} row 3 \\(step 4, prompt 'thing 11', seed 1\\)") as e:
            fix()
        assert "nothing was committed" in str(e.value) and "rebuild the KB without them" in str(e.value)
        assert snapshot(root) == before


def test_a_sampler_unknown_to_comfyui_is_refused_where_samplers_run(tmp_path, comfy_root):
    from kb_tools.samplers.entry import check_known_recipe, check_recipe

    kb = KnowledgeBase.create(tmp_path / "kb", toy_settings(sampler="not_a_comfy_sampler"), dtype="float32")
    for check in (check_known_recipe, check_recipe):
        with pytest.raises(KBError, match="sampler 'not_a_comfy_sampler', which this ComfyUI does not know"):
            check(kb)
    check_known_recipe(KnowledgeBase.create(tmp_path / "ok", toy_settings(), dtype="float32"))


# --------------------------------------------------------------------------- full verify


def outside_sample(n: int) -> list[int]:
    sample = set(np.unique(np.linspace(0, n - 1, num=min(OWN_ID_SAMPLE, n)).astype(np.int64)).tolist())
    return [i for i in range(n) if i not in sample]


@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_full_verify_finds_index_keys_shuffled_outside_the_sample(tmp_path, index_type):
    root = tmp_path / "kb"
    kb = build(root, index_type=index_type)
    n, (a, b) = len(kb), outside_sample(len(kb))[:2]
    keys = ix.reduce_keys(kb.latents(4, np.arange(n)), kb.reduce)
    keys[[a, b]] = keys[[b, a]]
    index = ix.empty(index_type, keys.shape[1])
    index.add(keys)
    replace_file_signed(root, manifest_of(root)["indexes"]["4"]["file"], ix.encode(index))
    kb = KnowledgeBase.open(root, verify="full")
    assert kb.verify() == []
    problems = kb.verify(full=True)
    assert len(problems) == 1 and f"entry {min(a, b)}" in problems[0] and "step 4" in problems[0]


def test_full_verify_finds_swapped_shard_rows(tmp_path):
    root = tmp_path / "kb"
    build(root)
    a, b = [i - 8 for i in outside_sample(24) if 8 <= i < 16][:2]
    rel, t = shard_tensors(root, 1)
    for name in t:
        t[name][[a, b]] = t[name][[b, a]]
    replace_file_signed(root, rel, safetensors.numpy.save(t))
    kb = KnowledgeBase.open(root, verify="full")
    assert kb.verify() == []
    problems = kb.verify(full=True)
    assert len(problems) == 3 and all(f"entry {8 + min(a, b)}" in p for p in problems)
    with pytest.raises(KBError, match="full must be True or False"):
        kb.verify(full="yes")


# --------------------------------------------------------------------------- repair


@pytest.mark.parametrize("which", ["index", "stats"])
def test_repair_rebuilds_a_truncated_index_or_stats_file(tmp_path, which):
    root = tmp_path / "kb"
    kb = build(root)
    want = kb.search(4, kb.latents(4, [5, 17]), 2)
    m = manifest_of(root)
    rel = m["indexes"]["4"]["file"] if which == "index" else m["stats"]["file"]
    with open(kb_file(root, rel), "r+b") as f:
        f.truncate(os.path.getsize(kb_file(root, rel)) // 2)
    with pytest.raises(KBError, match="truncated"):
        KnowledgeBase.open(root)
    kb = repair(root)
    assert kb.generation == m["generation"] + 1 and kb.verify(full=True) == []
    kb = KnowledgeBase.open(root, verify="full")
    assert kb.verify(full=True) == [] and all((x == y).all() for x, y in zip(kb.search(4, kb.latents(4, [5, 17]), 2), want))


def test_repair_refuses_damaged_shards_and_missing_kbs(tmp_path):
    root = tmp_path / "kb"
    build(root, shards=1)
    rel = manifest_of(root)["shards"][0]["file"]
    data = bytearray(Path(kb_file(root, rel)).read_bytes())
    data[-1] ^= 1
    Path(kb_file(root, rel)).write_bytes(bytes(data))
    with pytest.raises(KBError, match=f"{rel}.*sha256"):
        repair(root)
    with pytest.raises(KBError, match="does not exist"):
        repair(tmp_path / "nowhere")


def test_cli_verify_is_full_by_default_and_repair_repairs(tmp_path):
    root = tmp_path / "kb"
    kb = build(root)
    n, (a, b) = len(kb), outside_sample(len(kb))[:2]
    keys = ix.reduce_keys(kb.latents(2, np.arange(n)), kb.reduce)
    keys[[a, b]] = keys[[b, a]]
    index = faiss.IndexFlatL2(keys.shape[1])
    index.add(keys)
    replace_file_signed(root, manifest_of(root)["indexes"]["2"]["file"], ix.encode(index))

    def run(*argv):
        return subprocess.run([sys.executable, "-m", "kb_tools", *argv], cwd=PACK, capture_output=True, text=True,
                              timeout=1800)

    out = run("verify", str(root))
    assert out.returncode == 1 and "PROBLEM: index of step 2" in out.stdout and "kb_tools repair" in out.stdout
    assert run("verify", "--sample", str(root)).returncode == 0
    out = run("repair", str(root))
    assert out.returncode == 0 and "repaired" in out.stdout, out.stderr
    out = run("verify", str(root))
    assert out.returncode == 0 and "every entry found by each index as itself" in out.stdout
    rel, t = shard_tensors(root, 0)
    t["step_002"][1, 0, 0, 0] = np.nan
    replace_file_signed(root, rel, safetensors.numpy.save(t))
    out = run("repair", str(root))
    assert out.returncode == 2 and f"{rel} row 1" in out.stderr and "Traceback" not in out.stderr
