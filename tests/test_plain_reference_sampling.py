"""The plain reference on the real ComfyUI with a tiny model: the runs that measure it (checked against
ComfyUI's own samplers), and a generation that reads it through the nodes' auto tolerance without
measuring anything."""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

import test_native_sampling as native
from test_redi_nodes import CFG, SEED, STEPS, build

pytestmark = pytest.mark.comfy
redi, nodes, model = native.redi, native.nodes, native.model

KEY, H = 3, 2
STORED = (3, 4, 5, 6, 7)


@pytest.fixture(scope="module")
def kb(pack, redi, model, tmp_path_factory):
    """Ten prompts from SEED and SEED + 2, steps 3..7 stored, the blend-error model of key step 3, H = 2 stored."""
    be = pack.kb_tools.calibration.blend_error
    kb = build(redi, model, tmp_path_factory.mktemp("kb") / "kb", [f"prompt {i}" for i in range(10)],
               seeds=(SEED, SEED + 2), store=STORED)
    be.store_error_model(kb, KEY, be.fit_error_model(be.measure_blend_errors(kb, KEY, H, sample=20)))
    return kb


@pytest.fixture(scope="module")
def measured(pack, kb):
    return pack.kb_tools.calibration.blend_error.measure_blend_errors(kb, KEY, H, sample=20)


@pytest.fixture(scope="module")
def reference(pack, kb, model, measured):
    import tiny_models
    runs = importlib.import_module(f"{pack.__name__}.kb_tools.calibration.reference_runs")  # imported by calibration only
    return runs.measure_reference(kb, model, tiny_models.prompt_cond, measured, items=2)


def comfy_sample(model, prompt, seed, steps, latent, start_step=None):
    """ComfyUI's own KSampler (Advanced, when start_step is given: no noise added, sampling from `latent` at that step)."""
    import comfy.sample
    import tiny_models
    noise = torch.zeros_like(latent) if start_step is not None else comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, CFG, "euler", "normal", tiny_models.prompt_cond(prompt),
                               tiny_models.prompt_cond(""), latent, start_step=start_step, last_step=steps,
                               force_full_denoise=True, disable_noise=start_step is not None, seed=seed,
                               disable_pbar=True).float()


def rms(a, b):
    return float((a.double() - b.double()).pow(2).mean().sqrt())


def test_reference_runs_are_plain_at_equal_nfe_and_the_resumed_blends(pack, kb, model, measured, reference):
    import tiny_models
    entries = kb.entries
    assert reference.value_steps.tolist() == [4, 5, 6, 7] and reference.plain_nfe.tolist() == [9, 8, 7, 6]
    np.testing.assert_array_equal(reference.state_rms, measured.rms[:2])
    blend_entries = pack.kb_tools.store.retrieval.blend_entries
    for i, entry in enumerate(reference.ids.tolist()):
        prompt, seed = entries[entry]
        full = comfy_sample(model, prompt, seed, STEPS, tiny_models.empty_latent(1))
        for j, v in enumerate(reference.value_steps.tolist()):
            fewer = comfy_sample(model, prompt, seed, KEY + STEPS - v, tiny_models.empty_latent(1))
            assert reference.plain_rms[i, j] == pytest.approx(rms(fewer, full), rel=1e-4, abs=1e-7)
            blend = torch.from_numpy(blend_entries(kb, measured.neighbours[i:i + 1], measured.weights[i:i + 1], v))
            resumed = comfy_sample(model, prompt, seed, STEPS, blend, start_step=v)
            assert reference.final_rms[i, j] == pytest.approx(rms(resumed, full), rel=1e-3, abs=1e-6)
    assert (reference.plain_rms[:, 0] < reference.plain_rms[:, -1]).all()  # fewer steps, further from the full run


def test_nodes_auto_tolerance_reads_the_stored_reference_and_measures_nothing(pack, nodes, kb, model, reference, monkeypatch):
    import tiny_models
    pr = pack.kb_tools.calibration.plain_reference
    kb_ref = pr.fit_plain_reference(reference)
    pr.store_plain_reference(kb, KEY, kb_ref)

    def refuse(*args, **kwargs):
        raise AssertionError("a calibration was computed during a generation")

    for module, name in ((importlib.import_module(f"{pack.__name__}.kb_tools.calibration.reference_runs"), "measure_reference"), (pack.kb_tools.calibration.blend_error, "measure_blend_errors"),
                         (pack.kb_tools.calibration.blend_error, "leave_one_out"), (pack.kb_tools.store.KnowledgeBase, "set_calibration")):
        monkeypatch.setattr(module, name, refuse)
    generation = kb.generation

    def sampler(guard=-1.0, error_tolerance=-1.0, adaptive_skip=False, value=7):
        out = nodes.redi_sampler.ReDiSampler.execute(
            model=model, positive=tiny_models.prompt_cond("prompt 4"), negative=tiny_models.prompt_cond(""),
            latent_image={"samples": tiny_models.empty_latent(2)}, knowledge_base=kb, key_step=KEY, value_step=value,
            neighbours=H, weight_mode="lstsq", guard=guard, seed_mode="kb", seed=0, error_tolerance=error_tolerance,
            adaptive_skip=adaptive_skip)
        return out.ui["text"][0]

    text = sampler()  # both auto: the reference is there, so "no worse than plain at equal NFE" decides
    assert "within the plain sampler's output error at equal NFE" in text.splitlines()[0], text
    assert "plain's output error at" in text  # each item's line names the NFE its bound comes from
    tolerance = pr.plain_tolerances(kb_ref)[7]
    for line in text.splitlines()[1:3]:
        assert f"{tolerance:.3g}" in line
    adaptive = sampler(adaptive_skip=True)
    assert adaptive.startswith("ReDi:") and "adaptive error guard" in adaptive.splitlines()[0]
    residual = sampler(guard=0.5)  # a residual guard the user set stays in charge
    assert "guard 0.500" in residual and "plain" not in residual.splitlines()[0]
    given = sampler(error_tolerance=0.25)  # a number given is that tolerance
    assert "<= 0.25 of the KB's spread" in given.splitlines()[0]
    assert kb.generation == generation
