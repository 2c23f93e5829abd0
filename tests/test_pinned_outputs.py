"""Pinned outputs: the latents every sampler of the pack returns for fixed inputs on a tiny real model.

Written before the code was moved into rooms, so a reorganisation that changes behaviour fails here.
Regenerate the fixture only for an intended behaviour change: REDI_REPIN=1 bash scripts/test.sh tests/test_pinned_outputs.py
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.comfy

FIXTURE = Path(__file__).parent / "fixtures" / "pinned_outputs.safetensors"
STEPS, CFG, SEED = 10, 3.0, 7
PROMPTS = ["a cat", "a dog", "a red car", "a blue boat"]


@pytest.fixture(scope="module")
def api(pack):
    return pack.kb_tools


@pytest.fixture(scope="module")
def node(pack):
    """Node classes by their public node id (the pack's extension list, wherever the class lives)."""
    import asyncio
    classes = asyncio.run(pack.nodes.ReDiExtension().get_node_list())
    by_id = {cls.define_schema().node_id: cls for cls in classes}
    return by_id.__getitem__


@pytest.fixture(scope="module")
def model():
    import tiny_models
    return tiny_models.make_tiny_model(0, "EPS")


@pytest.fixture(scope="module")
def kb(api, model, tmp_path_factory):
    import tiny_models
    spec = api.BuildSpec(prompts=PROMPTS, seeds=[SEED], recipe=api.Recipe("euler", "normal", STEPS, CFG),
                           store_steps=list(range(1, STEPS)), latent_shape=(4, 8, 8), dtype="float32")
    return api.build_knowledge_base(str(tmp_path_factory.mktemp("pin") / "kb"), model, tiny_models.prompt_cond, spec).kb


def cond(text):
    import tiny_models
    return tiny_models.prompt_cond(text)


def custom_advanced(node, model, kb, sampler, prompt="a cat and a dog"):
    from comfy_extras import nodes_custom_sampler as custom
    import tiny_models
    guider = custom.CFGGuider.execute(model=model, positive=cond(prompt), negative=cond(""), cfg=CFG).result[0]
    sigmas = node("ReDiKBSigmas").execute(knowledge_base=kb).result[0]
    return custom.SamplerCustomAdvanced.execute(noise=custom.RandomNoise.execute(noise_seed=SEED).result[0], guider=guider,
                                                sampler=sampler, sigmas=sigmas,
                                                latent_image={"samples": tiny_models.empty_latent(1)}).result[0]["samples"]


def outputs(api, node, model, kb, tmp_path) -> dict[str, torch.Tensor]:
    import tiny_models
    out = {}
    out["redi_sampler"] = node("ReDiSampler").execute(
        model=model, positive=cond("a cat and a dog"), negative=cond(""), latent_image={"samples": tiny_models.empty_latent(1)},
        knowledge_base=kb, key_step=3, value_step=6, neighbours=2, weight_mode="lstsq", guard=100.0, seed_mode="kb",
        seed=0, resume_positive=None).result[0]["samples"]
    redi_sampler = node("SamplerReDi").execute(knowledge_base=kb, key_step=3, value_step=6, neighbours=3,
                                               weight_mode="lstsq", guard=100.0).result[0]
    out["sampler_redi"] = custom_advanced(node, model, kb, redi_sampler)
    corrected = node("SamplerReDiCorrected").execute(knowledge_base=kb, nfe=4, grid="auto", neighbours=2,
                                                     weight_mode="lstsq").result[0]
    out["sampler_corrected"] = custom_advanced(node, model, kb, corrected)

    small = tiny_models.make_tiny_model(1, "EPS")
    out["tstitch"] = node("TStitchSampler").execute(
        small_model=small, large_model=model, latent_image={"samples": tiny_models.empty_latent(1)}, seed=SEED,
        sampler_name="euler", scheduler="normal", steps=STEPS, cfg=CFG, switch_mode="fraction", small_fraction=0.4,
        switch_sigma=1.0, small_positive=cond("a fox"), small_negative=cond(""), large_positive=cond("a fox"),
        large_negative=cond("")).result[0]["samples"]

    redi = api
    recipe = api.Recipe("euler", "normal", STEPS, CFG)
    settings = redi.learning_settings(model, recipe, list(range(1, STEPS)), (4, 8, 8))
    prompts = ["a cat", "a cat"]
    positive = redi.batch_conditioning([cond(p) for p in prompts])
    negative = redi.batch_conditioning([cond("")] * 2)
    for name, solver in (("learning_redi", "redi"), ("learning_corrected", "corrected")):
        path = str(tmp_path / name)
        for round_ in range(2):  # the first round learns, the second is served by the KB
            if solver == "redi":
                result = redi.generate_learning(path, settings, model, positive, negative, tiny_models.empty_latent(2),
                                                prompts, [SEED, SEED + 1], key_step=2, value_step=6, neighbours=1,
                                                guard=100.0, dtype="float32")
            else:
                result = api.generate_learning_corrected(
                    path, settings, model, positive, negative, tiny_models.empty_latent(2), prompts, [SEED, SEED + 1],
                    nfe=4, neighbours=1, guard=100.0, dtype="float32")
            out[f"{name}_{round_}"] = result.latent
    return {k: v.detach().float().contiguous().cpu() for k, v in out.items()}


def test_every_sampler_returns_the_pinned_latents(api, node, model, kb, tmp_path):
    got = outputs(api, node, model, kb, tmp_path)
    if os.environ.get("REDI_REPIN") == "1":
        FIXTURE.parent.mkdir(parents=True, exist_ok=True)
        save_file(got, str(FIXTURE))
    pinned = load_file(str(FIXTURE))
    assert sorted(got) == sorted(pinned)
    for name, latent in got.items():
        ref = pinned[name]
        assert latent.shape == ref.shape, name
        scale = max(1.0, ref.abs().max().item())
        assert (latent - ref).abs().max().item() <= 1e-4 * scale, name
