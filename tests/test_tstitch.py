"""T-Stitch on real ComfyUI with tiny in-process models: split, exact limits, refusal of mismatched pairs."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import PACK_DIR

pytestmark = pytest.mark.comfy

STEPS = 10
SEED = 1234
CFG = 5.0
SMALL_CTX, LARGE_CTX = 32, 64


@pytest.fixture(scope="module")
def tm(comfy_root):
    import tiny_models

    return tiny_models


@pytest.fixture(scope="module")
def models(tm):
    """A small and a large EPS model of one 'family' (same schedule), with different context sizes."""
    small = tm.make_tiny_model(seed=1, model_channels=32, channel_mult=(1,), context_dim=SMALL_CTX)
    large = tm.make_tiny_model(seed=2, model_channels=32, context_dim=LARGE_CTX)
    return small, large


@pytest.fixture(scope="module")
def conds(tm):
    return {
        "small_positive": tm.prompt_cond("a red fox", SMALL_CTX),
        "small_negative": tm.prompt_cond("blurry", SMALL_CTX),
        "large_positive": tm.prompt_cond("a red fox", LARGE_CTX),
        "large_negative": tm.prompt_cond("blurry", LARGE_CTX),
    }


def counted(model):
    """A clone of `model` that counts its denoiser evaluations through ComfyUI's post-CFG hook."""
    calls = {"n": 0}

    def post_cfg(args):
        calls["n"] += 1
        return args["denoised"]

    clone = model.clone()
    clone.set_model_sampler_post_cfg_function(post_cfg)
    return clone, calls


def run_node(pack, small, large, conds, latent, *, fraction=0.4, mode="fraction", switch_sigma=1.0, steps=STEPS,
             seed=SEED, sampler="euler"):
    node = pack.nodes.tstitch.TStitchSampler
    out = node.execute(small_model=small, large_model=large, latent_image=latent, seed=seed, sampler_name=sampler,
                       scheduler="normal", steps=steps, cfg=CFG, switch_mode=mode, small_fraction=fraction,
                       switch_sigma=switch_sigma, **conds)
    (result,) = out.result
    return result


def ksampler_reference(model, pos, neg, latent, seed=SEED):
    import comfy.sample

    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, STEPS, CFG, "euler", "normal", pos, neg, latent, seed=seed)


def test_fraction_limits_reproduce_each_model_alone(pack, models, conds, tm):
    small, large = models
    latent = tm.empty_latent()
    pure_large = run_node(pack, small, large, conds, {"samples": latent}, fraction=0.0)["samples"]
    ref_large = ksampler_reference(large, conds["large_positive"], conds["large_negative"], latent)
    assert (pure_large - ref_large).abs().max().item() < 1e-6

    pure_small = run_node(pack, small, large, conds, {"samples": latent}, fraction=1.0)["samples"]
    ref_small = ksampler_reference(small, conds["small_positive"], conds["small_negative"], latent)
    assert (pure_small - ref_small).abs().max().item() < 1e-6

    mixed = run_node(pack, small, large, conds, {"samples": latent}, fraction=0.4)["samples"]
    assert torch.isfinite(mixed).all()
    assert (mixed - pure_large).abs().max().item() > 1e-3
    assert (mixed - pure_small).abs().max().item() > 1e-3


def test_output_keeps_other_latent_keys(pack, models, conds, tm):
    small, large = models
    latent = {"samples": tm.empty_latent(batch=2), "batch_index": [0, 1]}
    out = run_node(pack, small, large, conds, latent, fraction=0.5, steps=2)
    assert out is not latent and out["batch_index"] == [0, 1]
    assert out["samples"].shape == (2, 4, 8, 8) and torch.isfinite(out["samples"]).all()
    assert latent["samples"].abs().max().item() == 0.0  # the input dict is untouched


def test_evaluation_counts_follow_switch_point(pack, models, conds, tm):
    from redi_pack.kb_tools.comfy import model_facts as cs
    from redi_pack.kb_tools.core.schedule import stitch_switch_step

    small, large = models
    small_c, small_calls = counted(small)
    large_c, large_calls = counted(large)
    run_node(pack, small_c, large_c, conds, {"samples": tm.empty_latent()}, fraction=0.4)
    assert (small_calls["n"], large_calls["n"]) == (4, 6)

    sigmas = cs.schedule_sigmas(large, "euler", "normal", STEPS).tolist()
    switch_sigma = (sigmas[6] + sigmas[7]) / 2  # steps 0..6 start above it
    expected = stitch_switch_step(sigmas, switch_sigma=switch_sigma)
    assert expected == 7
    small_calls["n"] = large_calls["n"] = 0
    run_node(pack, small_c, large_c, conds, {"samples": tm.empty_latent()}, mode="sigma", switch_sigma=switch_sigma)
    assert (small_calls["n"], large_calls["n"]) == (expected, STEPS - expected)


def _latent8_model(tm):
    import comfy.latent_formats

    class Latent8(comfy.latent_formats.LatentFormat):
        latent_channels = 8

    model = tm.make_tiny_model(seed=3, model_channels=32, channel_mult=(1,), context_dim=SMALL_CTX, in_channels=8)
    model.model.latent_format = Latent8()
    return model


@pytest.mark.parametrize("case", ["latent_channels", "sampling_type", "context"])
def test_mismatched_pair_refused_before_sampling(pack, models, conds, tm, case):
    small, large = models
    conds = dict(conds)
    if case == "latent_channels":
        small = _latent8_model(tm)
        words = ["latent channels", "8", "4"]
    elif case == "sampling_type":
        small = tm.make_tiny_model(seed=1, model_type="V_PREDICTION", model_channels=32, channel_mult=(1,), context_dim=SMALL_CTX)
        words = ["sampling type", "EPS", "V_PREDICTION"]
    else:
        conds["small_positive"] = tm.prompt_cond("a red fox", LARGE_CTX)  # 64-dim cond for a 32-context model
        words = ["context", "small model", "64", "32"]
    small_c, small_calls = counted(small)
    large_c, large_calls = counted(large)
    with pytest.raises(pack.kb_tools.core.errors.KBError) as info:
        run_node(pack, small_c, large_c, conds, {"samples": tm.empty_latent()})
    assert isinstance(info.value, pack.kb_tools.core.errors.KBMismatchError)
    message = str(info.value)
    for word in words:
        assert word in message, message
    assert "Fix:" in message
    assert small_calls["n"] == 0 and large_calls["n"] == 0


def test_check_names_every_difference(pack):
    from redi_pack.kb_tools.core.errors import KBMismatchError
    from redi_pack.kb_tools.samplers.tstitch import check_stitch_compatible

    base = {"model_class": "BaseModel", "latent_channels": 4, "latent_scale_factor": 0.18215, "latent_format": "SD15",
            "sampling_type": "EPS", "sigma_min": 0.0292, "sigma_max": 14.61, "context_dim": 768}
    other = dict(base, model_class="SDXL", context_dim=2048)
    check_stitch_compatible(base, other, 768, {"positive": 2048, "negative": 2048})  # classes / contexts may differ
    check_stitch_compatible(base, dict(base, sigma_max=14.61 * 1.0005), None, None)  # within 1e-3
    flux = dict(base, latent_channels=16, latent_scale_factor=0.3611, latent_format="Flux", sampling_type="CONST",
                sigma_min=0.0, sigma_max=1.0, context_dim=None)
    with pytest.raises(KBMismatchError) as info:
        check_stitch_compatible(base, flux, 768, 4096)
    message = str(info.value)
    for word in ("latent channels", "latent scale factor", "sampling type", "CONST (flow matching)", "sigma_min",
                 "sigma_max", "16", "0.3611"):
        assert word in message, message
    assert "context" not in message.split("Fix:")[0]  # flux declares no context_dim: nothing to compare


def test_summary_line(pack):
    from redi_pack.kb_tools.samplers.tstitch import stitch_summary

    assert stitch_summary(4, 6) == "T-Stitch: 4 of 10 steps on the small model, 6 on the large (large-model evaluations -40%)"
    assert "estimated time -36%" in stitch_summary(4, 6, 0.1)
    assert "not smaller" in stitch_summary(4, 6, 1.5)


def test_schema(pack):
    schema = pack.nodes.tstitch.TStitchSampler.define_schema()
    assert schema.node_id == "TStitchSampler"
    assert schema.category == "sampling/ReDi"
    assert schema.description
    names = [i.id for i in schema.inputs]
    assert names == ["small_model", "large_model", "small_positive", "small_negative", "large_positive",
                     "large_negative", "latent_image", "seed", "sampler_name", "scheduler", "steps", "cfg",
                     "switch_mode", "small_fraction", "switch_sigma"]
    assert all(i.tooltip for i in schema.inputs), [i.id for i in schema.inputs if not i.tooltip]
    seed = schema.inputs[names.index("seed")]
    assert seed.control_after_generate and seed.max == 0xffffffffffffffff and "seed + i" in seed.tooltip
    assert pack.nodes.tstitch.NODES == [pack.nodes.tstitch.TStitchSampler, pack.nodes.tstitch.TStitchGuider]


def test_kb_tools_tstitch_imports_without_comfyui(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "COMFYUI_PATH")}
    code = ("import sys; sys.path.insert(0, %r); import kb_tools.samplers.tstitch; "
            "assert 'comfy' not in sys.modules, 'comfy imported'; "
            "import importlib.util; print(importlib.util.find_spec('comfy') is None)") % str(PACK_DIR)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"  # comfy really was not importable there
