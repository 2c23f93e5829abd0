"""TStitchGuider on the real ComfyUI with tiny in-process models: one sampler run over the whole
schedule, each evaluation on the model owning its sigma, both models loaded together, exact limits,
multistep history kept across the hand-over, and ReDi with small-model keys in the native graph."""
from __future__ import annotations

import pytest
import torch

from test_redi_nodes import counted

pytestmark = pytest.mark.comfy

STEPS = 10
SEED = 1234
CFG = 5.0
CTX = 64


@pytest.fixture(scope="module")
def custom():
    from comfy_extras import nodes_custom_sampler
    return nodes_custom_sampler


@pytest.fixture(scope="module")
def models():
    """A small and a large EPS model of one family (same schedule and context size)."""
    import tiny_models
    small = tiny_models.make_tiny_model(seed=1, model_channels=32, channel_mult=(1,), context_dim=CTX)
    large = tiny_models.make_tiny_model(seed=2, model_channels=32, context_dim=CTX)
    return small, large


def conds():
    import tiny_models
    return tiny_models.prompt_cond("a red fox", CTX), tiny_models.prompt_cond("blurry", CTX)


def stitched(pack, custom, small, large, *, fraction=0.4, sampler="euler", mode="fraction", switch_sigma=1.0):
    """SamplerCustomAdvanced(RandomNoise, TStitchGuider(CFGGuider small, CFGGuider large), sampler, BasicScheduler(large))."""
    import tiny_models
    pos, neg = conds()
    guiders = [custom.CFGGuider.execute(model=m, positive=pos, negative=neg, cfg=CFG).result[0] for m in (small, large)]
    guider = pack.nodes.tstitch.TStitchGuider.execute(small_guider=guiders[0], large_guider=guiders[1], switch_mode=mode,
                                                      small_fraction=fraction, switch_sigma=switch_sigma).result[0]
    sigmas = custom.BasicScheduler.execute(model=large, scheduler="normal", steps=STEPS, denoise=1.0).result[0]
    out = custom.SamplerCustomAdvanced.execute(
        noise=custom.RandomNoise.execute(noise_seed=SEED).result[0], guider=guider,
        sampler=custom.KSamplerSelect.execute(sampler_name=sampler).result[0], sigmas=sigmas,
        latent_image={"samples": tiny_models.empty_latent()}).result[0]["samples"]
    return out, guider, sigmas


def plain(model, sampler="euler"):
    import comfy.sample
    import tiny_models
    pos, neg = conds()
    lat = tiny_models.empty_latent()
    return comfy.sample.sample(model, comfy.sample.prepare_noise(lat, SEED), STEPS, CFG, sampler, "normal", pos, neg, lat,
                               seed=SEED, disable_pbar=True)


def test_fraction_limits_reproduce_each_model_alone(pack, custom, models):
    small, large = models
    only_large, _, _ = stitched(pack, custom, small, large, fraction=0.0)
    only_small, _, _ = stitched(pack, custom, small, large, fraction=1.0)
    assert (only_large - plain(large)).abs().max().item() < 1e-6
    assert (only_small - plain(small)).abs().max().item() < 1e-6
    mixed, _, _ = stitched(pack, custom, small, large, fraction=0.4)
    assert (mixed - only_large).abs().max().item() > 1e-3 and (mixed - only_small).abs().max().item() > 1e-3


@pytest.mark.parametrize("sampler, expected", [("euler", (4, 6)), ("heun", (7, 12))])
def test_calls_per_model_follow_the_switch(pack, custom, models, sampler, expected):
    """Heun evaluates each step at sigma_i and (corrector) at sigma_i+1: the corrector at the switch sigma is the large model's."""
    small, large = models
    small_c, small_calls = counted(small)
    large_c, large_calls = counted(large)
    _, guider, _ = stitched(pack, custom, small_c, large_c, fraction=0.4, sampler=sampler)
    assert (small_calls.count, large_calls.count) == expected
    assert guider.evaluations == {"small_model": expected[0], "large_model": expected[1]}


def test_both_models_are_loaded_for_the_run(pack, custom, models):
    import comfy.model_management
    small, large = models
    seen = []

    def watch(args):
        seen.append(comfy.model_management.loaded_models())
        return args["denoised"]

    small_w, large_w = small.clone(), large.clone()
    small_w.set_model_sampler_post_cfg_function(watch)
    large_w.set_model_sampler_post_cfg_function(watch)
    stitched(pack, custom, small_w, large_w, fraction=0.4)
    assert len(seen) == STEPS
    for loaded in seen:  # at every evaluation, both models are loaded through ComfyUI's model management ...
        assert any(m.is_clone(small) for m in loaded) and any(m.is_clone(large) for m in loaded), loaded
        # ... because the large model's patcher brought the small one along as an additional model.
        assert any(m.is_clone(large) and any(a.is_clone(small) for a in m.get_additional_models()) for m in loaded)


def test_multistep_history_is_kept_across_the_hand_over(pack, custom, models):
    """dpmpp_2m through TStitchGuider = ONE dpmpp_2m run whose UNet is the small one above the switch sigma."""
    import comfy.sample
    import tiny_models
    small, large = models
    out, _, sigmas = stitched(pack, custom, small, large, fraction=0.4, sampler="dpmpp_2m")
    at = float(sigmas[4])

    def unet(apply_model, args):
        net = small.model.apply_model if float(args["timestep"].max()) > at else apply_model
        return net(args["input"], args["timestep"], **args["c"])

    switching = large.clone()
    switching.set_model_unet_function_wrapper(unet)
    reference = plain(switching, "dpmpp_2m")
    assert (out - reference).abs().max().item() < 1e-5 * max(1.0, reference.abs().max().item())

    # Two separate runs (the segment approach) restart dpmpp_2m's history at the hand-over: a different result.
    p = pack.kb_tools.comfy.plain
    pos, neg = conds()
    lat = tiny_models.empty_latent()
    early, _, _ = p.sample_counted(p.cfg_guider(small, pos, neg, CFG), lat, [SEED], sigmas[:5], "dpmpp_2m",
                                   noise=comfy.sample.prepare_noise(lat, SEED))
    segments, _, _ = p.sample_counted(p.cfg_guider(large, pos, neg, CFG), early, [SEED], sigmas[4:], "dpmpp_2m",
                                      noise=torch.zeros_like(early))
    assert (segments - reference).abs().max().item() > 1e-3


def test_one_guider_object_on_both_sides_is_its_plain_run(pack, custom, models):
    """ComfyUI hands out one cached object for two identical nodes: the same guider may sit on both sides."""
    import comfy.samplers
    import tiny_models
    _, large = models
    pos, neg = conds()
    guider = custom.CFGGuider.execute(model=large, positive=pos, negative=neg, cfg=CFG).result[0]
    both = pack.nodes.tstitch.TStitchGuider.execute(small_guider=guider, large_guider=guider, switch_mode="fraction",
                                                    small_fraction=0.4, switch_sigma=1.0).result[0]
    sigmas = custom.BasicScheduler.execute(model=large, scheduler="normal", steps=STEPS, denoise=1.0).result[0]
    lat = tiny_models.empty_latent()
    noise = custom.RandomNoise.execute(noise_seed=SEED).result[0].generate_noise({"samples": lat})
    out = both.sample(noise, lat, comfy.samplers.sampler_object("dpmpp_2m"), sigmas, seed=SEED)
    assert (out - plain(large, "dpmpp_2m")).abs().max().item() < 1e-5 * max(1.0, out.abs().max().item())
    assert both.evaluations == {"small_model": 4, "large_model": 6}


def test_mismatched_pair_is_refused_before_sampling(pack, custom, models):
    import tiny_models
    small, large = models
    pos, neg = conds()
    small_guider = custom.CFGGuider.execute(model=small, positive=tiny_models.prompt_cond("a", 32), negative=neg,
                                            cfg=CFG).result[0]
    large_guider = custom.CFGGuider.execute(model=large, positive=pos, negative=neg, cfg=CFG).result[0]
    with pytest.raises(pack.kb_tools.core.errors.KBMismatchError, match=r"context size: the small model's positive conditioning is 32"):
        pack.nodes.tstitch.TStitchGuider.execute(small_guider=small_guider, large_guider=large_guider,
                                                 switch_mode="fraction", small_fraction=0.4, switch_sigma=1.0)


def test_new_nodes_describe_themselves(pack):
    for node in (pack.nodes.tstitch.TStitchGuider, *pack.nodes.custom_sampling.NODES):
        schema = node.define_schema()
        assert schema.category == "sampling/ReDi" and schema.description
        assert all(i.tooltip for i in schema.inputs), [i.id for i in schema.inputs if not i.tooltip]
    ids = {n.define_schema().node_id: [i.id for i in n.define_schema().inputs] for n in pack.nodes.custom_sampling.NODES}
    assert ids == {"SamplerReDi": ["knowledge_base", "key_step", "value_step", "neighbours", "weight_mode", "guard",
                                   "error_tolerance", "adaptive_skip"],
                   "SamplerReDiCorrected": ["knowledge_base", "nfe", "grid", "neighbours", "weight_mode"],
                   "ReDiKBNoise": ["knowledge_base"], "ReDiKBSigmas": ["knowledge_base"]}
    guider = pack.nodes.tstitch.TStitchGuider.define_schema()
    assert [i.id for i in guider.inputs] == ["small_guider", "large_guider", "switch_mode", "small_fraction", "switch_sigma"]


def test_redi_with_small_model_keys_in_the_native_graph(pack, custom, tmp_path):
    """SamplerCustomAdvanced(ReDiKBNoise, TStitchGuider, SamplerReDi) = ReDiSampler with small_model, exactly."""
    import tiny_models
    from test_tstitch_redi import STITCH, build_stitched
    redi, nodes = pack.kb_tools, pack.nodes
    large = tiny_models.make_tiny_model(0, "V_PREDICTION", model_channels=64)
    small = tiny_models.make_tiny_model(5, "V_PREDICTION", model_channels=32, channel_mult=(1,))
    kb = build_stitched(redi, large, small, tmp_path / "kb", ["a cat", "a dog", "a red car"]).kb
    pos, neg = tiny_models.prompt_cond("a dog"), tiny_models.prompt_cond("")
    expected = nodes.redi_sampler.ReDiSampler.execute(
        model=large, positive=pos, negative=neg, latent_image={"samples": tiny_models.empty_latent(1)}, knowledge_base=kb,
        key_step=3, value_step=6, neighbours=1, weight_mode="lstsq", guard=-1.0, seed_mode="kb", seed=0,
        small_model=small).result[0]["samples"]

    def native(fraction):
        guiders = [custom.CFGGuider.execute(model=m, positive=pos, negative=neg, cfg=kb.settings.cfg).result[0]
                   for m in (small, large)]
        guider = nodes.tstitch.TStitchGuider.execute(small_guider=guiders[0], large_guider=guiders[1], switch_mode="fraction",
                                                     small_fraction=fraction, switch_sigma=1.0).result[0]
        sampler = nodes.custom_sampling.SamplerReDi.execute(knowledge_base=kb, key_step=3, value_step=6, neighbours=1,
                                                            weight_mode="lstsq", guard=-1.0).result[0]
        return custom.SamplerCustomAdvanced.execute(
            noise=nodes.custom_sampling.ReDiKBNoise.execute(knowledge_base=kb).result[0], guider=guider, sampler=sampler,
            sigmas=nodes.custom_sampling.ReDiKBSigmas.execute(knowledge_base=kb).result[0],
            latent_image={"samples": tiny_models.empty_latent(1)}).result[0]["samples"]

    assert torch.equal(native(STITCH / STEPS), expected)
    with pytest.raises(pack.kb_tools.core.errors.KBMismatchError, match=f"exactly the first {STITCH} steps"):
        native(0.3)
