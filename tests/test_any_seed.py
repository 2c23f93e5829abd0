"""The any-seed experiment (benchmarks.any_seed_sampler) on a real ComfyUI with a tiny in-process model: the clean-image
prediction read back from a KB's stored Euler steps is the model's own, and the sampler counts its NFE per item."""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from test_redi_nodes import CFG, SEED, STEPS, build

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def any_seed(pack):
    return importlib.import_module(f"{pack.__name__}.benchmarks.any_seed_sampler")


def guider(pack, model, prompts):
    import tiny_models
    pos = pack.kb_tools.comfy.plain.batch_conditioning([tiny_models.prompt_cond(p) for p in prompts])
    neg = pack.kb_tools.comfy.plain.batch_conditioning([tiny_models.prompt_cond("")] * len(prompts))
    return pack.kb_tools.comfy.plain.cfg_guider(model, pos, neg, CFG)


@pytest.mark.parametrize("model_type", ["EPS", "V_PREDICTION"])
def test_denoised_from_stored_euler_steps_is_the_models_own_prediction(pack, any_seed, tmp_path, model_type):
    import comfy.sample
    import comfy.samplers
    import tiny_models
    model = tiny_models.make_tiny_model(0, model_type)
    kb = build(pack.kb_tools, model, tmp_path / "kb", ["a cat"], store=range(1, STEPS))
    cs = pack.kb_tools.comfy.model_facts
    sigmas = cs.schedule_sigmas(model, "euler", "normal", STEPS)
    seen = {}
    latent = tiny_models.empty_latent(1)
    sampler = comfy.samplers.sampler_object("euler")
    guider(pack, model, ["a cat"]).sample(comfy.sample.prepare_noise(latent, SEED), latent, sampler, sigmas,
                                          callback=lambda i, denoised, x, total: seen.__setitem__(i, denoised.clone()),
                                          disable_pbar=True, seed=SEED)
    for step in (1, 4, STEPS - 2):
        derived = any_seed.kb_denoised(kb, model, sigmas, step)[0]
        own = seen[step].reshape(-1).numpy()
        assert np.abs(derived - own).max() <= 1e-3 * max(1.0, np.abs(own).max()), step
    with pytest.raises(any_seed.KBError, match="needs stored steps"):
        any_seed.kb_denoised(kb, model, sigmas, STEPS - 1)  # x at step T is not stored


def test_pure_math_round_trips(any_seed):
    x = torch.randn(2, 4, 8, 8)
    d = torch.randn(2, 4, 8, 8)
    eps = any_seed.noise_estimate(x, d, 3.0)
    assert torch.allclose(any_seed.renoise(d, eps, 3.0), x, atol=1e-5)
    x_next = x + (1.5 - 3.0) * eps  # one Euler step from x at sigma 3 to sigma 1.5 with prediction d
    assert torch.allclose(any_seed.denoised_from_euler_steps(x, x_next, 3.0, 1.5), d, atol=1e-5)
    table = np.random.default_rng(0).normal(size=(50, 16))
    ids, dist = any_seed.nearest_rows(table, table[[7, 3]] + 1e-6, 2)
    assert ids[:, 0].tolist() == [7, 3] and (dist[:, 0] < 1e-4).all() and (dist[:, 1] > dist[:, 0]).all()


@pytest.mark.parametrize("key_source,extra", [("previous", 0), ("extra", 1)])
def test_sampler_counts_nfe_per_item_and_keeps_each_seeds_noise(pack, any_seed, tmp_path, key_source, extra):
    import tiny_models
    model = tiny_models.make_tiny_model(0, "V_PREDICTION")
    kb = build(pack.kb_tools, model, tmp_path / "kb", [f"prompt {i}" for i in range(6)], store=range(1, STEPS))
    cs = pack.kb_tools.comfy.model_facts
    sigmas = cs.schedule_sigmas(model, "euler", "normal", STEPS)
    run = any_seed.AnySeedRun(kb, key_step=2, value_step=6, neighbours=3, key_source=key_source)
    latent = tiny_models.empty_latent(2)
    noise = cs.seeded_noise(latent, [1_000_000, 1_000_001])
    out = guider(pack, model, ["prompt 1", "prompt 1"]).sample(noise, latent, any_seed.any_seed_ksampler(run), sigmas,
                                                               disable_pbar=True, seed=SEED)
    assert run.evaluations.per_item().tolist() == [2 + (STEPS - 6) + extra] * 2
    assert torch.isfinite(out).all() and not torch.allclose(out[0], out[1])  # same prompt, own noise each
    assert run.ids.shape == (2, 3) and np.isfinite(run.fit.weights).all()
