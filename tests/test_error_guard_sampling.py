"""The error guard and the adaptive skip inside ReDi's sampler, on the real ComfyUI with a tiny model:
SamplerCustomAdvanced + SamplerReDi and the ReDiSampler node with error_tolerance / adaptive_skip.

The KB stores steps 3..7 and a blend-error model for key step 3, H = 2 (measured before any test
runs, never during one); a batch mixes KB noise (small residual) and foreign noise (large)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import test_native_sampling as native
from test_native_sampling import PerItemNoise, cfg_guider, cond
from test_redi_nodes import SEED, STEPS, build

pytestmark = pytest.mark.comfy
# The native-sampling tests' module fixtures, shared (each still made once per module here).
redi, nodes, custom, model = native.redi, native.nodes, native.custom, native.model

KEY, VALUE, H = 3, 7, 2
PROMPTS = ["prompt 2", "prompt 4", "a prompt the KB lacks", "prompt 7"]
SEEDS = [SEED, SEED + 1, SEED, SEED + 2]  # SEED + 1 is foreign noise


@pytest.fixture(scope="module")
def kb(pack, redi, model, tmp_path_factory):
    """Ten prompts from SEED and SEED + 2, steps 3..7 stored, the blend-error model of key step 3, H = 2 stored."""
    be = pack.kb_tools.calibration.blend_error
    kb = build(redi, model, tmp_path_factory.mktemp("kb") / "kb", [f"prompt {i}" for i in range(10)],
               seeds=(SEED, SEED + 2), store=(3, 4, 5, 6, 7))
    be.store_error_model(kb, KEY, be.fit_error_model(be.measure_blend_errors(kb, KEY, H, sample=20)))
    return kb


@pytest.fixture(scope="module")
def guider(custom, model):
    return cfg_guider(custom, model, cond(*PROMPTS))


def run(pack, nodes, custom, guider, kb, *, tolerance=-1.0, adaptive=False, guard=-1.0, value=VALUE, seeds=SEEDS):
    """SamplerCustomAdvanced(per-item noise, guider, SamplerReDi, the KB's SIGMAS) -> (latent, ReDiResult)."""
    import tiny_models
    cn = nodes.custom_sampling
    kwargs = {} if tolerance == -1.0 and not adaptive else {"error_tolerance": tolerance, "adaptive_skip": adaptive}
    sampler = cn.SamplerReDi.execute(knowledge_base=kb, key_step=KEY, value_step=value, neighbours=H, weight_mode="lstsq",
                                     guard=guard, **kwargs).result[0]
    noise = PerItemNoise(pack.kb_tools.comfy.model_facts.seeded_noise, seeds)
    sigmas = cn.ReDiKBSigmas.execute(knowledge_base=kb).result[0]
    out = custom.SamplerCustomAdvanced.execute(noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                                               latent_image={"samples": tiny_models.empty_latent(len(seeds))}).result[0]
    return out["samples"], sampler.extra_options["run"].result


def predicted(pack, kb, residuals, step):
    be = pack.kb_tools.calibration.blend_error
    return be.predict_error(be.stored_error_model(kb, KEY, H), residuals, step)


@pytest.fixture(scope="module")
def residual_run(pack, nodes, custom, guider, kb):
    """The batch through the residual guard (the defaults): items 0, 2, 3 (KB noise) jump, item 1 is sent back."""
    out, result = run(pack, nodes, custom, guider, kb)
    assert result.predicted_error is None and result.accepted.tolist() == [True, False, True, True]
    return out, result


def test_default_inputs_are_the_residual_guard_bit_for_bit(pack, nodes, custom, guider, kb, residual_run):
    out, result = residual_run
    explicit, same = run(pack, nodes, custom, guider, kb, tolerance=-1.0, adaptive=False)  # the inputs given, at defaults
    assert torch.equal(explicit, out) and same.summary() == result.summary()
    assert "skipped 4 steps for 3 of 4 items" in result.summary()


def test_error_guard_accepting_the_same_items_gives_the_same_latents(pack, nodes, custom, guider, kb, residual_run):
    """The per-step blend and per-item conversion of the error guard path reproduce the residual path bit for bit."""
    out, result = residual_run
    at_value = predicted(pack, kb, result.centered_residual, VALUE)
    tolerance = float(at_value[result.accepted].max())  # accepts exactly the residual guard's items
    assert not (at_value[~result.accepted] <= tolerance).any()
    same, guarded = run(pack, nodes, custom, guider, kb, tolerance=tolerance)
    assert guarded.accepted.tolist() == result.accepted.tolist()
    assert torch.equal(same, out)
    assert np.array_equal(guarded.evaluations.per_item(), result.evaluations.per_item())
    assert np.allclose(guarded.predicted_error, at_value)


@pytest.mark.parametrize("adaptive", [False, True])
def test_zero_tolerance_sends_every_item_back(pack, nodes, custom, guider, kb, adaptive):
    _, result = run(pack, nodes, custom, guider, kb, tolerance=0.0, adaptive=adaptive)
    assert not result.accepted.any() and result.start_steps.tolist() == [KEY] * 4
    assert result.evaluations.per_item().tolist() == [STEPS] * 4  # the plain sampler's NFE
    assert (result.predicted_error > 0).all()
    assert result.summary().startswith("ReDi: the error guard sent all 4 item(s) back to plain sampling")


def test_huge_tolerance_accepts_exactly_the_items_within_the_calibrated_range(pack, nodes, custom, guider, kb):
    be = pack.kb_tools.calibration.blend_error
    _, result = run(pack, nodes, custom, guider, kb, tolerance=100.0)
    within = result.centered_residual <= be.stored_error_model(kb, KEY, H)["residual_max"]
    assert within.tolist() == [True, False, True, True]  # foreign noise lies beyond it
    assert result.accepted.tolist() == within.tolist()
    assert np.isinf(result.predicted_error[~within]).all() and np.isfinite(result.predicted_error[within]).all()
    assert result.evaluations.per_item().tolist() == [STEPS - (VALUE - KEY) if w else STEPS for w in within]


def test_adaptive_skip_gives_each_item_its_own_start_step_and_counts_its_evaluations(pack, nodes, custom, guider, kb,
                                                                                   residual_run):
    r = residual_run[1].centered_residual
    p5, p6 = predicted(pack, kb, r, 5), predicted(pack, kb, r, 6)
    tolerance = float(p5[2] + p6[2]) / 2  # the foreign prompt (item 2) qualifies up to step 5, not 6
    assert p5[2] < tolerance < p6[2] and (predicted(pack, kb, r, VALUE)[[0, 3]] <= tolerance).all()
    out, result = run(pack, nodes, custom, guider, kb, tolerance=tolerance, adaptive=True)
    assert result.start_steps.tolist() == [VALUE, KEY, 5, VALUE]
    assert result.accepted.tolist() == [True, False, True, True]
    # NFE per item, counted at the denoiser: the steps before the key plus the steps from the item's own start.
    assert result.evaluations.per_item().tolist() == [KEY + STEPS - s for s in result.start_steps]
    assert np.allclose(result.predicted_error[[0, 2, 3]], [predicted(pack, kb, r, 7)[0], p5[2], predicted(pack, kb, r, 7)[3]])
    assert result.predicted_error[1] == np.inf  # refused at its shortest jump (step 4): beyond the calibrated range
    line = result.summary()
    assert line.startswith(f"ReDi: 2 of 4 items jumped {VALUE - KEY} steps, 1 item 2 steps (adaptive error guard")
    assert "1 item continued from the key step" in line and "model evaluations" in line
    # Item 2 is the item a fixed skip to step 5 gives (run in another batch grouping: compare to rounding).
    fixed5, at5 = run(pack, nodes, custom, guider, kb, tolerance=100.0, value=5)
    assert at5.start_steps[2] == 5
    assert (out[2] - fixed5[2]).abs().max().item() < 1e-5 * max(1.0, fixed5[2].abs().max().item())
    text = pack.nodes.feedback.resume_text(result)
    assert "item 2: skipped 2 steps (predicted error" in text and "item 1: fell back to plain sampling" in text


def test_larger_tolerance_never_accepts_fewer_items_or_shorter_jumps(pack, nodes, custom, guider, kb):
    tolerances = [0.0, 0.001, 0.0025, 0.6, 0.75, 0.85, 1.0, 100.0]
    for adaptive in (False, True):
        before_accepted, before_start = np.zeros(4, bool), np.full(4, KEY)
        for tolerance in tolerances:
            _, result = run(pack, nodes, custom, guider, kb, tolerance=tolerance, adaptive=adaptive)
            assert (result.accepted >= before_accepted).all(), (adaptive, tolerance)  # a superset of the items
            assert (result.start_steps >= before_start).all(), (adaptive, tolerance)
            before_accepted, before_start = result.accepted, result.start_steps
        assert before_accepted.tolist() == [True, False, True, True]


def test_kb_without_a_blend_error_model_is_refused_before_sampling(pack, redi, nodes, model, tmp_path):
    import tiny_models
    from test_redi_nodes import counted
    bare = build(redi, model, tmp_path / "bare", ["a cat", "a dog", "a red car"])
    with pytest.raises(pack.kb_tools.core.errors.KBError,
                       match=r"no blend-error model for key step 3 and H=2.*python -m kb_tools calibrate KB --key-step 3 --neighbours 2"):
        nodes.custom_sampling.SamplerReDi.execute(knowledge_base=bare, key_step=3, value_step=7, neighbours=2,
                                                  weight_mode="lstsq", guard=-1.0, error_tolerance=0.1)
    counted_model, counter = counted(model)
    with pytest.raises(pack.kb_tools.core.errors.KBError, match=r"python -m kb_tools calibrate"):
        nodes.redi_sampler.ReDiSampler.execute(model=counted_model, positive=cond("a cat"), negative=cond(""), knowledge_base=bare,
                                       latent_image={"samples": tiny_models.empty_latent(1)}, key_step=3, value_step=7,
                                       neighbours=2, weight_mode="lstsq", guard=-1.0, seed_mode="kb", seed=0,
                                       error_tolerance=0.1, adaptive_skip=True)
    assert counter.count == 0  # nothing was sampled
    assert bare.calibration(3) is None  # and nothing was measured on the fly


def test_adaptive_skip_without_a_tolerance_is_refused(pack, nodes, model, kb):
    import tiny_models
    with pytest.raises(pack.kb_tools.core.errors.KBError, match=r"adaptive skip needs the error guard.*error_tolerance"):
        nodes.custom_sampling.SamplerReDi.execute(knowledge_base=kb, key_step=KEY, value_step=VALUE, neighbours=H,
                                                  weight_mode="lstsq", guard=-1.0, adaptive_skip=True)
    with pytest.raises(pack.kb_tools.core.errors.KBError, match=r"adaptive skip needs the error guard"):
        nodes.redi_sampler.ReDiSampler.execute(model=model, positive=cond("prompt 1"), negative=cond(""), knowledge_base=kb,
                                       latent_image={"samples": tiny_models.empty_latent(1)}, key_step=KEY,
                                       value_step=VALUE, neighbours=H, weight_mode="lstsq", guard=-1.0, seed_mode="kb",
                                       seed=0, error_tolerance=-1.0, adaptive_skip=True)


def test_redi_sampler_node_runs_the_error_guard_as_the_native_sampler_does(pack, nodes, custom, model, kb):
    import tiny_models
    args = dict(model=model, positive=cond("prompt 4"), negative=cond(""), knowledge_base=kb, key_step=KEY,
                value_step=VALUE, neighbours=H, weight_mode="lstsq", guard=-1.0, seed_mode="kb", seed=0)
    node = nodes.redi_sampler.ReDiSampler.execute(latent_image={"samples": tiny_models.empty_latent(1)}, error_tolerance=0.5,
                                          adaptive_skip=True, **args)
    out, result = run(pack, nodes, custom, cfg_guider(custom, model, cond("prompt 4")), kb, tolerance=0.5, adaptive=True,
                      seeds=[SEED])
    assert torch.equal(node.result[0]["samples"], out)
    assert result.start_steps.tolist() == [VALUE]
    assert "skipped 4 steps (predicted error" in node.ui["text"][0]


def blended(nodes, model, kb, prompts, seed_mode="kb", seed=0) -> dict:
    """ReDiPartialSample -> ReDiRetrieve -> ReDiBlend at (KEY, VALUE, H): the LATENT ReDiResumeSample takes."""
    import tiny_models
    n = nodes.redi_chain
    query = n.ReDiPartialSample.execute(model=model, positive=cond(*prompts), negative=cond(""), knowledge_base=kb,
                                        latent_image={"samples": tiny_models.empty_latent(len(prompts))}, key_step=KEY,
                                        seed_mode=seed_mode, seed=seed).result[0]
    found = n.ReDiRetrieve.execute(query_latent=query, knowledge_base=kb, neighbours=H).result[0]
    return n.ReDiBlend.execute(neighbours=found, value_step=VALUE, weight_mode="lstsq").result[0]


def test_four_node_chain_takes_the_error_guard_at_its_blend_step(pack, nodes, model, kb):
    prompts = ["prompt 2", "a prompt the KB lacks"]
    value = blended(nodes, model, kb, prompts)
    resume, pos, neg = nodes.redi_chain.ReDiResumeSample.execute, cond(*prompts), cond("")
    plain = resume(model=model, positive=pos, negative=neg, value_latent=value, guard=-1.0)
    off = resume(model=model, positive=pos, negative=neg, value_latent=value, guard=-1.0, error_tolerance=-1.0)
    assert torch.equal(plain.result[0]["samples"], off.result[0]["samples"])  # -1: the residual guard, as before
    state = value["redi"]
    for tolerance in (0.0, 100.0):
        result = pack.kb_tools.resume(state, model, pos, neg, tolerance=tolerance)
        want = predicted(pack, kb, state.fit.centered_residual, VALUE) <= tolerance
        assert result.accepted.tolist() == want.tolist() and result.predicted_error is not None
        assert result.start_steps.tolist() == [VALUE if a else KEY for a in want]
        assert want[0] == (tolerance > 0)  # the KB prompt from its KB seed jumps unless nothing may
    assert not pack.kb_tools.resume(state, model, pos, neg, tolerance=0.0).accepted.any()
    text = resume(model=model, positive=pos, negative=neg, value_latent=value, guard=-1.0, error_tolerance=0.0).ui["text"][0]
    assert "error guard" in text


def test_four_node_chain_refuses_the_error_guard_on_a_kb_without_its_model(pack, redi, nodes, model, tmp_path):
    bare = build(redi, model, tmp_path / "bare", ["a cat", "a dog", "a red car"])
    value = blended(nodes, model, bare, ["a cat"])
    with pytest.raises(pack.kb_tools.core.errors.KBError, match=r"no blend-error model.*python -m kb_tools calibrate"):
        nodes.redi_chain.ReDiResumeSample.execute(model=model, positive=cond("a cat"), negative=cond(""), value_latent=value,
                                            guard=-1.0, error_tolerance=0.1)
