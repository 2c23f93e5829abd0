"""The calibrated sampler's nodes on the real ComfyUI with a tiny in-process model: ReDiCalibrateSampler calibrates a
tiny knowledge base (N = 3, 4; a few teachers), ReDiCalibratedSampler runs the stored choice at N counted evaluations,
the native parts (ReDiCalibratedSigmas + SamplerReDiCalibrated) reproduce it inside SamplerCustomAdvanced with
CFGGuider and with EasyCache, and every refusal names its fix."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from test_redi_nodes import build

pytestmark = pytest.mark.comfy

CFG = 3.0
NFE = (3, 4)
TEACHERS = 8
SEED = 11
#: The calibration's own sizes, small for the test (the node uses kb_tools' defaults): a 10-step teacher grid, a
#: 2 x 2 built-in grid for the held-out check, one search sweep (tests/test_sampler_calibration.py does the same).
SMALL = dict(fine_steps=10, samplers=("euler", "dpmpp_2m"), schedules=("normal", "karras"), search_sweeps=1, chunk=4)
NODE_IDS = ("ReDiCalibrateSampler", "ReDiCalibratedSampler", "ReDiCalibratedSigmas", "SamplerReDiCalibrated")


class PromptClip:
    """The CLIP interface ReDiCalibrateSampler calls (tokenize, encode_from_tokens_scheduled) over the tiny model's
    deterministic prompt embedding: the tiny UNet has no text encoder of its own."""

    def tokenize(self, prompt: str) -> str:
        return prompt

    def encode_from_tokens_scheduled(self, tokens: str) -> list:
        import tiny_models
        return tiny_models.prompt_cond(tokens)


@pytest.fixture(scope="module")
def redi(pack):
    return pack.kb_tools


@pytest.fixture(scope="module")
def nodes(pack):
    """The node module, its calibrate_sampler (kb_tools' real one) called with the SMALL sizes."""
    module = pack.nodes.calibrated
    with pytest.MonkeyPatch.context() as patch:
        real = module.calibrate_sampler
        # The SMALL sizes win over what the node passes (its teacher_steps / compare_with inputs at their defaults).
        patch.setattr(module, "calibrate_sampler", lambda *args, **kwargs: real(*args, **{**kwargs, **SMALL}))
        yield module


@pytest.fixture(scope="module")
def custom():
    from comfy_extras import nodes_custom_sampler
    return nodes_custom_sampler


@pytest.fixture(scope="module")
def model():
    import tiny_models
    return tiny_models.make_tiny_model(0, "EPS")


def cond(prompt: str) -> list:
    import tiny_models
    return tiny_models.prompt_cond(prompt)


def empty(batch: int = 1, size: int = 8) -> dict:
    import tiny_models
    return {"samples": tiny_models.empty_latent(batch, size)}


def calibrate(nodes, model, **kw):
    args = dict(model=model, clip=PromptClip(), nfe=",".join(map(str, NFE)), cfg=f"{CFG:g}", teachers=TEACHERS,
                negative_prompt="")
    args.update(kw)
    return nodes.ReDiCalibrateSampler.execute(**args)


@pytest.fixture(scope="module")
def calibrated(redi, nodes, model, tmp_path_factory):
    """(knowledge base, summary, ui) of ReDiCalibrateSampler on a tiny KB of TEACHERS prompts."""
    kb = build(redi, model, tmp_path_factory.mktemp("kb") / "kb", [f"prompt {i}" for i in range(TEACHERS)], cfg=CFG)
    out = calibrate(nodes, model, knowledge_base=kb)
    return out.result[0], out.result[1], out.ui


def drop_in(nodes, model, kb, *, steps=NFE[-1], cfg=CFG, seed=SEED, latent=None, prompt="prompt 1"):
    return nodes.ReDiCalibratedSampler.execute(model=model, positive=cond(prompt), negative=cond(""),
                                               latent_image=latent or empty(2), seed=seed, knowledge_base=kb,
                                               steps=steps, cfg=cfg)


def native(nodes, custom, model, kb, *, steps=NFE[-1], cfg=CFG, guider_cfg=None, sigmas=None, seed=SEED,
           prompt="prompt 1", latent=None, on_result=None):
    """SamplerCustomAdvanced(RandomNoise, CFGGuider, SamplerReDiCalibrated, ReDiCalibratedSigmas) -> (latent, sampler)."""
    sampler = nodes.SamplerReDiCalibrated.execute(knowledge_base=kb, steps=steps, cfg=cfg).result[0]
    if on_result is not None:  # in a server the summary goes to the node's own box (feedback.show_text)
        sampler.on_result = on_result
    if sigmas is None:
        sigmas = nodes.ReDiCalibratedSigmas.execute(model=model, knowledge_base=kb, steps=steps, cfg=cfg).result[0]
    guider = custom.CFGGuider.execute(model=model, positive=cond(prompt), negative=cond(""),
                                      cfg=cfg if guider_cfg is None else guider_cfg).result[0]
    noise = custom.RandomNoise.execute(noise_seed=seed).result[0]
    out = custom.SamplerCustomAdvanced.execute(noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                                               latent_image=latent or empty(2)).result[0]["samples"]
    return out, sampler


# --------------------------------------------------------------------------- schema


def test_nodes_are_registered_documented_and_tooltips_hold_no_figures(pack):
    import asyncio
    registered = {cls.define_schema().node_id for cls in asyncio.run(pack.nodes.ReDiExtension().get_node_list())}
    assert set(NODE_IDS) <= registered
    for cls in pack.nodes.calibrated.NODES:
        schema = cls.define_schema()
        assert schema.node_id in NODE_IDS and schema.category == "sampling/ReDi" and schema.description
        for inp in schema.inputs:
            assert inp.tooltip, (schema.node_id, inp.id)
            # Tooltips say what a knob does and which way to turn it; measured figures belong in the README.
            assert not re.search(r"\d\.\d+e-\d|\d+(\.\d+)?\s*x\b|\d+\s*%", inp.tooltip), (schema.node_id, inp.id)


def test_nfe_and_cfg_lists_are_checked_at_validation(nodes):
    node = nodes.ReDiCalibrateSampler
    assert node.validate_inputs(nfe="4, 5,6,8,10", cfg="3,7.5") is True
    assert node.validate_inputs() is True  # linked inputs are not known at validation
    for bad in ("", "4,x", "0", "4.5", "-3"):
        message = node.validate_inputs(nfe=bad, cfg="7")
        assert isinstance(message, str) and "e.g. 4,5,6,8,10" in message, (bad, message)
    for bad in ("", "seven", "nan", "-1", "1e9"):
        message = node.validate_inputs(nfe="4", cfg=bad)
        assert isinstance(message, str) and "e.g. 7 or 3,7.5" in message, (bad, message)
    assert nodes.parse_nfe_list("8,4,4") == (4, 8) and nodes.parse_cfg_list("7.5, 3") == (3.0, 7.5)


# --------------------------------------------------------------------------- calibrate


def test_calibration_is_stored_with_the_kb_and_summarised_per_step_count(redi, calibrated):
    kb, summary, ui = calibrated
    lines = summary.splitlines()
    assert [int(re.match(r"best for this model at (\d+) steps: ", line).group(1)) for line in lines] == list(NFE), summary
    assert ui["text"] == [summary]
    stored = redi.load_sampler_calibration(kb)
    assert [int(n) for n in stored.nfe_values] == list(NFE) and [float(c) for c in stored.cfgs] == [CFG]
    assert tuple(stored.latent_shape) == (4, 8, 8)
    reopened = redi.KnowledgeBase.open(kb.path)  # the calibration is on disk, not only in this process
    assert [int(n) for n in redi.load_sampler_calibration(reopened).nfe_values] == list(NFE)


def test_rerun_resumes_and_an_interrupt_stops_cleanly(nodes, model, calibrated):
    import comfy.model_management
    kb, summary, _ = calibrated
    again = calibrate(nodes, model, knowledge_base=kb)  # everything is stored: nothing to run again
    assert again.result[1] == summary
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            calibrate(nodes, model, knowledge_base=kb, nfe="5")
    finally:
        comfy.model_management.interrupt_current_processing(False)


def test_calibrate_from_prompts_creates_its_own_kb(pack, redi, nodes, model, tmp_path):
    import folder_paths
    root = tmp_path / "redi_kb"
    root.mkdir()
    folder_paths.add_model_folder_path("redi_kb", str(root), is_default=True)
    try:
        out = calibrate(nodes, model, nfe="3", teachers=4, prompts="a cat\na dog\n\na red car\na lighthouse",
                        kb_name="prompt-calibration", latent_image=empty(1))
    finally:
        folder_paths.folder_names_and_paths["redi_kb"][0].remove(str(root))
    kb, summary = out.result[0], out.result[1]
    assert Path(kb.path) == root / "prompt-calibration"
    assert summary.startswith("best for this model at 3 steps: "), summary
    assert [int(n) for n in redi.load_sampler_calibration(kb).nfe_values] == [3]


def test_calibrate_needs_teachers_and_a_size(redi, nodes, model):
    with pytest.raises(redi.KBError, match="connect a knowledge base"):
        calibrate(nodes, model)
    with pytest.raises(redi.KBError, match="latent_image"):
        calibrate(nodes, model, prompts="a cat")


# --------------------------------------------------------------------------- sample


def test_drop_in_runs_the_stored_choice_at_n_counted_evaluations(redi, nodes, model, calibrated):
    kb, _, _ = calibrated
    for n in NFE:
        out = drop_in(nodes, model, kb, steps=n)
        samples, text = out.result[0]["samples"], out.ui["text"][0]
        choice = redi.load_sampler_calibration(kb).choice(model, CFG, (4, 8, 8), n)
        assert samples.shape == (2, 4, 8, 8) and torch.isfinite(samples).all()
        assert text.startswith(f"best for this model at {n} steps: "), text
        if choice.kind == "builtin":  # no silent fallback: the line says a built-in sampler ran, and which
            assert f"Ran the built-in {choice.sampler_name}/{choice.schedule}" in text, text
        else:  # evaluations counted at the denoiser: N per item
            assert "Ran the calibrated sampler" in text and f"{n} evaluations per item" in text, text


def test_native_parts_reproduce_the_drop_in(nodes, custom, model, calibrated):
    kb, _, _ = calibrated
    expected = drop_in(nodes, model, kb).result[0]["samples"]
    shown = []
    out, _ = native(nodes, custom, model, kb, on_result=shown.append)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert len(shown) == 1 and shown[0] == drop_in(nodes, model, kb).ui["text"][0], shown


def test_native_sampler_composes_with_easycache(nodes, custom, model, calibrated):
    from comfy_extras.nodes_easycache import EasyCacheNode
    kb, _, _ = calibrated
    cached = EasyCacheNode.execute(model=model, reuse_threshold=0.2, start_percent=0.15, end_percent=0.95,
                                   verbose=False).result[0]
    out, _ = native(nodes, custom, cached, kb)
    plain, _ = native(nodes, custom, model, kb)
    assert out.shape == plain.shape and torch.isfinite(out).all()


# --------------------------------------------------------------------------- refusals


def test_another_model_is_refused(redi, nodes, custom, model, calibrated):
    import tiny_models
    kb, _, _ = calibrated
    other = tiny_models.make_tiny_model(1, "EPS")
    with pytest.raises(redi.KBError):
        drop_in(nodes, other, kb)
    with pytest.raises(redi.KBError):
        nodes.ReDiCalibratedSigmas.execute(model=other, knowledge_base=kb, steps=NFE[-1], cfg=CFG)
    sigmas = nodes.ReDiCalibratedSigmas.execute(model=model, knowledge_base=kb, steps=NFE[-1], cfg=CFG).result[0]
    with pytest.raises(redi.KBError):  # the SAMPLER sees the model only when the run starts
        native(nodes, custom, other, kb, sigmas=sigmas)


def test_an_uncalibrated_step_count_names_the_calibrated_ones(redi, nodes, custom, model, calibrated):
    kb, _, _ = calibrated
    for run in (lambda: drop_in(nodes, model, kb, steps=5),
                lambda: nodes.ReDiCalibratedSigmas.execute(model=model, knowledge_base=kb, steps=5, cfg=CFG),
                lambda: nodes.SamplerReDiCalibrated.execute(knowledge_base=kb, steps=5, cfg=CFG)):
        with pytest.raises(redi.KBError, match=re.escape(str(list(NFE)))):
            run()


def test_an_uncalibrated_cfg_names_the_calibrated_ones(redi, nodes, custom, model, calibrated):
    kb, _, _ = calibrated
    for run in (lambda: drop_in(nodes, model, kb, cfg=7.0),
                lambda: nodes.SamplerReDiCalibrated.execute(knowledge_base=kb, steps=NFE[-1], cfg=7.0)):
        with pytest.raises(redi.KBError, match=f"calibrated for cfg {CFG:g}, not 7"):
            run()
    with pytest.raises(redi.KBError, match="GUIDER samples at cfg 7"):  # the CFGGuider's cfg is seen at run time
        native(nodes, custom, model, kb, guider_cfg=7.0)


def test_an_uncalibrated_latent_size_is_refused(redi, nodes, custom, model, calibrated):
    kb, _, _ = calibrated
    with pytest.raises(redi.KBError):
        drop_in(nodes, model, kb, latent=empty(1, size=16))
    with pytest.raises(redi.KBError):
        native(nodes, custom, model, kb, latent=empty(1, size=16))


def test_other_sigmas_are_refused_naming_the_sigmas_node(redi, nodes, custom, model, calibrated):
    kb, _, _ = calibrated
    basic = custom.BasicScheduler.execute(model=model, scheduler="simple", steps=NFE[-1], denoise=1.0).result[0]
    with pytest.raises(redi.KBError, match="ReDiCalibratedSigmas"):
        native(nodes, custom, model, kb, sigmas=basic)
    split = nodes.ReDiCalibratedSigmas.execute(model=model, knowledge_base=kb, steps=NFE[-1], cfg=CFG).result[0][1:]
    with pytest.raises(redi.KBError, match="ReDiCalibratedSigmas"):
        native(nodes, custom, model, kb, sigmas=split)


def test_a_kb_without_calibration_names_the_node_to_run(redi, nodes, model, tmp_path):
    bare = build(redi, model, tmp_path / "bare", ["a cat", "a dog"], cfg=CFG)
    with pytest.raises(redi.KBError, match="ReDiCalibrateSampler"):
        drop_in(nodes, model, bare)
    with pytest.raises(redi.KBError, match="ReDiCalibrateSampler"):
        nodes.SamplerReDiCalibrated.execute(knowledge_base=bare, steps=NFE[-1], cfg=CFG)


def test_teacher_steps_and_compare_with_reach_the_calibration(pack, nodes, model, calibrated, monkeypatch):
    """The two quick-try inputs are passed through: 'common choices' is the common grid, teacher_steps the fine grid."""
    seen = {}
    real = nodes.calibrate_sampler

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(nodes, "calibrate_sampler", spy)
    calibrate(nodes, model, knowledge_base=calibrated[0], teacher_steps=12, compare_with="common choices")
    k = pack.kb_tools
    assert (seen["fine_steps"], seen["samplers"], seen["schedules"]) == (12, k.COMMON_SAMPLERS, k.COMMON_SCHEDULES)
    assert set(k.COMMON_SAMPLERS) <= set(k.PLAIN_SAMPLERS) and set(k.COMMON_SCHEDULES) <= set(k.PLAIN_SCHEDULES)
