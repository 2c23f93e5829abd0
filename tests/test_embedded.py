"""The embedded crops models: shipped weights load into real ComfyUI models and follow their
captions (judged by the shipped judge CNN), the toy text encoder refuses what it cannot read,
the data renders what captions ask for, and the demo runs end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from embedded import captions, judge, models as embedded_models, rendering, text_encoder

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def comfy(comfy_root):
    embedded_models.setup_comfy()


@pytest.fixture(scope="module")
def models(comfy):
    return embedded_models.load_models()


def _sample(model, prompts, seeds, steps=10, cfg=3.0):
    from embedded.train import generate

    return generate(model, prompts, seeds, cfg=cfg, steps=steps)


def _source_hits(latents, caps) -> float:
    return float((judge.read(latents).source == np.array([c.source for c in caps])).mean())


def test_judge_reads_real_heldout_crops(comfy):
    """The judge is what every quality number rests on: it must read real held-out crops well."""
    from embedded.train import judge_quality

    q = judge_quality(count=400)
    assert q["source_accuracy"] >= 0.8, q
    assert q["sepia_mae"] <= 0.15, q


def test_shipped_weights_follow_their_captions(models):
    large, small, _ = models
    caps = captions.sample_captions(24, "heldout")
    prompts = [c.prompt() for c in caps]
    latents = _sample(large, prompts, list(range(24)))
    assert latents.shape == (24, 3, 16, 16)
    assert bool(np.isfinite(latents.numpy()).all())
    assert _source_hits(latents, caps) >= 0.6
    # the small (T-Stitch) model is weaker but must follow captions too
    assert _source_hits(_sample(small, prompts, list(range(24))), caps) >= 0.4


def test_random_weights_fail_the_same_check(models):
    """The check above means something: an untrained network does not draw the captioned source."""
    model = embedded_models.build_model("small", seed=123)
    with torch.no_grad():  # init_weights zeroes the last conv; give it random weights too
        last = model.model.diffusion_model.out[-1]
        last.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    caps = captions.sample_captions(24, "heldout")
    assert _source_hits(_sample(model, [c.prompt() for c in caps], list(range(24))), caps) <= 0.3


def test_sepia_caption_changes_the_tone(models):
    """The style axis works in the model: 'sepia 1.00' reads as sepia to the judge, 'sepia 0' does not."""
    large, _, _ = models
    caps = [c.with_sepia(0.0) for c in captions.sample_captions(16, "heldout")]
    plain = _sample(large, [c.prompt() for c in caps], list(range(16)))
    toned = _sample(large, [c.with_sepia(1.0).prompt() for c in caps], list(range(16)))
    assert judge.read(toned).sepia.mean() > judge.read(plain).sepia.mean() + 0.4


def test_v_target_inverts_comfy_calculate_denoised(models):
    from embedded.train import check_target

    large, _, _ = models
    assert check_target(large.model.model_sampling, atol=1e-4) < 1e-4


def test_captions_round_trip_and_bad_prompts():
    cap = captions.parse_prompt("cat at 0.40 0.62 size 0.35 sepia 0.80")
    assert (cap.name, cap.cx, cap.cy, cap.size, cap.sepia) == ("cat", 0.4, 0.62, 0.35, 0.8)
    assert captions.parse_prompt(cap.prompt()) == cap
    assert captions.parse_prompt("Digit 7") == captions.Caption(7)
    assert captions.parse_prompt("") is None
    for caption in captions.sample_captions(50, "train") + captions.sample_captions(50, "heldout"):
        assert captions.parse_prompt(caption.prompt()) == caption
    assert set(captions.sample_captions(50, "train")).isdisjoint(captions.sample_captions(50, "heldout"))
    for bad, match in (("a photo of a cat", "cannot read the prompt"), ("digit 12", "cannot read the prompt"),
                       ("cat at 1.5 0.2", r"cx must be in \[0, 1\]"), ("digit 3 size 0.2", r"size must be in \[0.5, 1.0\]"),
                       ("cat sepia 2", r"sepia must be in \[0, 1\]")):
        with pytest.raises(captions.PromptError, match=match):
            text_encoder.encode(bad)


def _hash(lines) -> str:
    import hashlib

    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def test_caption_splits_are_the_ones_the_shipped_results_were_made_with():
    """Pinned draws (recorded before the caption distribution was written once for both streams).

    The train split feeds every knowledge base, the held-out split every query, and the torch
    stream the shipped models' training: any change of a draw would silently change them all.
    """
    assert [c.prompt() for c in captions.sample_captions(4, "train")] == [
        "digit 8 at 0.31 0.42 size 0.97 sepia 0.95", "digit 9 at 0.16 0.80 size 0.76",
        "cat at 0.82 0.05 size 0.34 sepia 0.28", "digit 8 at 0.84 0.10 size 0.55 sepia 0.91"]
    assert [c.prompt() for c in captions.sample_captions(4, "heldout")] == [
        "coins at 0.09 0.60 size 0.26", "digit 5 at 0.04 0.48 size 0.90 sepia 0.97",
        "digit 9 at 0.69 0.58 size 0.90 sepia 0.62", "flower at 0.17 0.07 size 0.39"]
    assert [c.prompt() for c in captions.sample_captions(3, "heldout", offset=100)] == [
        "digit 0 at 0.72 0.77 size 0.62 sepia 0.43", "cat at 0.54 0.04 size 0.29", "digit 4 at 0.85 0.27 size 0.63 sepia 0.65"]
    assert [c.prompt() for c in captions.sample_captions(3, "train", sepia="full", offset=7)] == [
        "galaxy at 0.34 0.87 size 0.48 sepia 1.00", "digit 0 at 0.37 0.71 size 0.96 sepia 1.00",
        "digit 4 at 0.14 0.96 size 0.71 sepia 1.00"]
    assert [c.prompt() for c in captions.sample_captions(3, "train", sepia="none", offset=7)] == [
        "galaxy at 0.34 0.87 size 0.48", "digit 0 at 0.37 0.71 size 0.96", "digit 4 at 0.14 0.96 size 0.71"]
    assert _hash(c.prompt() for c in captions.sample_captions(20000, "train")) == "02abe22c5459ae78"
    assert _hash(c.prompt() for c in captions.sample_captions(2000, "heldout")) == "baf1f3c1de23f5c7"
    gen = torch.Generator().manual_seed(5)
    drawn = captions.random_training_captions(6, gen)
    assert [(c.source, repr(c.cx), repr(c.cy), repr(c.size), repr(c.sepia)) for c in drawn[1:3]] == [
        (14, "0.16439151763916016", "0.7379193902015686", "0.15977112169909066", "0.0"),
        (5, "0.07241219282150269", "0.6593389511108398", "0.8207448830477083", "0.0")]
    assert repr(drawn[5].sepia) == "0.796462893486023"
    gen = torch.Generator().manual_seed(1)
    assert _hash(repr(c) for c in captions.random_training_captions(512, gen)) == "3f7c78e5865fbb3a"
    assert float(torch.rand(1, generator=gen)) == pytest.approx(0.1126, abs=1e-4)  # the generator's stream moved on as before


def test_encode_shapes():
    cond = text_encoder.encode("coffee at 0.5 0.5 size 0.5")
    assert cond[0][0].shape == (1, text_encoder.CONTEXT_TOKENS, text_encoder.CONTEXT_DIM) and cond[0][1] == {}
    assert not np.allclose(text_encoder.encode("")[0][0].numpy(), cond[0][0].numpy())
    assert not np.allclose(text_encoder.encode("coffee at 0.5 0.5 size 0.5 sepia 1")[0][0].numpy(), cond[0][0].numpy())


def test_render_follows_the_caption():
    """Real data: a larger crop of the same place is a zoomed-out view; sepia keeps luminance order."""
    gen = torch.Generator().manual_seed(0)
    whole = captions.parse_prompt("astronaut at 0.5 0.5 size 1.0")
    x, geo = rendering.render([whole, whole.with_sepia(1.0)], gen, jitter=False)
    assert x.shape == (2, 3, 16, 16) and float(x.min()) >= -1 and float(x.max()) <= 1
    assert torch.allclose(geo[0], torch.tensor([0.5, 0.5, 1.0]))
    lum = lambda t: (t * torch.tensor([0.299, 0.587, 0.114]).reshape(3, 1, 1)).sum(0).flatten()  # noqa: E731
    corr = np.corrcoef(lum(x[0]).numpy(), lum(x[1]).numpy())[0, 1]
    assert corr > 0.9
    # the sepia image has no blue-dominant pixels (sepia is warm), the original astronaut suit does
    assert bool(((x[1, 2] > x[1, 0]).float().mean() < 0.05))


def test_missing_weights_name_the_file_and_the_fix(comfy, tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(embedded_models.WeightsError) as info:
        embedded_models.load_models(large_path=missing)
    assert str(missing) in str(info.value) and "python -m embedded.train --model large" in str(info.value)


def test_demo_runs_end_to_end(comfy, tmp_path, capsys):
    from embedded import demo

    tiny = ["--output", str(tmp_path), "--captions", "6", "--seeds", "2", "--queries", "2",
            "--steps", "10", "--key", "3", "--value", "5", "--store-steps", "3-6",
            "--calibrated-nfe", "4", "--teachers", "8", "--teacher-steps", "20", "--search-sweeps", "0"]
    results = demo.main(tiny)
    png = tmp_path / "demo_grid.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as img:
        assert img.width > 11 * 64 and img.height > 2 * 64  # 7 ReDi/T-Stitch columns + 4 calibrated
    assert results["kb"]["entries"] == 6 * 2
    saved = json.loads((tmp_path / "demo_results.json").read_text())
    for protocol in ("KB seed", "foreign seed"):
        methods = saved["protocols"][protocol]["methods"]
        assert len(methods) == 4 and all(m["finite"] for m in methods.values())
        assert saved["protocols"][protocol]["redi_summary"].startswith("ReDi:")
    # the calibrated sampler beside the best built-in choice and euler at 4 counted NFE, on fresh seeds, vs converged
    calibrated = saved["calibrated_sampler"]
    assert calibrated["nfe"] == 4 and all(s >= demo.FRESH_SEED_BASE for s in calibrated["seeds"])
    assert len(calibrated["methods"]) == 3
    assert all(m["nfe"] == 4 and m["finite"] and m["mse_to_converged"] >= 0 for m in calibrated["methods"].values())
    assert calibrated["summary_line"].startswith("best for this model at 4 steps:")
    assert calibrated["calibration"]["reused"] is False
    out = capsys.readouterr().out
    assert "MSE->full" in out and "ReDi:" in out and "T-Stitch:" in out
    assert "MSE->converged" in out and "[calibrated] best for this model at 4 steps:" in out
    assert results["kb"]["added"] == 12
    # a second run resumes: nothing to add, the stored sampler calibration is reused
    again = demo.main(tiny)
    assert again["kb"]["added"] == 0 and again["calibrated_sampler"]["calibration"]["reused"] is True


def test_shipped_files_stay_small_and_documented():
    """The issue's budget: at most 20 MB of weights in the repo, each file named in the model card."""
    from pathlib import Path

    weights = Path(__file__).resolve().parent.parent / "embedded" / "weights"
    shipped = sorted(p for p in weights.glob("*.safetensors") if not p.name.endswith(".fp32.safetensors"))
    assert {p.name for p in shipped} == {"crops_large.safetensors", "crops_small.safetensors", "crops_judge.safetensors"}
    assert sum(p.stat().st_size for p in shipped) <= 20e6
    card = (weights.parent / "MODEL_CARD.md").read_text()
    assert all(f"weights/{p.name}" in card for p in shipped)


def test_missing_photo_package_names_the_package_and_the_fix(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(rendering.DataError, match=r"scikit-image package.*scripts/env\.sh"):
        rendering._package_file("skimage", "data/astronaut.png")
