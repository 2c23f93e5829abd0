"""The KB-corrected solver against a learning KB (`learning_corrected.generate_learning_corrected`), on the real
ComfyUI with a tiny model: the first generation runs in full and is learned, a repeat of a stored prompt and seed is
corrected onto the plain output at the grid's NFE, a corrected item is never stored (what is stored is reproduced by
plain runs), NFE is counted per item, and a non-Euler recipe or missing stored steps are refused before sampling."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import test_learning_kb
from test_learning_kb import conds
from test_redi_nodes import CFG, SEED, STEPS, ksampler

# test_learning_kb's module fixtures, shared: the tiny model and kb_tools.samplers.redi_chain
model, redi = test_learning_kb.model, test_learning_kb.redi

pytestmark = pytest.mark.comfy

STORE = tuple(range(1, STEPS))
NFE = 4  # coarse_grid(10, 4) = (0, 1, 5, 9, 10): 1 -> 5 and 5 -> 9 corrected, the guard at step 1


@pytest.fixture(scope="module")
def lc(pack):
    import importlib
    return importlib.import_module(f"{pack.__name__}.kb_tools.samplers.learning")


def settings_for(redi, model, sampler="euler", store=STORE):
    return redi.learning_settings(model, redi.Recipe(sampler, "normal", STEPS, CFG), store, (4, 8, 8))


@pytest.fixture(scope="module")
def settings(redi, model):
    return settings_for(redi, model)


def generate(lc, redi, model, settings, path, prompts, seeds, h=1, guard=-1.0, nfe=NFE):
    import tiny_models
    positive, negative = conds(redi, prompts)
    return lc.generate_learning_corrected(str(path), settings, model, positive, negative,
                                          tiny_models.empty_latent(len(prompts)), list(prompts), list(seeds), nfe=nfe,
                                          neighbours=h, guard=guard, dtype="float32")


def assert_stored_as_plain(redi, model, kb, pair):
    """The stored latents of `pair` are those of a plain run of that prompt and seed, sampled on its own."""
    import tiny_models
    positive, negative = conds(redi, [pair[0]])
    sigmas = redi.schedule_sigmas(model, "euler", "normal", STEPS)
    _, kept, _ = redi.sample_counted(redi.cfg_guider(model, positive, negative, CFG), tiny_models.empty_latent(1),
                                     [pair[1]], sigmas, "euler", keep_steps=STORE)
    i = kb.entries.index(pair)
    for st in STORE:
        np.testing.assert_allclose(kb.latents(st, [i]), kept[st].numpy(), rtol=1e-4, atol=1e-4)


def test_first_generation_runs_in_full_and_is_learned(lc, redi, model, settings, tmp_path):
    path = tmp_path / "learned"
    r = generate(lc, redi, model, settings, path, ["prompt a", "prompt b"], [SEED, SEED], h=3)
    assert r.guard is None and not r.corrected.any() and np.isnan(r.centered_residual).all()
    assert r.evaluations.per_item().tolist() == [STEPS, STEPS] and r.learned.added == 2
    assert "fewer than H entries" in r.summary()
    kb = redi.KnowledgeBase.open(str(path))
    for pair in (("prompt a", SEED), ("prompt b", SEED)):
        assert_stored_as_plain(redi, model, kb, pair)
    torch.testing.assert_close(r.latent[:1], ksampler(model, "prompt a"), rtol=1e-4, atol=1e-4)


def test_a_stored_prompt_and_seed_is_corrected_onto_the_plain_output_with_fewer_nfe(lc, redi, model, settings, tmp_path):
    path = tmp_path / "learned"
    generate(lc, redi, model, settings, path, ["prompt a", "prompt b"], [SEED, SEED])
    again = generate(lc, redi, model, settings, path, ["prompt a"], [SEED])  # H = 1, the auto (fallback) guard
    assert again.corrected.tolist() == [True] and again.guard.source == "fallback"
    assert again.grid == (0, 1, 5, 9, 10) and again.evaluations.per_item().tolist() == [NFE]
    plain = ksampler(model, "prompt a")
    assert torch.allclose(again.latent, plain, atol=1e-4), float((again.latent - plain).abs().max())
    assert again.learned.added == 0 and again.learned.count == 2
    assert "1 of 1 item(s) on the corrected grid" in again.summary()


def test_a_corrected_item_is_never_stored_and_a_refused_one_is_stored_as_plain(lc, redi, model, settings, tmp_path):
    """A batch with a stored seed (near: corrected) and a foreign seed (far: refused, sampled in full), the guard between."""
    path = tmp_path / "learned"
    generate(lc, redi, model, settings, path, [f"prompt {i}" for i in range(4)], [SEED] * 4, h=3)
    prompts, seeds = ["prompt 1 changed", "prompt 9"], [SEED, SEED + 1000]
    everything = generate(lc, redi, model, settings, path, prompts, seeds, h=3, guard=1e9)
    assert everything.corrected.all() and everything.learned.added == 0 and everything.learned.count == 4
    assert everything.evaluations.per_item().tolist() == [NFE, NFE]
    near, far = everything.centered_residual
    assert near < far
    mixed = generate(lc, redi, model, settings, path, prompts, seeds, h=3, guard=float(np.sqrt(near * far)))
    assert mixed.corrected.tolist() == [True, False]
    # Per item: the corrected grid; the refused item spent the grid's first step, then all T steps from noise.
    assert mixed.evaluations.per_item().tolist() == [NFE, 1 + STEPS]
    assert mixed.learned.added == 1
    kb = redi.KnowledgeBase.open(str(path))
    assert ("prompt 1 changed", SEED) not in kb.entries and len(kb) == 5
    assert_stored_as_plain(redi, model, kb, ("prompt 9", SEED + 1000))
    torch.testing.assert_close(mixed.latent[1:], ksampler(model, "prompt 9", seed=SEED + 1000), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed.latent[:1], everything.latent[:1], rtol=1e-5, atol=1e-5)
    assert kb.verify() == []


def test_refuses_a_non_euler_recipe_missing_steps_and_a_grid_with_nothing_to_correct(lc, redi, model, tmp_path, pack):
    KBError = pack.kb_tools.core.errors.KBError
    path = tmp_path / "learned"
    with pytest.raises(KBError, match="use sampler 'euler' for the learning KB"):
        generate(lc, redi, model, settings_for(redi, model, "dpmpp_2m"), path, ["p"], [SEED])
    with pytest.raises(KBError, match=r"needs the learning KB to store steps \[1, 2, 6, 9\].*'1-9'"):
        generate(lc, redi, model, settings_for(redi, model, store=(3, 5, 7)), path, ["p"], [SEED])
    with pytest.raises(KBError, match=r"no segment the KB can correct .*choose nfe from 3 to 9"):
        generate(lc, redi, model, settings_for(redi, model), path, ["p"], [SEED], nfe=STEPS)
    assert not path.exists()  # refused before the KB was created or anything sampled
