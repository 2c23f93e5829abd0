"""What the ReDi nodes put on the canvas (their V3 `ui` output), with tiny real models and a real TAESD VAE.

The page side (the summary box, the refreshed KB list) is checked in a real browser by
test_frontend_browser.py; here: the ui dicts the nodes return and the preview files they write.
"""
from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.comfy

STEPS = 10
SEED = 7
PROMPTS = ["a cat", "a dog", "a red car", "a lighthouse"]


@pytest.fixture(scope="module")
def nodes(pack):
    """The ReDi node classes, loaded as ComfyUI loads the pack."""
    return pack.nodes


@pytest.fixture(scope="module")
def model():
    import tiny_models
    return tiny_models.make_tiny_model(0, "EPS")


@pytest.fixture(scope="module")
def built(pack, model, tmp_path_factory):
    """A BuildReport: four prompts, one seed, steps 3, 5 and 7 of 10 stored."""
    import tiny_models
    redi = pack.kb_tools
    spec = redi.BuildSpec(prompts=PROMPTS, seeds=[SEED], recipe=redi.Recipe("euler", "normal", STEPS, 3.0),
                          store_steps=[3, 5, 7], latent_shape=(4, 8, 8), dtype="float32")
    return redi.build_knowledge_base(str(tmp_path_factory.mktemp("kb") / "feedback-kb"), model, tiny_models.prompt_cond, spec)


@pytest.fixture
def temp_dir(tmp_path):
    """ComfyUI's temp folder (where preview images go) redirected into the test's own folder."""
    import folder_paths
    old = folder_paths.get_temp_directory()
    folder_paths.set_temp_directory(str(tmp_path))
    try:
        yield tmp_path
    finally:
        folder_paths.set_temp_directory(old)


@pytest.fixture(scope="module")
def taesd_vae():
    """A real ComfyUI VAE (TAESD architecture, 4 latent channels) with seeded random weights."""
    import comfy.sd
    import comfy.taesd.taesd
    net = comfy.taesd.taesd.TAESD(latent_channels=4)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # ComfyUI's ops leave conv weights uninitialised; scalars (latent scale/shift) keep their values
        for p in net.parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            elif p.ndim == 1:
                p.zero_()
    return comfy.sd.VAE(sd=net.state_dict())


def run_sampler(nodes, model, kb, prompt, batch=2, **kw):
    import tiny_models
    args = dict(model=model, positive=tiny_models.prompt_cond(prompt), negative=tiny_models.prompt_cond(""),
                latent_image={"samples": tiny_models.empty_latent(batch)}, knowledge_base=kb, key_step=3, value_step=7,
                neighbours=2, weight_mode="lstsq", guard=-1.0, seed_mode="kb", seed=0)
    args.update(kw)
    return nodes.redi_sampler.ReDiSampler.execute(**args)


def test_build_shows_counts_size_and_names_the_kb(pack, built):
    ui = pack.nodes.feedback.build_ui(built, "feedback-kb")
    assert ui["redi_kb"] == ["feedback-kb"]
    text = ui["text"][0]
    assert text.splitlines()[0].startswith(f"'feedback-kb': {len(PROMPTS)} trajectories, ")
    assert text.splitlines()[1] == built.summary()
    assert f"added {len(PROMPTS)} trajectories (0 were already there), {len(PROMPTS)} in total" in text
    size = sum(p.stat().st_size for p in (Path(built.kb.path) / "shards").glob("*.safetensors"))
    assert f"{size / 2**10:.0f} KB on disk" in text or f"{size / 2**20:.1f} MB on disk" in text
    assert "stored steps [3, 5, 7] of 10" in text


def test_sampler_shows_skipped_steps_per_item(nodes, model, built):
    out = run_sampler(nodes, model, built.kb, "a cat", guard=100.0)
    lines = out.ui["text"][0].splitlines()
    assert lines[0].startswith("ReDi: skipped 4 steps for all 2 item(s)")
    assert lines[1].startswith("item 0: skipped 4 steps (residual ") and "<= guard 100.000" in lines[1]
    assert lines[2].startswith("item 1: skipped 4 steps")
    assert out.result[0]["samples"].shape == (2, 4, 8, 8)


def test_sampler_shows_the_guard_falling_back(nodes, model, built):
    out = run_sampler(nodes, model, built.kb, "a cat", seed_mode="custom", seed=123456, guard=0.0)
    text = out.ui["text"][0]
    assert "guard fell back to plain sampling for all 2 item(s)" in text
    assert "item 0: fell back to plain sampling (residual " in text and "> guard 0.000" in text


def test_resume_node_shows_the_same_summary(nodes, model, built):
    import tiny_models
    pos, neg = tiny_models.prompt_cond("a dog"), tiny_models.prompt_cond("")
    query = nodes.redi_chain.ReDiPartialSample.execute(model=model, positive=pos, negative=neg, latent_image={"samples": tiny_models.empty_latent(1)},
                                            knowledge_base=built.kb, key_step=3, seed_mode="kb", seed=0).result[0]
    neighbours = nodes.redi_chain.ReDiRetrieve.execute(query_latent=query, knowledge_base=built.kb, neighbours=2).result[0]
    value = nodes.redi_chain.ReDiBlend.execute(neighbours=neighbours, value_step=5, weight_mode="lstsq").result[0]
    out = nodes.redi_chain.ReDiResumeSample.execute(model=model, positive=pos, negative=neg, value_latent=value, guard=100.0)
    text = out.ui["text"][0]
    assert text.startswith("ReDi: skipped 2 steps for all 1 item(s)")
    assert "item 0: skipped 2 steps" in text


def test_retrieve_lists_the_matched_prompts_without_a_vae(nodes, model, built, temp_dir, caplog):
    import tiny_models
    pos, neg = tiny_models.prompt_cond("a dog"), tiny_models.prompt_cond("")
    query = nodes.redi_chain.ReDiPartialSample.execute(model=model, positive=pos, negative=neg, latent_image={"samples": tiny_models.empty_latent(1)},
                                            knowledge_base=built.kb, key_step=3, seed_mode="kb", seed=0).result[0]
    with caplog.at_level(logging.INFO, logger="ReDi"):
        out = nodes.redi_chain.ReDiRetrieve.execute(query_latent=query, knowledge_base=built.kb, neighbours=3)
    text = out.ui["text"][0]
    # Its own trajectory is in the KB: the nearest neighbour is "a dog" with the KB seed, at distance ~0.
    assert "  1. #1 'a dog' seed 7, distance " in text
    assert sum(line.startswith("  ") for line in text.splitlines()) == 3
    assert "images" not in out.ui and not list(temp_dir.iterdir())
    # One prefix in the console (it used to read "ReDi: ReDi retrieve: ...").
    assert any(r.getMessage().startswith("ReDi retrieve: step 3, 1 query, H=3") for r in caplog.records)
    assert not any("ReDi: ReDi" in r.getMessage() for r in caplog.records)


def test_retrieve_with_a_vae_shows_the_neighbours_as_images(pack, nodes, model, built, temp_dir, taesd_vae):
    import tiny_models
    from PIL import Image
    pos, neg = tiny_models.prompt_cond("a car"), tiny_models.prompt_cond("")
    query = nodes.redi_chain.ReDiPartialSample.execute(model=model, positive=pos, negative=neg, latent_image={"samples": tiny_models.empty_latent(2)},
                                            knowledge_base=built.kb, key_step=3, seed_mode="kb", seed=0).result[0]
    out = nodes.redi_chain.ReDiRetrieve.execute(query_latent=query, knowledge_base=built.kb, neighbours=3, vae=taesd_vae)
    images = out.ui["images"]
    assert len(images) == 6  # 2 items x 3 neighbours
    for image in images:
        assert image["type"] == "temp"
        with Image.open(temp_dir / image["subfolder"] / image["filename"]) as im:
            assert im.size == (64, 64)  # 8x8 latents, TAESD upscales by 8
    assert "the first 6 neighbour(s) at stored step 7 of 10" in out.ui["text"][0]
    # The images are the stored step-7 latents of the listed neighbours, decoded.
    ids = out.result[0].nearest.ids.reshape(-1)
    expected = pack.nodes.feedback.decode_previews(taesd_vae, torch.from_numpy(built.kb.latents(7, ids)))
    with Image.open(temp_dir / images[0]["subfolder"] / images[0]["filename"]) as im:
        first = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)
    assert (first - expected[0]).abs().max().item() <= 1.0 / 255 + 1e-6


def test_preview_count_is_capped(pack, built):
    many = SimpleNamespace(nearest=SimpleNamespace(ids=np.zeros((10, 4), dtype=np.int64)))
    assert pack.nodes.feedback.neighbour_latents(built.kb, many).shape[0] == pack.nodes.feedback.MAX_PREVIEW_IMAGES
