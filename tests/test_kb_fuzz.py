"""Property-based fuzzing of every kind of KB file (hypothesis, real files on disk).

Each example copies a small pristine KB, damages or forges one of its files, then opens it,
searches, reads and verifies it. Properties:
- nothing but KBError ever escapes (no KeyError, OverflowError, RecursionError, crash...);
- damage (truncation, byte flips, garbage; checksums left as they were): opening with
  verify="full" raises KBError or the KB answers exactly as before; with verify="size" the KB
  may open, but then it answers exactly as before or verify() reports a problem; a damaged
  index or stats file is repaired by rebuild_indexes();
- forgery (headers, manifest fields, entries, index arrays, with every checksum re-signed):
  each operation raises KBError or returns well-formed results (shapes, dtypes, ids inside the
  KB, finite sorted distances); a forged index (the KBs hold 12 entries, so every entry is a
  re-rank candidate) never changes a search result.
Runs are derandomized (the seed is fixed per test, so CI is reproducible); on a failure
hypothesis prints the falsifying example, the notes below name the mutation, and
print_blob gives the @reproduce_failure line.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import faiss
import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from kb_crash_helper import (
    STORED_STEPS, forge_safetensors, kb_file, manifest_of, replace_file_signed, toy_latents, toy_settings, write_manifest,
)

from kb_tools.core.errors import KBError
from kb_tools.store import KnowledgeBase
from kb_tools.store import index as ix
from kb_tools.store.safetensors_file import tensors_from_bytes

faiss.omp_set_num_threads(1)  # the test machine's cores are shared
H = 2
QUERIES = {s: toy_latents([("a fuzz query", 1), ("another one", 0)])[s] for s in STORED_STEPS}
COUNTS: dict[str, int] = {}
OUTCOMES: dict[str, dict[str, int]] = {}  # per file kind: refused (a KBError somewhere) / answered


def fuzz_settings(n: int) -> settings:
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


# --------------------------------------------------------------------------- pristine KBs


def _build(root: Path, index_type: str, dtype: str) -> None:
    kb = KnowledgeBase.create(root, toy_settings(), dtype=dtype, index_type=index_type)
    for c in range(2):
        ps = [(f"thing {c * 6 + i}", i % 2) for i in range(6)]
        kb.append(toy_latents(ps), [p for p, _ in ps], [s for _, s in ps])
    kb.set_calibration(4, {"h": 2, "centered_p95": 0.25})


def _make_ivf(root: Path) -> None:
    """Turn a flat KB's step-4 index into a consistent 2-list IVF (tiny KBs never train one by themselves)."""
    m = manifest_of(root)
    for rec in m["indexes"].values():
        rec["type"] = "ivf"
    write_manifest(root, m)
    kb = KnowledgeBase.open(root)
    keys = ix.reduce_keys(kb.latents(4, np.arange(len(kb))), kb.reduce)
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(keys.shape[1]), keys.shape[1], 2)
    ivf.train(keys)
    ivf.add(keys)
    rel = m["indexes"]["4"]["file"]
    m = manifest_of(root)
    m["indexes"]["4"].update(structure="ivf", nlist=2)
    write_manifest(root, m)
    replace_file_signed(root, rel, ix.encode(ivf))


class Pristine(dict):
    """{name: (folder, what it answers)}; a short repr keeps hypothesis' reports readable."""

    def __repr__(self) -> str:
        return f"Pristine({sorted(self)})"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A flat float32, an HNSW float16 and an IVF KB, each with what it answers."""
    base = tmp_path_factory.mktemp("pristine")
    out = Pristine()
    for name, index_type, dtype in (("flat", "flat", "float32"), ("hnsw", "hnsw", "float16"), ("ivf", "flat", "float32")):
        _build(base / name, index_type, dtype)
        if name == "ivf":
            _make_ivf(base / name)
        answers = observe(base / name, "full")
        assert "open" not in answers and answers["verify"] == [], answers
        out[name] = (base / name, answers)
    yield out
    print("\nfuzz cases per file kind:", json.dumps(COUNTS, sort_keys=True), "total", sum(COUNTS.values()))
    print("outcomes:", json.dumps(OUTCOMES, sort_keys=True))


# --------------------------------------------------------------------------- observing a KB


def _well_formed_search(kb: KnowledgeBase, result) -> None:
    ids, dist = result
    assert ids.dtype == np.int64 and dist.dtype == np.float32 and ids.shape == dist.shape == (2, H)
    assert ((ids >= 0) & (ids < len(kb))).all() and np.isfinite(dist).all() and (dist >= 0).all()
    assert (np.diff(dist, axis=1) >= 0).all()


def observe(root: Path, verify: str) -> dict:
    """What the KB answers, operation by operation: a value, or ("KBError", message). Anything else raises."""
    try:
        kb = KnowledgeBase.open(root, verify=verify)
    except KBError as e:
        return {"open": ("KBError", str(e))}
    out: dict = {"entries": kb.entries, "steps": kb.stored_steps, "shape": kb.latent_shape}
    assert len(kb.entries) == len(kb) and all(isinstance(p, str) and isinstance(s, int) for p, s in kb.entries)
    for step in kb.stored_steps:
        for name, call, check in (
            ("search", lambda: kb.search(step, QUERIES.get(step, QUERIES[2]), H), lambda r: _well_formed_search(kb, r)),
            ("latents", lambda: kb.latents(step, np.arange(len(kb))), lambda r: r.shape == (len(kb), *kb.latent_shape)),
            ("mean", lambda: kb.mean_key(step), lambda r: r.dtype == np.float32),
            ("calibration", lambda: kb.calibration(step), lambda r: r is None or isinstance(r, dict)),
        ):
            try:
                value = call()
            except KBError as e:
                out[f"{name}{step}"] = ("KBError", str(e))
                continue
            assert check(value) is not False, (name, step, value)
            out[f"{name}{step}"] = value
    out["verify"] = kb.verify()
    assert isinstance(out["verify"], list) and all(isinstance(p, str) for p in out["verify"])
    return out


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape and np.array_equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _is_error(value) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) and value[0] == "KBError"


def answers_same(got: dict, want: dict, keys=None) -> bool:
    keys = [k for k in want if k != "verify"] if keys is None else keys
    return all(k in got and _same(got[k], want[k]) for k in keys)


class Case:
    """A fresh copy of a pristine KB for one example, removed afterwards."""

    def __init__(self, pristine: dict, name: str, kind: str):
        COUNTS[kind] = COUNTS.get(kind, 0) + 1
        self.kind = kind
        self.source, self.want = pristine[name]
        self.tmp = Path(tempfile.mkdtemp(prefix="kbfuzz-"))
        self.root = self.tmp / "kb"
        shutil.copytree(self.source, self.root)
        self.m = manifest_of(self.root)

    def __enter__(self) -> Case:
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def outcome(self, got: dict) -> dict:
        """Tally whether the KB refused (somewhere) or answered; returns `got`."""
        refused = "open" in got or any(_is_error(v) for v in got.values())
        tally = OUTCOMES.setdefault(self.kind, {"refused": 0, "answered": 0})
        tally["refused" if refused else "answered"] += 1
        return got

    def files(self, kind: str) -> list[str]:
        m = self.m
        return {"manifest": ["manifest.json"], "shard": [s["file"] for s in m["shards"]],
                "entries": [s["entries_file"] for s in m["shards"]], "index": [i["file"] for i in m["indexes"].values()],
                "stats": [m["stats"]["file"]]}[kind]

    def path(self, rel: str) -> Path:
        return Path(kb_file(self.root, rel))

    def tensors(self, draw, kind: str) -> tuple[str, dict[str, np.ndarray]]:
        """One file of `kind`, drawn, and a writable copy of its tensors."""
        rel = draw(st.sampled_from(self.files(kind)))
        return rel, {k: v.copy() for k, v in tensors_from_bytes(self.path(rel).read_bytes(), rel, "").items()}


# --------------------------------------------------------------------------- damage (checksums left alone)


KINDS = ["manifest", "shard", "entries", "index", "stats"]


def damage(data: bytes, draw) -> bytes:
    how = draw(st.sampled_from(["truncate", "flip", "flips", "garbage", "zero"]))
    n = len(data)
    if how == "truncate":
        return data[:draw(st.integers(0, n - 1))]
    if how == "garbage":
        return data + draw(st.binary(min_size=1, max_size=64))
    if how == "zero":
        a = draw(st.integers(0, n - 1))
        return data[:a] + bytes(min(n - a, draw(st.integers(1, 64)))) + data[a + 64:][: max(0, n - a - 64)]
    out = bytearray(data)
    for _ in range(1 if how == "flip" else draw(st.integers(2, 8))):
        out[draw(st.integers(0, n - 1))] ^= draw(st.integers(1, 255))
    return bytes(out)


@pytest.mark.parametrize("kind", KINDS)
@fuzz_settings(45)
@given(data=st.data())
def test_damaged_files_raise_kberror_or_answer_as_before(pristine, kind, data):
    name = data.draw(st.sampled_from(["flat", "hnsw", "ivf"]))
    with Case(pristine, name, f"damage {kind}") as c:
        rel = data.draw(st.sampled_from(c.files(kind)))
        before = c.path(rel).read_bytes()
        after = damage(before, data.draw)
        note(f"{name} KB: {rel} damaged, {len(before)} -> {len(after)} bytes")
        c.path(rel).write_bytes(after)
        full = c.outcome(observe(c.root, "full"))
        assert "open" in full or answers_same(full, c.want), "verify='full' opened a damaged KB and answers differently"
        size = observe(c.root, "size")
        if "open" not in size and not answers_same(size, c.want):
            assert size["verify"], "the KB answers differently but verify() sees no problem"
        if "open" not in size and kind in ("index", "stats"):
            KnowledgeBase.open(c.root, verify="size").rebuild_indexes()  # derived data: repairable
            assert answers_same(observe(c.root, "full"), c.want, keys=[k for k in c.want if k.startswith("search")])


# --------------------------------------------------------------------------- forgeries (every checksum re-signed)


JSON_LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.sampled_from([0, 1, -1, 2**31, 2**53, 2**63, 2**64 - 1]),
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([1e308, -1e308, 0.5, 1e-320]),
    st.text(max_size=20), st.sampled_from(["../x", "/etc/passwd", "shards/00000-00000000.safetensors", "flat", "hnsw",
                                           "ivf", "auto", "float16", "F16", "I64", "step_002", "sum_002", "..", ""]),
)
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=8)


def _paths(value, prefix=()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


def _edit_json(value, draw):
    """One structural or value edit anywhere in a JSON document (in place; returns the document)."""
    path = draw(st.sampled_from([p for p in _paths(value) if p]))
    parent = value
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    how = draw(st.sampled_from(["replace", "replace", "delete", "add", "duplicate"]))
    if how == "replace":
        parent[key] = draw(JSON_VALUES)
    elif how == "delete":
        del parent[key]
    elif how == "add" and isinstance(parent, dict):
        parent[draw(st.text(max_size=8))] = draw(JSON_VALUES)
    elif isinstance(parent, list):
        parent.append(parent[key])
    else:
        parent[key] = [parent[key], parent[key]]
    return value


@fuzz_settings(130)
@given(data=st.data())
def test_forged_manifest_fields(pristine, data):
    name = data.draw(st.sampled_from(["flat", "hnsw", "ivf"]))
    with Case(pristine, name, "forged manifest") as c:
        m = _edit_json(c.m, data.draw)
        note(f"{name} KB, forged manifest: {json.dumps(m)[:3000]}")
        write_manifest(c.root, m)
        c.outcome(observe(c.root, "full"))  # KBError or well-formed answers; nothing else escapes
        observe(c.root, "size")


@fuzz_settings(70)
@given(data=st.data())
def test_forged_entries(pristine, data):
    name = data.draw(st.sampled_from(["flat", "hnsw"]))
    with Case(pristine, name, "forged entries") as c:
        rel = data.draw(st.sampled_from(c.files("entries")))
        entries = json.loads(c.path(rel).read_text())
        forged = _edit_json(entries, data.draw) if data.draw(st.booleans()) else data.draw(JSON_VALUES)
        note(f"{name} KB, {rel} forged as {json.dumps(forged)[:2000]}")
        replace_file_signed(c.root, rel, json.dumps(forged).encode())
        got = c.outcome(observe(c.root, "full"))
        if "open" not in got:  # the entries really were valid; then only they may differ
            assert answers_same(got, c.want, keys=[k for k in c.want if k.startswith(("search", "latents"))])


def _header_edit(draw):
    def edit(header: dict) -> dict:
        return _edit_json(header, draw)
    return edit


@pytest.mark.parametrize("kind", ["shard", "index", "stats"])
@fuzz_settings(45)
@given(data=st.data())
def test_forged_safetensors_headers(pristine, kind, data):
    name = data.draw(st.sampled_from(["flat", "hnsw", "ivf"]))
    with Case(pristine, name, f"forged {kind} header") as c:
        rel, tensors = c.tensors(data.draw, kind)
        forged = forge_safetensors(tensors, _header_edit(data.draw))
        note(f"{name} KB, {rel} with header {forged[8:8 + int.from_bytes(forged[:8], 'little')][:2000]!r}")
        replace_file_signed(c.root, rel, forged)
        c.outcome(observe(c.root, "full"))
        observe(c.root, "size")


def _forge_array(a: np.ndarray, draw) -> np.ndarray:
    how = draw(st.sampled_from(["element", "element", "elements", "shrink", "grow", "retype"]))
    if how == "shrink" and a.ndim and a.shape[0]:
        return a[: draw(st.integers(0, a.shape[0] - 1))].copy()
    if how == "grow" and a.ndim:
        return np.concatenate([a, a[:1]]) if a.shape[0] else a
    if how == "retype":
        return a.astype(draw(st.sampled_from([np.float32, np.float64, np.int32, np.int64])))
    out = a.copy().reshape(-1)
    if out.size == 0:
        return a
    for _ in range(1 if how == "element" else draw(st.integers(2, 16))):
        i = draw(st.integers(0, out.size - 1))
        if np.issubdtype(out.dtype, np.integer):
            info = np.iinfo(out.dtype)
            out[i] = draw(st.sampled_from([-1, -2, 0, 1, 12, 13, 11, 2**31 - 1, int(info.min), int(info.max)])
                          | st.integers(int(info.min), int(info.max)))
        else:
            out[i] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 0.0, 1e30, -1e30, 3.4e38])
                          | st.floats(width=32, allow_nan=False, allow_infinity=False))
    return out.reshape(a.shape)


@pytest.mark.parametrize("kind", ["index", "stats", "shard"])
@fuzz_settings(45)
@given(data=st.data())
def test_forged_arrays(pristine, kind, data):
    name = data.draw(st.sampled_from(["flat", "hnsw", "ivf"]))
    with Case(pristine, name, f"forged {kind} arrays") as c:
        rel, tensors = c.tensors(data.draw, kind)
        which = data.draw(st.sampled_from(sorted(tensors)))
        tensors[which] = _forge_array(tensors[which], data.draw)
        note(f"{name} KB, {rel}: tensor {which} forged to {tensors[which].dtype} {list(tensors[which].shape)}")
        replace_file_signed(c.root, rel, forge_safetensors(tensors))
        got = observe(c.root, "full")
        c.outcome(got)
        if kind in ("shard", "stats") and "open" not in got and not answers_same(got, c.want):
            assert got["verify"], "forged arrays change the answers but verify() sees no problem"
        if kind == "index" and "open" not in got:
            # A forged index can refuse, or propose candidates; the exact re-rank over all 12 entries decides.
            for k in (k for k in c.want if k.startswith("search")):
                assert _is_error(got[k]) or _same(got[k], c.want[k]), f"a forged index changed the result of {k}"


# --------------------------------------------------------------------------- forged downgrades, bad values, full verify

DOWNGRADE_EDITS = {
    "none": lambda m: None,
    "sampler": lambda m: m["settings"].update(sampler="heun"),
    "shard order": lambda m: m.update(shards=m["shards"][::-1]),
    "calibration": lambda m: m["calibration"].update({"4": {"h": 7, "centered_p95": 9.0}}),
}
DOWNGRADE_STEPS = ["version", "checksum", "structure", "records", "files"]


@fuzz_settings(40)
@given(data=st.data())
def test_downgrade_forgeries_are_refused(pristine, data):
    """Any subset of the downgrade forgery (format_version 1, checksum deleted, index records and files renamed as
    version 1 had them), over any hand edit, re-signed or not: a manifest that says version 1 is refused."""
    name = data.draw(st.sampled_from(["flat", "hnsw", "ivf"]))
    edit = data.draw(st.sampled_from(sorted(DOWNGRADE_EDITS)))
    steps = data.draw(st.sets(st.sampled_from(DOWNGRADE_STEPS)))
    sign = data.draw(st.booleans())
    note(f"{name}: edit {edit}, steps {sorted(steps)}, re-signed {sign}")
    with Case(pristine, name, "downgrade") as case:
        m = case.m
        DOWNGRADE_EDITS[edit](m)
        if "version" in steps:
            m["format_version"] = 1
        for rec in m["indexes"].values():
            if "structure" in steps:
                rec.pop("structure", None)
            if "records" in steps:
                new = rec["file"].replace(".safetensors", ".faiss")
                if "files" in steps:
                    case.path(rec["file"]).rename(case.path(new))
                rec["file"] = new
        if "checksum" in steps:
            m.pop("checksum", None)
        write_manifest(case.root, m, sign=sign and "checksum" not in steps)
        got = case.outcome(observe(case.root, "size"))
        if "version" in steps or (not sign and (edit != "none" or steps)):
            assert "open" in got, got
        if "version" in steps:
            assert "not checksummed" in got["open"][1] or "format version" in got["open"][1], got["open"]


def _inject_bad_value(case: Case, draw) -> str:
    """Store one value no KB can hold in a drawn field (every checksum re-signed); returns the file it is in."""
    field = draw(st.sampled_from(["sigmas", "sampler", "scheduler", "prompt", "shard", "stats"]))
    note(f"bad value in {field}")
    m = case.m
    if field in ("sigmas", "sampler", "scheduler"):
        s = m["settings"]
        if field == "sigmas":
            i = draw(st.integers(0, len(s["sigmas"]) - 2))
            s["sigmas"][i + 1] = s["sigmas"][i] + draw(st.sampled_from([1e-3, 1.0, 1e6]))
        else:
            s[field] = draw(st.sampled_from(["x" * 10_000, "Euler", "euler a", "", "\u00e9"]))
        write_manifest(case.root, m)
        return "manifest.json"
    if field == "prompt":
        rel = draw(st.sampled_from(case.files("entries")))
        entries = json.loads(case.path(rel).read_text())
        entries[draw(st.integers(0, len(entries) - 1))]["prompt"] = draw(st.sampled_from(["\ud800", "a\udfff", "p" * 70_000]))
        replace_file_signed(case.root, rel, json.dumps(entries).encode())
        return rel
    rel, t = case.tensors(draw, field)
    key = draw(st.sampled_from(sorted(t)))
    flat = t[key].reshape(-1)
    value = draw(st.sampled_from([1e17, -1e17, np.nan, np.inf, -np.inf] if field == "shard" else [np.nan, np.inf]))
    if t[key].dtype == np.float16 and abs(value) == 1e17:
        value = np.inf  # float16 cannot hold 1e17: it stores inf
    flat[draw(st.integers(0, flat.size - 1))] = value
    replace_file_signed(case.root, rel, forge_safetensors(t))
    return rel


@fuzz_settings(40)
@given(data=st.data())
def test_values_no_kb_can_hold_are_refused_naming_the_file(pristine, data):
    name = data.draw(st.sampled_from(["flat", "hnsw", "ivf"]))
    with Case(pristine, name, "bad value") as case:
        rel = _inject_bad_value(case, data.draw)
        try:
            kb = KnowledgeBase.open(case.root, verify="size")
        except KBError as e:
            assert rel in str(e), (rel, str(e))
            case.outcome({"open": ("KBError", str(e))})
            return
        problems = kb.verify(full=True)
        assert any(rel in p for p in problems), (rel, problems)
        case.outcome({"verify": ("KBError", problems[0])})


@fuzz_settings(30)
@given(data=st.data())
def test_full_verify_finds_swapped_rows_and_shuffled_index_keys(pristine, data):
    name = data.draw(st.sampled_from(["flat", "hnsw", "ivf"]))
    what = data.draw(st.sampled_from(["rows", "index"] if name != "ivf" else ["rows"]))
    with Case(pristine, name, "full verify") as case:
        if what == "rows":
            rel, t = case.tensors(data.draw, "shard")
            n = len(next(iter(t.values())))
            a, b = data.draw(st.lists(st.integers(0, n - 1), min_size=2, max_size=2, unique=True))
            for key in t:
                t[key][[a, b]] = t[key][[b, a]]
            replace_file_signed(case.root, rel, forge_safetensors(t))
        else:
            step = data.draw(st.sampled_from(STORED_STEPS))
            kb = KnowledgeBase.open(case.root)
            keys = ix.reduce_keys(kb.latents(step, np.arange(len(kb))), kb.reduce)
            a, b = data.draw(st.lists(st.integers(0, len(kb) - 1), min_size=2, max_size=2, unique=True))
            keys[[a, b]] = keys[[b, a]]
            index = ix.empty(name, keys.shape[1])
            index.add(keys)
            replace_file_signed(case.root, case.m["indexes"][str(step)]["file"], ix.encode(index))
        note(f"{name}: {what} {a} <-> {b}")
        kb = KnowledgeBase.open(case.root, verify="full")
        problems = kb.verify(full=True)
        assert problems and all(isinstance(p, str) for p in problems), problems
        case.outcome({"verify": ("KBError", problems[0])})
