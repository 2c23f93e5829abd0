"""T-Stitch with ReDi: the key trajectory runs on a small model, so a query costs fewer
large-model evaluations. Real ComfyUI, tiny in-process models, counts through model clones."""
from __future__ import annotations

import pytest
import torch

from test_redi_nodes import CFG, SEED, STEPS, counted

pytestmark = pytest.mark.comfy

STITCH = 4  # the small model runs steps 0..3 of KB trajectories and queries


@pytest.fixture(scope="module")
def models():
    import tiny_models
    large = tiny_models.make_tiny_model(0, "V_PREDICTION", model_channels=64)
    small = tiny_models.make_tiny_model(5, "V_PREDICTION", model_channels=32, channel_mult=(1,))
    return large, small


def build_stitched(redi, large, small, path, prompts):
    import tiny_models
    spec = redi.BuildSpec(prompts=prompts, seeds=[SEED], recipe=redi.Recipe("euler", "normal", STEPS, CFG),
                          store_steps=[3, 6, 8], latent_shape=(4, 8, 8), dtype="float32", stitch_step=STITCH)
    return redi.build_knowledge_base(str(path), large, tiny_models.prompt_cond, spec, key_model=small)


def test_kb_records_the_key_model_and_its_build_counts_both_models(pack, models, tmp_path):
    redi = pack.kb_tools
    large, small = models
    report = build_stitched(redi, large, small, tmp_path / "kb", ["a cat", "a dog"])
    settings = report.kb.settings
    assert settings.key_model_fingerprint is not None
    assert settings.key_model_fingerprint["arch_sha256"] != settings.model_fingerprint["arch_sha256"]
    assert settings.extra["stitch_step"] == STITCH
    # One evaluation per step and trajectory up to the last stored step (8): 4 small, 5 large, for 2 trajectories.
    assert report.key_model_evaluations == 2 * STITCH
    assert report.evaluations == 2 * (8 + 1 - STITCH)


def test_redi_with_small_model_keys_counts_large_model_calls(pack, models, tmp_path):
    import tiny_models
    redi, nodes = pack.kb_tools, pack.nodes.redi_sampler
    large, small = models
    kb = build_stitched(redi, large, small, tmp_path / "kb", ["a cat", "a dog", "a red car"]).kb
    large_counted, large_calls = counted(large)
    small_counted, small_calls = counted(small)
    pos, neg = tiny_models.prompt_cond("a dog"), tiny_models.prompt_cond("")
    out = nodes.ReDiSampler.execute(model=large_counted, positive=pos, negative=neg,
                                    latent_image={"samples": tiny_models.empty_latent(1)}, knowledge_base=kb,
                                    key_step=3, value_step=6, neighbours=1, weight_mode="lstsq", guard=-1.0,
                                    seed_mode="kb", seed=0, small_model=small_counted).result[0]["samples"]
    assert torch.isfinite(out).all()
    # Key step 3 lies inside the small model's share: steps 0-2 on the small model, none on the
    # large one before retrieval; after the jump to step 6 the large model runs steps 6-9.
    assert small_calls.count == 3
    assert large_calls.count == STEPS - 6

    # The query is the KB's own trajectory, so the result equals the stitched full run.
    full = pack.kb_tools.comfy.plain.sample_prompts(large, tiny_models.prompt_cond, ["a dog"], [SEED],
                                              redi.Recipe("euler", "normal", STEPS, CFG), latent_shape=(4, 8, 8),
                                              key_model=small, stitch_step=STITCH).latents
    assert (out - full).abs().max().item() < 1e-4


def test_kb_with_small_model_keys_refuses_a_query_without_it(pack, models, tmp_path):
    import tiny_models
    redi, nodes = pack.kb_tools, pack.nodes.redi_sampler
    large, small = models
    kb = build_stitched(redi, large, small, tmp_path / "kb", ["a cat"]).kb
    with pytest.raises(pack.kb_tools.core.errors.KBMismatchError, match="small_model input"):
        nodes.ReDiSampler.execute(model=large, positive=tiny_models.prompt_cond("a"), negative=tiny_models.prompt_cond(""),
                                  latent_image={"samples": tiny_models.empty_latent(1)}, knowledge_base=kb, key_step=3,
                                  value_step=6, neighbours=1, weight_mode="lstsq", guard=-1.0, seed_mode="kb", seed=0)
    other_small = tiny_models.make_tiny_model(9, "V_PREDICTION", model_channels=32, channel_mult=(1,))
    with pytest.raises(pack.kb_tools.core.errors.KBMismatchError, match="small model weights differ"):
        nodes.ReDiSampler.execute(model=large, positive=tiny_models.prompt_cond("a"), negative=tiny_models.prompt_cond(""),
                                  latent_image={"samples": tiny_models.empty_latent(1)}, knowledge_base=kb, key_step=3,
                                  value_step=6, neighbours=1, weight_mode="lstsq", guard=-1.0, seed_mode="kb", seed=0,
                                  small_model=other_small)
