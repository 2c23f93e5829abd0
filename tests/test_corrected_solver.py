"""The KB-corrected coarse Euler solver: its pure parts, and on the real ComfyUI with a tiny
model: a query that is a stored trajectory is corrected back onto its fine trajectory, the NFE is the grid's
(counted), the SAMPLER node runs in SamplerCustomAdvanced, and bad input is refused with the fix."""
from __future__ import annotations

import pytest
import torch

from test_redi_nodes import CFG, SEED, STEPS, build

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def cs_(pack):
    """The corrected solver's parts: the pure grid and step math (core) and the sampler (samplers)."""
    import types
    return types.SimpleNamespace(**vars(pack.kb_tools.core.coarse_grid), **{
        name: getattr(pack.kb_tools.samplers.corrected, name) for name in ("corrected_ksampler", "make_corrected_run")})


@pytest.fixture(scope="module")
def errors(pack):
    return pack.kb_tools.core.errors


@pytest.fixture(scope="module")
def model():
    import tiny_models
    return tiny_models.make_tiny_model(0, "EPS")


@pytest.fixture(scope="module")
def kb(pack, model, tmp_path_factory):
    """Euler trajectories of six prompts from SEED, every step 1 .. T-1 stored."""
    return build(pack.kb_tools, model, tmp_path_factory.mktemp("kb") / "kb", [f"prompt {i}" for i in range(6)],
                 store=range(1, STEPS))


def test_coarse_error_of_a_fine_step_is_zero_and_a_step_to_sigma_zero_lands_on_the_prediction(cs_):
    g = torch.Generator().manual_seed(0)
    x_a, x_next, denoised = (torch.randn(2, 5, generator=g) for _ in range(3))
    sig = [3.0, 2.0, 1.0, 0.0]
    assert torch.equal(cs_.coarse_errors(x_a, x_next, x_next, sig, 0, 1), torch.zeros_like(x_a))
    assert torch.allclose(cs_.euler_step(x_a, denoised, 2.0, 0.0), denoised)
    # A fine Euler step a -> a + 1 made with `denoised`: the coarse step a -> b that the error reads off it is
    # exactly the Euler step with that prediction.
    fine_next = cs_.euler_step(x_a, denoised, sig[0], sig[1])
    x_b = torch.randn(2, 5, generator=g)
    assert torch.allclose(cs_.coarse_errors(x_a, fine_next, x_b, sig, 0, 2), x_b - cs_.euler_step(x_a, denoised, sig[0], sig[2]),
                          atol=1e-6)


@pytest.mark.parametrize("steps", [2, 6, 10, 20, 30, 50])
def test_default_grid_spends_exactly_the_budget_on_the_schedule(cs_, steps):
    for nfe in range(1, steps + 1):
        grid = cs_.coarse_grid(steps, nfe)
        assert grid[0] == 0 and grid[-1] == steps and len(grid) == nfe + 1, (steps, nfe, grid)
        assert all(b > a for a, b in zip(grid, grid[1:]))
        assert cs_.check_grid(grid, steps) == grid


def test_grid_text_and_bad_grids_name_the_fix(cs_, errors):
    assert cs_.parse_grid("auto", 20, 6) == (0, 2, 6, 11, 15, 19, 20)
    assert cs_.parse_grid(" 0, 3,20 ", 20, 2) == (0, 3, 20)
    for bad in ("0,5,4,20", "1,5,20", "0,5,19", "0,x,20", "0", "1.5"):
        with pytest.raises(errors.KBError, match="grid"):
            cs_.parse_grid(bad, 20, 6)
    with pytest.raises(errors.KBError, match="between 1 and 20"):
        cs_.parse_grid("auto", 20, 21)


def test_an_explicit_grid_and_a_differing_nfe_are_refused_with_both_fixes(cs_, nodes, kb, errors):
    """nfe counts only for grid 'auto'; an explicit grid has its own count, so a different nfe is refused, not ignored."""
    with pytest.raises(errors.KBError, match=r"the grid '0,3,20' has 2 segments \(2 evaluations\) but nfe is 6: "
                                             r"set nfe to 2, or set grid to 'auto' to spread nfe evaluations"):
        cs_.parse_grid("0,3,20", 20, 6)
    assert cs_.parse_grid("0,3,20", 20, 2) == (0, 3, 20)
    with pytest.raises(errors.KBError, match="has 4 segments .* but nfe is 6: set nfe to 4"):
        corrected_node(nodes, kb, f"0,1,4,{STEPS - 1},{STEPS}", nfe=6)
    assert corrected_node(nodes, kb, f"0,1,4,{STEPS - 1},{STEPS}", nfe=4).extra_options["run"].grid == (0, 1, 4, STEPS - 1, STEPS)


def advanced(custom, nodes, model, kb, prompt, sampler, seed=SEED):
    """SamplerCustomAdvanced(RandomNoise, CFGGuider, sampler, ReDiKBSigmas) on one empty latent."""
    import tiny_models
    guider = custom.CFGGuider.execute(model=model, positive=tiny_models.prompt_cond(prompt),
                                      negative=tiny_models.prompt_cond(""), cfg=CFG).result[0]
    return custom.SamplerCustomAdvanced.execute(noise=custom.RandomNoise.execute(noise_seed=seed).result[0], guider=guider,
                                                sampler=sampler, sigmas=nodes.custom_sampling.ReDiKBSigmas.execute(knowledge_base=kb).result[0],
                                                latent_image={"samples": tiny_models.empty_latent(1)}).result[0]["samples"]


def corrected_node(nodes, kb, grid="auto", nfe=4, h=1, mode="lstsq"):
    return nodes.custom_sampling.SamplerReDiCorrected.execute(knowledge_base=kb, nfe=nfe, grid=grid, neighbours=h,
                                                              weight_mode=mode).result[0]


@pytest.fixture(scope="module")
def custom():
    from comfy_extras import nodes_custom_sampler
    return nodes_custom_sampler


@pytest.fixture(scope="module")
def nodes(pack):
    return pack.nodes


def test_a_stored_query_is_corrected_onto_its_fine_trajectory_at_the_grids_nfe(cs_, custom, nodes, model, kb):
    """Query = a stored trajectory (same prompt and seed), H = 1: each corrected segment adds exactly its coarse
    step's error, so the output is the plain T-step output; uncorrected, the same grid lands elsewhere."""
    from test_redi_nodes import ksampler
    plain = ksampler(model, "prompt 2")
    grid = (0, 1, 4, STEPS - 1, STEPS)  # 1 -> 4 and 4 -> 9 corrected; 0 -> 1 and 9 -> 10 are fine steps already
    sampler = corrected_node(nodes, kb, ",".join(map(str, grid)))
    out = advanced(custom, nodes, model, kb, "prompt 2", sampler)
    run = sampler.extra_options["run"]
    assert run.corrected == ((1, 4), (4, STEPS - 1))
    assert run.evaluations.per_item().tolist() == [len(grid) - 1]  # counted at the denoiser, not computed
    assert torch.allclose(out, plain, atol=1e-4), float((out - plain).abs().max())
    run.corrected = ()
    uncorrected = advanced(custom, nodes, model, kb, "prompt 2", cs_.corrected_ksampler(run))
    assert (uncorrected - plain).abs().max() > 100 * max(float((out - plain).abs().max()), 1e-6)


def test_auto_grid_counts_nfe_per_item_and_summary_names_the_corrections(custom, nodes, model, kb):
    sampler = corrected_node(nodes, kb, "auto", nfe=4, h=3)
    out = advanced(custom, nodes, model, kb, "a prompt the KB lacks", sampler, seed=SEED + 5)
    run = sampler.extra_options["run"]
    assert torch.isfinite(out).all()
    assert run.evaluations.per_item().tolist() == [4] and len(run.grid) == 5
    assert run.corrected and set(run.centered_residual) == {a for a, _ in run.corrected}
    assert f"{len(run.corrected)} of 4 segments corrected" in run.summary()


def test_refuses_a_non_euler_kb_a_wrong_schedule_and_a_bad_grid_with_the_fix(pack, custom, nodes, model, kb, errors,
                                                                              tmp_path):
    other = build(pack.kb_tools, model, tmp_path / "dpm", ["prompt 0", "prompt 1"], sampler="dpmpp_2m",
                  store=range(1, STEPS))
    with pytest.raises(errors.KBError, match="built with sampler 'euler'"):
        corrected_node(nodes, other)
    with pytest.raises(errors.KBError, match="rise strictly from 0"):
        corrected_node(nodes, kb, "0,4,2,10")
    with pytest.raises(errors.KBError, match="H = 7 neighbours"):
        corrected_node(nodes, kb, h=7)
    import tiny_models
    guider = custom.CFGGuider.execute(model=model, positive=tiny_models.prompt_cond("prompt 0"),
                                      negative=tiny_models.prompt_cond(""), cfg=CFG).result[0]
    wrong = custom.BasicScheduler.execute(model=model, scheduler="karras", steps=STEPS, denoise=1.0).result[0]
    with pytest.raises(errors.KBMismatchError, match="not the knowledge base's schedule"):
        custom.SamplerCustomAdvanced.execute(noise=custom.RandomNoise.execute(noise_seed=SEED).result[0], guider=guider,
                                             sampler=corrected_node(nodes, kb), sigmas=wrong,
                                             latent_image={"samples": tiny_models.empty_latent(1)})
