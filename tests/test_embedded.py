"""The embedded digits models: shipped weights load into real ComfyUI models and draw the prompted
digit, the toy text encoder refuses what it cannot read, and the demo runs end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def digits(comfy_root):
    from embedded import digits as D

    D.setup_comfy()
    return D


@pytest.fixture(scope="module")
def models(digits):
    return digits.load_models()


def _sample(model, encode, labels, seeds, steps=10, cfg=2.5):
    from embedded.train import generate

    return generate(model, encode, labels, seeds, cfg=cfg, steps=steps)


def test_shipped_weights_draw_the_prompted_digit(digits, models):
    large, small, encode = models
    latents = _sample(large, encode, [3] * 8, list(range(8)))
    assert latents.shape == (8, 1, 16, 16)
    assert bool(np.isfinite(latents.numpy()).all())
    predicted = digits.classify(latents)
    assert (predicted == 3).sum() >= 6, f"judge read {predicted.tolist()} for 8 samples of 'digit 3'"
    # the small (T-Stitch) model is weaker but must know its digits too
    small_latents = _sample(small, encode, [3] * 8, list(range(8)))
    assert (digits.classify(small_latents) == 3).sum() >= 5


def test_random_weights_fail_the_same_check(digits, models):
    """The check above means something: an untrained network does not draw the prompted digits."""
    import torch

    _, _, encode = models
    model = digits.build_model("small", seed=123)
    with torch.no_grad():  # init_weights zeroes the last conv; give it random weights too
        last = model.model.diffusion_model.out[-1]
        last.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    labels = list(range(10))
    predicted = digits.classify(_sample(model, encode, labels, list(range(10))))
    assert (predicted == np.array(labels)).mean() <= 0.4


def test_v_target_inverts_comfy_calculate_denoised(digits, models):
    from embedded.train import check_target

    large, _, _ = models
    assert check_target(large.model.model_sampling, atol=1e-4) < 1e-4


def test_encode_shapes_and_bad_prompt(digits, models):
    _, _, encode = models
    cond = encode("digit 7")
    assert cond[0][0].shape == (1, digits.CONTEXT_TOKENS, digits.CONTEXT_DIM) and cond[0][1] == {}
    assert not np.allclose(encode("")[0][0].numpy(), cond[0][0].numpy())
    assert encode("Digit 7")[0][0].equal(cond[0][0])
    for bad in ("a photo of a cat", "digit 12", "digit three"):
        with pytest.raises(digits.PromptError, match=r"only knows 'digit 0' \.\. 'digit 9'"):
            encode(bad)


def test_missing_weights_name_the_file_and_the_fix(digits, tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(digits.WeightsError) as info:
        digits.load_models(large_path=missing)
    assert str(missing) in str(info.value) and "python -m embedded.train --model large" in str(info.value)


def test_demo_runs_end_to_end(digits, tmp_path, capsys):
    from embedded import demo

    tiny = ["--output", str(tmp_path), "--prompts", "3", "--seeds", "4", "--queries", "2",
            "--steps", "10", "--key", "3", "--value", "5", "--store-steps", "3-6"]
    results = demo.main(tiny)
    png = tmp_path / "demo_grid.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as img:
        assert img.width > 7 * 64 and img.height > 2 * 64
    assert results["kb"]["entries"] == 3 * 4 - 2
    saved = json.loads((tmp_path / "demo_results.json").read_text())
    for protocol in ("KB seed", "foreign seed"):
        methods = saved["protocols"][protocol]["methods"]
        assert len(methods) == 4 and all(m["finite"] for m in methods.values())
        assert saved["protocols"][protocol]["redi_summary"].startswith("ReDi:")
    out = capsys.readouterr().out
    assert "MSE->full" in out and "ReDi:" in out and "T-Stitch:" in out
    assert results["kb"]["added"] == 10
