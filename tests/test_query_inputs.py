"""Hostile query inputs: seeds, search parameters, weight fits, blends and prompt-file names.

Every refusal is a KBError naming the value and the fix (never a ValueError from numpy, an
OverflowError from FAISS or an OSError from the file system), and what is returned is finite,
in its documented shape.
"""

from __future__ import annotations

import os

import faiss
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kb_crash_helper import LATENT_SHAPE, toy_latents, toy_settings

from kb_tools.build.prompts import input_file, read_prompts
from kb_tools.calibration.blend_error import measure_blend_errors
from kb_tools.calibration.residuals import calibrate, leave_one_out
from kb_tools.core.errors import KBError
from kb_tools.core.weights import centered_residual, fit_weights
from kb_tools.store import KnowledgeBase
from kb_tools.store.arguments import MAX_SEARCH_PARAM
from kb_tools.store.retrieval import blend_entries, nearest_keys

faiss.omp_set_num_threads(1)
D = int(np.prod(LATENT_SHAPE))


def _build(root, index_type: str = "auto") -> KnowledgeBase:
    kb = KnowledgeBase.create(root, toy_settings(), dtype="float32", index_type=index_type)
    ps = [(f"prompt {i}", 0) for i in range(12)]
    kb.append(toy_latents(ps), [p for p, _ in ps], [s for _, s in ps])
    return kb


@pytest.fixture(scope="module")
def kb(tmp_path_factory) -> KnowledgeBase:
    """12 shared-seed entries, float32, steps 2, 4, 6, flat index."""
    return _build(tmp_path_factory.mktemp("kb") / "kb")


@pytest.fixture(scope="module")
def hnsw_kb(tmp_path_factory) -> KnowledgeBase:
    return _build(tmp_path_factory.mktemp("kb") / "hnsw", "hnsw")


# --------------------------------------------------------------------------- seeds


@pytest.mark.parametrize("seed", [-1, -(2**70), 2**64, 1.5, "0", True, None])
def test_seeds_out_of_range_are_refused_at_every_entry(kb, seed):
    words = r"seed must be an integer from 0 to 2\*\*64-1, got .*Pass a non-negative seed"
    for call in (lambda: kb.key_spread(2, seed=seed), lambda: calibrate(kb, 2, 2, sample=4, seed=seed),
                 lambda: leave_one_out(kb, 2, 2, sample=4, seed=seed),
                 lambda: measure_blend_errors(kb, 2, 2, sample=4, seed=seed)):
        with pytest.raises(KBError, match=words):
            call()


def test_largest_seed_is_taken(kb):
    assert np.isfinite(kb.key_spread(2, seed=2**64 - 1))
    assert calibrate(kb, 2, 2, sample=4, seed=2**64 - 1)["n"] == 4


# --------------------------------------------------------------------------- search parameters


@pytest.mark.parametrize("name", ["nprobe", "ef_search"])
@pytest.mark.parametrize("value", [2**31, 2**63, MAX_SEARCH_PARAM + 1, 0, -5, 3.0, np.int64(2**40)])
def test_search_params_out_of_range_are_refused_where_set(hnsw_kb, name, value):
    with pytest.raises(KBError, match=rf"{name} must be a positive int or None \(the default\), at most 100,000.*Pass e\.g\."):
        hnsw_kb.set_search_params(**{name: value})
    ids, _ = hnsw_kb.search(2, hnsw_kb.latents(2, [3]), 2)  # the session's parameters are unchanged
    assert ids[0, 0] == 3


def test_largest_search_params_search(hnsw_kb):
    hnsw_kb.set_search_params(nprobe=MAX_SEARCH_PARAM, ef_search=MAX_SEARCH_PARAM)
    try:
        assert hnsw_kb.search(2, hnsw_kb.latents(2, [5]), 3)[0][0, 0] == 5
    finally:
        hnsw_kb.set_search_params()


# --------------------------------------------------------------------------- weights (line 7)


def _problem(b=2, h=3, d=D, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((b, d)), rng.standard_normal((b, h, d))


@pytest.mark.parametrize("q_shape, k_shape", [((2, D), (3, 3, D)), ((3, D), (2, 3, D)), ((2, D), (2, 3, D + 1)),
                                              ((D,), (3, D)), ((2, D), (2, 0, D)), ((0, D), (0, 3, D)),
                                              ((2, 1, D), (2, 3, D)), ((2, 0), (2, 3, 0))])
def test_fit_weights_refuses_mismatched_shapes(q_shape, k_shape):
    with pytest.raises(KBError, match=r"queries \[B, D\] and their keys \[B, H, D\] with the same B and D.*Pass kb.as_queries"):
        fit_weights(np.ones(q_shape), np.ones(k_shape), 1.0)


@pytest.mark.parametrize("where", ["query", "keys"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_fit_weights_refuses_non_finite_latents(where, bad):
    q, k = _problem()
    (q if where == "query" else k)[1, ..., 7] = bad
    with pytest.raises(KBError, match=rf"{where} 1 of the batch contains NaN/Inf.*Check the model"):
        fit_weights(q, k, 1.0)


@pytest.mark.parametrize("spread", [-1.0, np.nan, np.inf, "1", None, True])
def test_fit_weights_refuses_a_bad_spread(spread):
    q, k = _problem()
    with pytest.raises(KBError, match=r"spread must be a finite number >= 0.*kb.key_spread"):
        fit_weights(q, k, spread)
    with pytest.raises(KBError, match=r"spread must be a finite number >= 0"):
        centered_residual(q[0], k[0], np.ones(3), spread)


def test_a_zero_spread_accepts_exact_matches_only():
    """A KB whose keys do not vary (one entry) has spread 0: an exact match has centered residual 0, any other +inf,
    so every guard sends inexact items back to plain sampling (a learning KB's second generation)."""
    q, k = _problem()
    fit = fit_weights(q, k, 0.0)
    assert np.isfinite(fit.weights).all() and np.isfinite(fit.residual).all() and (fit.centered_residual == np.inf).all()
    exact = fit_weights(k[:, :1, :].reshape(len(k), -1), k[:, :1, :], 0.0)
    assert (exact.centered_residual == 0).all()


@pytest.mark.parametrize("x", [np.array([["a"] * 4] * 2), np.ones((2, 4), complex), np.ones((2, 4), bool),
                               [[1.0, 2.0], [3.0]]])
def test_fit_weights_refuses_what_is_not_a_real_array(x):
    with pytest.raises(KBError, match=r"query (has dtype|must be one numeric array)"):
        fit_weights(x, np.ones((2, 1, 4)), 1.0)


def test_fit_weights_overflow_is_refused_naming_the_size():
    q, k = _problem()
    with pytest.raises(KBError, match=r"overflowed float64 \(query and keys hold values up to \d\.\de\+300.*order 1 to 100"):
        fit_weights(q * 1e300, k * 1e300, 1.0)
    with pytest.raises(KBError, match=r"overflowed float64"):  # finite inputs, an infinitesimal spread
        fit_weights(q, k, 1e-320)


def test_fit_weights_large_but_finite_weights_pass():
    """Near-dependent keys give large least-squares weights: they are a legitimate fit, not refused."""
    rng = np.random.default_rng(3)
    base = rng.standard_normal(D)
    k = np.stack([base, base + 1e-6 * rng.standard_normal(D), rng.standard_normal(D)])[None]
    q = (base + 1e-3 * rng.standard_normal(D))[None]
    fit = fit_weights(q, k, 1.0)
    assert np.isfinite(fit.weights).all() and np.abs(fit.weights).max() > 10


# --------------------------------------------------------------------------- neighbours and blend (lines 6, 8)


def test_nearest_keys_refuses_bad_queries(kb):
    for query, words in [(np.full((1, D), np.nan, np.float32), r"contains NaN/Inf"), (np.ones(D, np.float32), r"Add the batch"),
                         (np.ones((1, D + 1), np.float32), r"flat query has"), (np.ones((1, D), int), r"not a floating-point type")]:
        with pytest.raises(KBError, match=words):
            nearest_keys(kb, query, 2, 2)
    near = nearest_keys(kb, kb.latents(2, [4, 9]), 2, 3)  # [B, C, H, W] queries are taken as kb.search takes them
    assert near.keys.shape == (2, 3, D) and near.ids[:, 0].tolist() == [4, 9]


def test_blend_entries_refuses_non_finite_weights_and_overflow(kb):
    ids = np.array([[0, 1], [2, 3]])
    for bad in (np.nan, np.inf):
        w = np.ones((2, 2))
        w[1, 0] = bad
        with pytest.raises(KBError, match=r"blend weights contain NaN/Inf \(first at \[1, 0\]\).*finite weights"):
            blend_entries(kb, ids, w, 4)
    with pytest.raises(KBError, match=r"blend overflows float32: weights up to 1e\+38 in size.*Pass weights of a sensible size"):
        blend_entries(kb, ids, np.full((2, 2), 1e38), 4)
    with pytest.raises(KBError, match=r"blend needs ids \[B, H\] and weights \[B, H\] of one shape, H >= 1"):
        blend_entries(kb, np.zeros((2, 0), int), np.zeros((2, 0)), 4)
    with pytest.raises(KBError, match=r"as arrays"):
        blend_entries(kb, ids, [[1.0, 2.0], [3.0]], 4)
    big = blend_entries(kb, ids, np.full((2, 2), 1e6), 4)  # large but finite: a legitimate blend
    assert big.dtype == np.float32 and big.shape == (2, *LATENT_SHAPE) and np.isfinite(big).all()
    assert blend_entries(kb, np.zeros((0, 2), int), np.zeros((0, 2)), 4).shape == (0, *LATENT_SHAPE)


# --------------------------------------------------------------------------- prompt files


def test_read_prompts_os_errors_become_kb_errors(tmp_path):
    with pytest.raises(KBError, match=r"cannot use '.*x{20,}\.\.\. as a prompt file \(File name too long\); check the path"):
        read_prompts(tmp_path / ("x" * 5000))
    with pytest.raises(KBError, match=r"prompt file '.*' is a directory; give the path of a \.txt"):
        read_prompts(tmp_path)
    with pytest.raises(KBError, match=r"cannot use 5 as a prompt file.*pass it as text"):
        read_prompts(5)
    with pytest.raises(KBError, match=r"does not exist; give the path"):
        read_prompts(tmp_path / "none.txt")
    with pytest.raises(KBError, match=r"is not a file in ComfyUI's input folder"):
        input_file("x" * 5000, tmp_path)
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe.txt")
        with pytest.raises(KBError, match=r"is not a regular file"):
            read_prompts(tmp_path / "pipe.txt")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_read_prompts_without_permission(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "p.txt").write_text("a cat\n")
    (tmp_path / "unreadable.txt").write_text("a dog\n")
    os.chmod(tmp_path / "unreadable.txt", 0)
    os.chmod(locked, 0)
    try:
        with pytest.raises(KBError, match=r"cannot use '.*p\.txt' as a prompt file \(Permission denied\)"):
            read_prompts(locked / "p.txt")
        with pytest.raises(KBError, match=r"cannot read prompt file .*unreadable\.txt.*permissions"):
            read_prompts(tmp_path / "unreadable.txt")
    finally:
        os.chmod(locked, 0o755)


# --------------------------------------------------------------------------- property: only KBError escapes

_numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1e308, -1e308, 1e-320, 3e38]),
                     st.integers(-(2**70), 2**70))
_ints = st.one_of(st.integers(-(2**70), 2**70), st.sampled_from([0, 1, 2, 2**31, 2**31 - 1, 2**63]), st.none(),
                  st.floats(allow_nan=True), st.booleans())
_dtypes = st.sampled_from([np.float64, np.float32, np.float64, np.float16, np.int64, object])


def _array(draw, shape):
    fill = draw(st.one_of(st.just([]), st.lists(_numbers, min_size=1, max_size=3)))  # often a clean array
    dtype = draw(_dtypes)
    base = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).standard_normal(shape)
    flat = base.reshape(-1)
    for i, v in enumerate(fill):
        if flat.size and draw(st.booleans()):
            flat[(i * 7919) % flat.size] = float(v) if abs(v) < 2**1000 else 0.0
    with np.errstate(all="ignore"):
        try:
            return flat.reshape(shape).astype(dtype)
        except (OverflowError, ValueError):
            return flat.reshape(shape)


@st.composite
def _calls(draw):
    what = draw(st.sampled_from(["prompts", "fit", "blend", "nearest", "search_params", "spread", "calibrate"]))
    dims = st.sampled_from([1, 2, 3, 4, 2, 3, 0])
    if what == "fit":
        b, h = draw(dims), draw(dims)
        d = draw(st.sampled_from([D, 3, D, 0]))
        qs, ks = (b, d), (b, h, d)
        if draw(st.booleans()):  # half the time a mismatch
            qs = draw(st.sampled_from([(b, d), (b + 1, d), (d,), (b, 1, d)]))
            ks = draw(st.sampled_from([(b, h, d), (b, h, d + 1), (h, d)]))
        spread = draw(st.one_of(st.floats(0.1, 100.0), _numbers))
        return what, (_array(draw, qs), _array(draw, ks), spread, draw(st.sampled_from(["lstsq", "affine", "ridge"])),
                      draw(st.one_of(st.just(1e-2), _numbers)))
    if what == "blend":
        b, h = draw(dims), draw(dims)
        ids = np.asarray(draw(st.lists(st.integers(0, 11) | st.integers(-2, 14), min_size=b * h, max_size=b * h)),
                         np.int64).reshape(b, h)
        shape = draw(st.sampled_from([(b, h), (b, h + 1), (h,)])) if draw(st.booleans()) else (b, h)
        return what, (ids, _array(draw, shape), draw(st.sampled_from([2, 4, 6, 5, -1, 2**63])))
    if what == "nearest":
        shape = draw(st.sampled_from([(1, D), (2, *LATENT_SHAPE), (D,), (1, D + 1), (0, D)]))
        return what, (_array(draw, shape), draw(st.sampled_from([2, 4, 3])), draw(st.integers(1, 3) | _ints),
                      draw(st.none() | _ints))
    if what == "prompts":
        return what, (draw(st.one_of(st.text(max_size=40), st.integers(1, 8).map(lambda n: "y" * (700 * n)),
                                     st.sampled_from(["", ".", "..", "/", "a\0b", "~"]))),)
    return what, (draw(_ints), draw(_ints), draw(_ints))


@settings(max_examples=50, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(call=_calls())
def test_only_kb_errors_escape_and_results_are_finite(kb, hnsw_kb, tmp_path_factory, call):
    what, a = call
    try:
        if what == "fit":
            fit = fit_weights(*a)
            b, h = np.shape(a[1])[:2]
            assert fit.weights.shape == (b, h) and fit.residual.shape == fit.centered_residual.shape == (b,)
            assert np.isfinite(fit.weights).all() and np.isfinite(fit.residual).all()
            assert not np.isnan(fit.centered_residual).any() and (a[2] == 0 or np.isfinite(fit.centered_residual).all())
        elif what == "blend":
            out = blend_entries(kb, *a)
            assert out.dtype == np.float32 and out.shape == (len(a[0]), *LATENT_SHAPE) and np.isfinite(out).all()
        elif what == "nearest":
            near = nearest_keys(kb, *a)
            b, h = near.ids.shape
            assert near.keys.shape == (b, h, D) and np.isfinite(near.keys).all() and np.isfinite(near.distances).all()
        elif what == "spread":
            assert np.isfinite(kb.key_spread(2, sample=a[0] if isinstance(a[0], int) and a[0] > 0 else 8, seed=a[1]))
        elif what == "calibrate":
            out = calibrate(kb, 2, 2, sample=4, seed=a[0])
            assert all(np.isfinite(v) for v in out.values() if isinstance(v, float))
        elif what == "search_params":
            try:
                hnsw_kb.set_search_params(nprobe=a[0], ef_search=a[1])
                ids, dist = hnsw_kb.search(2, hnsw_kb.latents(2, [1]), 2)
                assert ids.shape == (1, 2) and np.isfinite(dist).all()
            finally:
                hnsw_kb.set_search_params()
        else:
            folder = tmp_path_factory.mktemp("input")
            for name in a:
                for fn in (lambda: read_prompts(name), lambda: read_prompts(input_file(name, folder))):
                    try:
                        assert isinstance(fn(), list)
                    except KBError:
                        pass
    except KBError as e:
        assert str(e) and len(str(e)) < 2000
