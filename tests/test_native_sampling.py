"""ReDi inside ComfyUI's custom-sampling graph, on the real ComfyUI with tiny in-process models:
SamplerCustomAdvanced + ReDiKBNoise + SamplerReDi + a GUIDER against ReDiSampler and the plain
sampler, the latent-space round trips, the SIGMAS check, and batches whose items take
different paths (accepted and rejected, different prompts)."""
from __future__ import annotations

import pytest
import torch

from test_redi_nodes import CFG, SEED, STEPS, build, counted, ksampler

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def redi(pack):
    return pack.kb_tools


@pytest.fixture(scope="module")
def nodes(pack):
    return pack.nodes


@pytest.fixture(scope="module")
def custom():
    from comfy_extras import nodes_custom_sampler
    return nodes_custom_sampler


@pytest.fixture(scope="module")
def model():
    import tiny_models
    return tiny_models.make_tiny_model(0, "V_PREDICTION")


@pytest.fixture(scope="module")
def kb(redi, model, tmp_path_factory):
    """Ten prompts from SEED and SEED + 2 (so a batch with seeds SEED, SEED + 1, SEED + 2 mixes KB and foreign noise)."""
    return build(redi, model, tmp_path_factory.mktemp("kb") / "kb", [f"prompt {i}" for i in range(10)],
                 seeds=(SEED, SEED + 2))


def cond(*prompts):
    import tiny_models
    if len(prompts) == 1:
        return tiny_models.prompt_cond(prompts[0])
    return [[torch.cat([tiny_models.prompt_cond(p)[0][0] for p in prompts]), {}]]


def native(nodes, custom, guider, kb, latent, *, key=3, value=7, h=2, mode="lstsq", guard=-1.0, steps=STEPS,
           scheduler="normal", model=None, noise=None):
    """SamplerCustomAdvanced(ReDiKBNoise, guider, SamplerReDi, BasicScheduler) -> (latent, ReDiResult)."""
    sampler = nodes.custom_sampling.SamplerReDi.execute(knowledge_base=kb, key_step=key, value_step=value, neighbours=h,
                                                        weight_mode=mode, guard=guard).result[0]
    if noise is None:
        noise = nodes.custom_sampling.ReDiKBNoise.execute(knowledge_base=kb).result[0]
    sigmas = custom.BasicScheduler.execute(model=model if model is not None else guider.model_patcher,
                                           scheduler=scheduler, steps=steps, denoise=1.0).result[0]
    out = custom.SamplerCustomAdvanced.execute(noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                                               latent_image={"samples": latent}).result[0]["samples"]
    return out, sampler.extra_options["run"].result


def cfg_guider(custom, model, positive, negative=None, cfg=CFG):
    return custom.CFGGuider.execute(model=model, positive=positive, negative=negative or cond(""), cfg=cfg).result[0]


def redi_sampler(nodes, model, kb, positive, batch=1, **kw):
    import tiny_models
    args = dict(key_step=3, value_step=7, neighbours=2, weight_mode="lstsq", guard=-1.0, seed_mode="kb", seed=0)
    args.update(kw)
    return nodes.redi_sampler.ReDiSampler.execute(model=model, positive=positive, negative=cond(""), knowledge_base=kb,
                                          latent_image={"samples": tiny_models.empty_latent(batch)}, **args).result[0]["samples"]


def test_sampler_custom_advanced_reproduces_redi_sampler_exactly(nodes, custom, model, kb):
    import tiny_models
    positive = cond("prompt 3", "a prompt the KB lacks")
    expected = redi_sampler(nodes, model, kb, positive, batch=2)
    out, result = native(nodes, custom, cfg_guider(custom, model, positive), kb, tiny_models.empty_latent(2))
    assert torch.equal(out, expected)
    assert torch.equal(result.latent, out)
    assert result.accepted.tolist() == [True, True]  # KB seed noise for both items
    assert result.weights.shape == (2, 2) and result.neighbour_ids.shape == (2, 2)
    assert result.evaluations.per_item().tolist() == [STEPS - 4, STEPS - 4]
    assert "skipped 4 steps" in result.summary() and "fallback" in result.summary()


def test_runs_with_dual_cfg_guider(nodes, custom, model, kb):
    """DualCFGGuider with cond1 = cond2 is CFG on cond2: the same ReDi run as with CFGGuider."""
    import tiny_models
    positive = cond("prompt 5")
    dual = custom.DualCFGGuider.execute(model=model, cond1=positive, cond2=positive, negative=cond(""), cfg_conds=2.0,
                                        cfg_cond2_negative=CFG, style="regular").result[0]
    out, result = native(nodes, custom, dual, kb, tiny_models.empty_latent(1))
    reference, _ = native(nodes, custom, cfg_guider(custom, model, positive), kb, tiny_models.empty_latent(1))
    assert torch.isfinite(out).all() and result.accepted.tolist() == [True]
    assert (out - reference).abs().max().item() < 1e-4 * max(1.0, reference.abs().max().item())


@pytest.mark.parametrize("model_type", ["EPS", "V_PREDICTION", "FLOW"])
def test_own_trajectory_reproduces_the_plain_sampler_and_saves_v_minus_k(redi, nodes, custom, tmp_path, model_type):
    import tiny_models
    model = tiny_models.make_tiny_model(0, model_type)
    own = build(redi, model, tmp_path / "kb", ["a cat", "a dog", "a red car"])
    reference = ksampler(model, "a cat")
    counted_model, counter = counted(model)
    out, result = native(nodes, custom, cfg_guider(custom, counted_model, cond("a cat")), own, tiny_models.empty_latent(1),
                         key=3, value=7, h=1)
    assert (out - reference).abs().max().item() < 1e-4 * max(1.0, reference.abs().max().item())
    assert counter.count == STEPS - (7 - 3)  # counted by ComfyUI's post-CFG hook
    assert result.evaluations.per_item().tolist() == [STEPS - (7 - 3)]  # counted by the sampler
    assert result.neighbour_ids[0, 0] == 0 and result.centered_residual[0] < 1e-3


@pytest.mark.parametrize("model_type", ["EPS", "V_PREDICTION", "FLOW"])
def test_latent_space_round_trip(pack, model_type):
    import tiny_models
    cs = pack.kb_tools.comfy.model_facts
    model = tiny_models.make_tiny_model(0, model_type)
    sigmas = cs.schedule_sigmas(model, "euler", "normal", STEPS)
    x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0)) * 3
    for sigma in sigmas[1:-1]:  # every step a key or value can sit at (step 0 is pure noise: x / (1 - 1) for flow)
        latent = cs.to_latent_space(model, sigma, x)
        back = cs.from_latent_space(model, sigma, latent)
        assert torch.allclose(back, x, rtol=1e-5, atol=1e-5), (model_type, float(sigma))
    # The LATENT-dict space is what KSamplerAdvanced returns with leftover noise: for flow models x / (1 - sigma).
    if model_type == "FLOW":
        s = float(sigmas[3])
        assert torch.allclose(cs.to_latent_space(model, s, x), x / (1 - s) / model.model.latent_format.scale_factor,
                              rtol=1e-5)


def test_sigmas_that_are_not_the_kbs_schedule_are_refused_with_the_difference(pack, nodes, custom, model, kb):
    import tiny_models
    guider = cfg_guider(custom, model, cond("prompt 1"))
    with pytest.raises(pack.kb_tools.core.errors.KBMismatchError, match=r"steps: knowledge base has 10, SIGMAS has 8"):
        native(nodes, custom, guider, kb, tiny_models.empty_latent(1), steps=8)
    with pytest.raises(pack.kb_tools.core.errors.KBMismatchError, match=r"sigmas\[1\]: knowledge base has .*BasicScheduler"):
        native(nodes, custom, guider, kb, tiny_models.empty_latent(1), scheduler="karras")
    kb_sigmas = nodes.custom_sampling.ReDiKBSigmas.execute(knowledge_base=kb).result[0]
    assert kb_sigmas.tolist() == pytest.approx(kb.settings.sigmas)


def test_kb_noise_is_the_kbs_seed_noise_for_every_item(pack, nodes, kb):
    import comfy.sample
    import tiny_models
    noise = nodes.custom_sampling.ReDiKBNoise.execute(knowledge_base=kb).result[0]
    assert noise.seed == SEED
    drawn = noise.generate_noise({"samples": tiny_models.empty_latent(3)})
    one = comfy.sample.prepare_noise(tiny_models.empty_latent(1), SEED)
    assert all(torch.equal(drawn[i:i + 1], one) for i in range(3))


@pytest.mark.parametrize("path", ["sampler", "chain"])
def test_mixed_batch_gives_each_item_its_own_result(nodes, model, kb, path):
    """Items 0 and 2 start from KB noise and jump; item 1 (foreign noise) is sent back to plain sampling.
    Each has its own prompt; each must come out exactly as when it runs alone."""
    prompts = ["prompt 2", "prompt 4", "prompt 7"]
    run = redi_sampler if path == "sampler" else chain
    batch = run(nodes, model, kb, cond(*prompts), batch=3, seed_mode="custom", seed=SEED)
    alone = [run(nodes, model, kb, cond(p), batch=1, seed_mode="custom", seed=SEED + i) for i, p in enumerate(prompts)]
    for i in range(3):  # batched matmuls round differently: compare relative to the latent's scale
        assert (batch[i:i + 1] - alone[i]).abs().max().item() < 1e-5 * max(1.0, alone[i].abs().max().item()), i
    assert not torch.allclose(alone[0], alone[2], atol=1e-2)


class PerItemNoise:
    """A NOISE whose item i comes from seeds[i] (as ReDiSampler's seed_mode 'custom' draws it)."""

    def __init__(self, seeded_noise, seeds):
        self.seeded_noise, self.seeds, self.seed = seeded_noise, seeds, seeds[0]

    def generate_noise(self, input_latent):
        return self.seeded_noise(input_latent["samples"], self.seeds)


def test_mixed_batch_paths_and_counts(pack, nodes, custom, model, kb):
    import tiny_models
    guider = cfg_guider(custom, model, cond("prompt 2", "prompt 4", "prompt 7"))
    noise = PerItemNoise(pack.kb_tools.comfy.model_facts.seeded_noise, [SEED, SEED + 1, SEED + 2])
    _, result = native(nodes, custom, guider, kb, tiny_models.empty_latent(3), noise=noise)
    assert result.accepted.tolist() == [True, False, True]
    assert result.start_steps.tolist() == [7, 3, 7]
    assert result.evaluations.per_item().tolist() == [STEPS - 4, STEPS, STEPS - 4]
    assert "skipped 4 steps for 2 of 3 items" in result.summary()


def chain(nodes, model, kb, positive, batch=1, seed_mode="kb", seed=0):
    """ReDiPartialSample -> ReDiRetrieve -> ReDiBlend -> ReDiResumeSample."""
    import tiny_models
    n = nodes.redi_chain
    query = n.ReDiPartialSample.execute(model=model, positive=positive, negative=cond(""), knowledge_base=kb,
                                        latent_image={"samples": tiny_models.empty_latent(batch)}, key_step=3,
                                        seed_mode=seed_mode, seed=seed).result[0]
    found = n.ReDiRetrieve.execute(query_latent=query, knowledge_base=kb, neighbours=2).result[0]
    value = n.ReDiBlend.execute(neighbours=found, value_step=7, weight_mode="lstsq").result[0]
    return n.ReDiResumeSample.execute(model=model, positive=positive, negative=cond(""), value_latent=value,
                                      guard=-1.0).result[0]["samples"]


def test_chain_equals_redi_sampler(nodes, model, kb):
    positive = cond("prompt 6")
    assert (chain(nodes, model, kb, positive) - redi_sampler(nodes, model, kb, positive)).abs().max().item() < 1e-5


def test_weights_reported_are_the_weights_used(nodes, custom, model, kb):
    """The result carries the weights of the chosen mode (affine sums to 1), not least squares whatever the mode."""
    import numpy as np
    import tiny_models
    guider = cfg_guider(custom, model, cond("a prompt the KB lacks"))
    affine_out, affine = native(nodes, custom, guider, kb, tiny_models.empty_latent(1), mode="affine", h=3, guard=100.0)
    lstsq_out, lstsq = native(nodes, custom, guider, kb, tiny_models.empty_latent(1), mode="lstsq", h=3, guard=100.0)
    assert np.array_equal(affine.neighbour_ids, lstsq.neighbour_ids)
    assert affine.weight_mode == "affine" and abs(affine.weights.sum() - 1.0) < 1e-9
    assert abs(lstsq.weights.sum() - 1.0) > 1e-6
    assert not torch.allclose(affine_out, lstsq_out)


def test_no_calibration_runs_during_a_generation(nodes, custom, model, kb):
    import tiny_models
    assert kb.calibration(3) is None
    _, result = native(nodes, custom, cfg_guider(custom, model, cond("prompt 1")), kb, tiny_models.empty_latent(1))
    assert result.guard.source == "fallback" and result.guard.threshold == 0.5
    assert "python -m kb_tools calibrate" in result.summary()
    assert kb.calibration(3) is None
