"""ReDi retrieval (Algorithm 2): neighbours, weights, residuals, blending, calibration."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from kb_crash_helper import toy_latents, toy_settings

from kb_tools.core.errors import KBError
from kb_tools.store import KnowledgeBase, reduce_keys
from kb_tools.core.weights import blend, centered_residual, check_value_step, fit_weights, least_squares, relative_residual, solve_weights
from kb_tools.store.retrieval import blend_entries, nearest_keys
from kb_tools.calibration.residuals import calibrate

faiss.omp_set_num_threads(1)


@pytest.fixture(scope="module")
def toy_kb(tmp_path_factory) -> KnowledgeBase:
    """50 shared-seed entries, float32, steps 2, 4, 6."""
    kb = KnowledgeBase.create(tmp_path_factory.mktemp("kb") / "kb", toy_settings(), dtype="float32")
    ps = [(f"prompt {i}", 0) for i in range(50)]
    kb.append(toy_latents(ps), [p for p, _ in ps], [s for _, s in ps])
    return kb


# --------------------------------------------------------------------------- weights


def test_lstsq_weights_match_numpy():
    rng = np.random.default_rng(0)
    keys, q = rng.standard_normal((4, 30)), rng.standard_normal(30)
    np.testing.assert_allclose(solve_weights(q, keys), np.linalg.lstsq(keys.T, q, rcond=None)[0], rtol=1e-10)
    dup = np.stack([keys[0], keys[0], keys[1]])  # rank-deficient: minimum-norm solution, no error
    w = solve_weights(q, dup)
    assert np.isfinite(w).all() and np.isclose(w[0], w[1])


def test_gram_solve_matches_svd_lstsq_on_shared_seed_keys():
    """The fast normal-equation path gives numpy's SVD answer on keys that share one noise (ill-conditioned)."""
    rng = np.random.default_rng(5)
    z = 14.0 * rng.standard_normal(16384)
    for h in (1, 3, 16, 64):
        keys = z + rng.standard_normal((h, 16384))
        q = z + rng.standard_normal(16384)
        ref = np.linalg.lstsq(keys.T, q, rcond=None)[0]
        np.testing.assert_allclose(least_squares(keys, q), ref, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(solve_weights(q, keys, "affine").sum(), 1.0)
    # Near-dependent keys (condition beyond the Gram limit) take the SVD path: the minimum-norm answer.
    keys = np.stack([z, z + 1e-9 * rng.standard_normal(16384), rng.standard_normal(16384)])
    np.testing.assert_array_equal(least_squares(keys, z), np.linalg.lstsq(keys.T, z, rcond=None)[0])


def test_affine_weights_sum_to_one_and_are_optimal():
    rng = np.random.default_rng(1)
    keys, q = rng.standard_normal((3, 20)), rng.standard_normal(20)
    w = solve_weights(q, keys, "affine")
    assert np.isclose(w.sum(), 1.0)
    best = np.linalg.norm(q - w @ keys)
    for _ in range(200):
        other = rng.standard_normal(3)
        other[-1] = 1.0 - other[:-1].sum()
        assert np.linalg.norm(q - other @ keys) >= best - 1e-12
    assert solve_weights(q, keys[:1], "affine").tolist() == [1.0]


def test_ridge_shrinks_toward_zero():
    rng = np.random.default_rng(2)
    keys, q = rng.standard_normal((3, 20)), rng.standard_normal(20)
    norms = [np.linalg.norm(solve_weights(q, keys, "ridge", r)) for r in (0.0, 1e-2, 1.0, 100.0, 1e6)]
    assert all(a > b for a, b in zip(norms, norms[1:])) and norms[-1] < 1e-4
    np.testing.assert_allclose(solve_weights(q, keys, "ridge", 0.0), solve_weights(q, keys), rtol=1e-8)
    np.testing.assert_allclose(solve_weights(q, 10 * keys, "ridge", 1.0) * 10,
                               solve_weights(q, keys, "ridge", 1.0), rtol=1e-8)  # scale-invariant penalty


def test_unknown_mode_lists_valid_ones():
    with pytest.raises(KBError, match=r"unknown weight mode 'pinv'.*'lstsq', 'affine', 'ridge'"):
        solve_weights(np.ones(3), np.ones((1, 3)), "pinv")


def test_residuals_and_blend():
    keys = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    q = np.array([2.0, 3.0, 4.0])
    w = solve_weights(q, keys)
    np.testing.assert_allclose(w, [2.0, 3.0])
    assert np.isclose(relative_residual(q, keys, w), 4.0 / np.linalg.norm(q))
    # Residual (0, 0, 4) measured against a KB whose keys spread 8 around their mean.
    assert np.isclose(centered_residual(q, keys, w, 8.0), 0.5)
    values = np.arange(2 * 2 * 3, dtype=np.float32).reshape(2, 2, 3)
    np.testing.assert_allclose(blend(values, w), 2 * values[0] + 3 * values[1])


# --------------------------------------------------------------------------- retrieval (Algorithm 2, lines 6-8)


def nearest_and_fit(kb, latents, step: int, h: int, mode: str = "lstsq"):
    """Line 6 and line 7 for query latents [B, C, H, W] at `step`: (NearestKeys, WeightFit)."""
    q = kb.as_queries(latents)
    near = nearest_keys(kb, q, step, h)
    return near, fit_weights(q, near.keys, kb.key_spread(step), mode)


def test_exact_hit_returns_itself_with_weight_one(toy_kb):
    q = toy_kb.latents(2, [17, 33])
    near, fit = nearest_and_fit(toy_kb, q, 2, 1)
    assert near.ids[:, 0].tolist() == [17, 33]
    np.testing.assert_allclose(fit.weights, 1.0, atol=1e-6)
    assert (fit.residual < 1e-6).all() and (fit.centered_residual < 1e-6).all() and np.allclose(near.distances, 0)
    near, fit = nearest_and_fit(toy_kb, q, 2, 3)
    assert near.ids[:, 0].tolist() == [17, 33] and near.ids.shape == (2, 3)
    np.testing.assert_allclose(fit.weights, [[1, 0, 0], [1, 0, 0]], atol=1e-5)
    assert near.keys.shape == (2, 3, 256) and toy_kb.as_queries(q).shape == (2, 256) and toy_kb.mean_key(2).shape == (256,)
    latent = blend_entries(toy_kb, near.ids, fit.weights, 6)
    assert latent.dtype == np.float32 and latent.shape == (2, 4, 8, 8)
    np.testing.assert_allclose(latent, toy_kb.latents(6, [17, 33]), atol=1e-3)


def test_torch_query(toy_kb):
    torch = pytest.importorskip("torch")
    q = toy_kb.latents(4, [5])
    assert nearest_and_fit(toy_kb, torch.from_numpy(q).half(), 4, 2)[0].ids[0, 0] == 5


def test_centered_residual_exposes_a_poor_shared_seed_match(toy_kb):
    # A prompt the KB lacks, with the KB's seed: the shared noise dominates the query.
    _, fit = nearest_and_fit(toy_kb, toy_latents([("a prompt the KB lacks", 0)])[2], 2, 3)
    assert fit.residual[0] < 0.2  # looks like a good match ...
    assert fit.centered_residual[0] > 0.8  # ... but the prompt-dependent part is not matched


def test_blend_modes_and_step_errors(toy_kb):
    q = toy_kb.as_queries(toy_latents([("another new prompt", 0)])[2])
    near = nearest_keys(toy_kb, q, 2, 3)
    spread = toy_kb.key_spread(2)
    assert np.isclose(fit_weights(q, near.keys, spread, "affine").weights.sum(), 1.0)
    w = fit_weights(q, near.keys, spread).weights  # lstsq, the paper's
    np.testing.assert_allclose(w[0], solve_weights(q[0], near.keys[0], "lstsq"))
    latent = blend_entries(toy_kb, near.ids, w, 4)
    np.testing.assert_allclose(latent[0], np.tensordot(w[0], toy_kb.latents(4, near.ids[0]), axes=1), rtol=1e-5)
    with pytest.raises(KBError, match=r"value step 2 is before the key step 4.*must be at or after the key step"):
        check_value_step(4, 2)
    with pytest.raises(KBError, match=r"has no value step 5; it stores steps \[2, 4, 6\]"):
        blend_entries(toy_kb, near.ids, w, 5)
    with pytest.raises(KBError, match=r"unknown weight mode"):
        fit_weights(q, near.keys, spread, "mean")


def test_rerank_fixes_what_pooling_gets_wrong(tmp_path):
    """Targets differ from the query by a small offset, decoys by a pattern that pooling erases."""
    settings = toy_settings(latent_shape=(1, 8, 8), stored_steps=[2, 4])
    kb = KnowledgeBase.create(tmp_path / "kb", settings, dtype="float32", reduce=4)  # pooled key: 4 dims
    rng = np.random.default_rng(3)
    base = rng.standard_normal((1, 8, 8))
    checker = 2.0 * (-1.0) ** np.add.outer(np.arange(8), np.arange(8))[None]  # block means are 0
    query = base + checker
    targets = [query + e for e in (0.3, 0.5, 0.7)]  # full distance 8e, pooled distance 2e
    decoys = []
    for d in np.linspace(0.0, 0.2, 20):  # pooled distance <= 0.4, full distance ~ 18
        hf = rng.standard_normal((1, 8, 8))
        hf -= hf.reshape(1, 2, 4, 2, 4).mean(axis=(2, 4)).repeat(4, 1).repeat(4, 2)
        decoys.append(base + d + hf)
    far = [base + 3.0 + k for k in range(20)]
    x = np.stack(decoys + targets + far).astype(np.float32)
    kb.append({2: x, 4: x}, [f"e{i}" for i in range(len(x))], [0] * len(x))
    q = query[None].astype(np.float32)
    target_ids = [20, 21, 22]

    pooled = reduce_keys(x, 4)
    naive = np.argsort(np.linalg.norm(pooled - reduce_keys(q, 4), axis=1), kind="stable")[:3]
    assert not set(naive) & set(target_ids)  # the reduced key alone picks decoys
    assert not set(kb.search(2, q, 3, candidates=3)[0][0]) & set(target_ids)

    ids, dist = kb.search(2, q, 3)  # 32 candidates, re-ranked on the full key
    assert ids[0].tolist() == target_ids
    np.testing.assert_allclose(dist[0], [2.4, 4.0, 5.6], rtol=1e-5)


# --------------------------------------------------------------------------- calibration


def test_calibrate_leaves_each_entry_out(toy_kb, tmp_path):
    cal = calibrate(toy_kb, 2, 3, sample=20, seed=1)
    assert cal["n"] == 20 and cal["h"] == 3 and cal["kb_count"] == 50
    assert cal["centered_p50"] > 0.5  # had the entry found itself, residuals would be ~0
    assert cal["relative_p50"] < cal["centered_p50"]
    assert cal["centered_p50"] <= cal["centered_p90"] <= cal["centered_p95"]
    assert calibrate(toy_kb, 2, 3, sample=20, seed=1) == cal  # reproducible
    toy_kb.set_calibration(2, cal)
    assert KnowledgeBase.open(toy_kb.path).calibration(2) == cal
    with pytest.raises(KBError, match=r"needs at least 51 entries.*lower H"):
        calibrate(toy_kb, 2, 50)


def test_key_spread_is_rms_distance_from_mean(toy_kb):
    keys = toy_kb.keys_flat(4, np.arange(len(toy_kb))).astype(np.float64)
    expected = np.sqrt(np.mean(np.sum((keys - keys.mean(0)) ** 2, axis=1)))
    assert np.isclose(toy_kb.key_spread(4), expected, rtol=1e-4)


def test_centered_residual_separates_foreign_noise_from_kb_noise(toy_kb):
    """The guard metric: a held-out prompt on the KB's seed fits below 1, foreign noise far above."""
    own_seed = toy_latents([("held-out prompt", 0)])[4]
    foreign = toy_latents([("held-out prompt", 12345)])[4]
    near = nearest_and_fit(toy_kb, own_seed, 4, 3)[1].centered_residual[0]
    far = nearest_and_fit(toy_kb, foreign, 4, 3)[1].centered_residual[0]
    assert near < 1.5 and far > 3 * near


# --------------------------------------------------------------------------- Algorithm 2 lines 6-8 on their own


def test_nearest_keys_and_fit_weights_solve_each_query_once_in_its_mode(toy_kb):
    q = toy_kb.as_queries(toy_latents([("another new prompt", 0), ("a third new prompt", 0)])[2])
    near = nearest_keys(toy_kb, q, 2, 3)
    ids, dist = toy_kb.search(2, q, 3)
    assert np.array_equal(near.ids, ids) and np.array_equal(near.distances, dist)
    assert np.array_equal(near.keys, toy_kb.keys_flat(2, ids.reshape(-1)).reshape(2, 3, -1))
    spread = toy_kb.key_spread(2)
    for mode in ("lstsq", "affine", "ridge"):
        fit = fit_weights(q, near.keys, spread, mode)
        assert fit.mode == mode and fit.weights.shape == (2, 3) and fit.weights.dtype == np.float64
        for i in range(2):
            np.testing.assert_allclose(fit.weights[i], solve_weights(q[i], near.keys[i], mode))
            assert np.isclose(fit.residual[i], relative_residual(q[i], near.keys[i], fit.weights[i]))
            assert np.isclose(fit.centered_residual[i], centered_residual(q[i], near.keys[i], fit.weights[i], spread))
        np.testing.assert_allclose(blend_entries(toy_kb, near.ids, fit.weights, 4)[1],
                                   blend(toy_kb.latents(4, near.ids[1]), fit.weights[1]), rtol=1e-5)


def test_blend_entries_blends_any_ids_with_any_weights(toy_kb):
    ids = np.array([[3, 9], [9, 9]])
    out = blend_entries(toy_kb, ids, np.array([[0.25, 0.75], [0.5, 0.5]]), 6)
    values = toy_kb.latents(6, [3, 9])
    np.testing.assert_allclose(out[0], 0.25 * values[0] + 0.75 * values[1], rtol=1e-6)
    np.testing.assert_allclose(out[1], values[1], rtol=1e-6)
    with pytest.raises(KBError, match=r"ids \[B, H\] and weights \[B, H\] of one shape"):
        blend_entries(toy_kb, ids, np.ones(2), 6)
    with pytest.raises(KBError, match="has no value step 5"):
        blend_entries(toy_kb, ids, np.ones((2, 2)), 5)
