"""ReDi on a real ComfyUI with tiny in-process models: exactness, NFE accounting, samplers,
batches, cfg = 1, refusal of mismatched knowledge bases, and the residual guard."""
from __future__ import annotations

import logging

import pytest
import torch

from kb_tools.comfy import model_facts as cs

pytestmark = pytest.mark.comfy

STEPS = 10
CFG = 3.0
SEED = 7


@pytest.fixture(scope="module")
def redi(pack):
    return pack.kb_tools


@pytest.fixture(scope="module")
def nodes(pack):
    return pack.nodes


@pytest.fixture(scope="module")
def errors(pack):
    return pack.kb_tools.core.errors


@pytest.fixture(scope="module")
def tiny():
    import tiny_models
    return tiny_models


@pytest.fixture(scope="module")
def model(tiny):
    return tiny.make_tiny_model(0, "V_PREDICTION")


class EvalCounter:
    """Counts denoiser evaluations through ComfyUI's post-CFG hook on a model clone, and the sigmas evaluated."""

    def __init__(self):
        self.count = 0
        self.sigmas: list[float] = []

    def __deepcopy__(self, memo):
        # ModelPatcher.clone() deep-copies model_options; every clone must share this counter.
        return self

    def __call__(self, args):
        self.count += 1
        self.sigmas.append(float(args["sigma"].flatten()[0]))
        return args["denoised"]


def counted(model):
    counter = EvalCounter()
    clone = model.clone()
    clone.set_model_sampler_post_cfg_function(counter)
    return clone, counter


def build(redi, model, path, prompts, seeds=(SEED,), sampler="euler", store=(3, 5, 7), dtype="float32", cfg=CFG, encode=None, tiny=None):
    import tiny_models
    spec = redi.BuildSpec(prompts=list(prompts), seeds=list(seeds), recipe=redi.Recipe(sampler, "normal", STEPS, cfg),
                          store_steps=list(store), latent_shape=(4, 8, 8), dtype=dtype)
    return redi.build_knowledge_base(str(path), model, encode or tiny_models.prompt_cond, spec).kb


def ksampler(model, prompt, seed=SEED, sampler="euler", cfg=CFG, batch=1):
    import comfy.sample
    import tiny_models
    lat = tiny_models.empty_latent(batch)
    return comfy.sample.sample(model, comfy.sample.prepare_noise(lat, seed), STEPS, cfg, sampler, "normal",
                               tiny_models.prompt_cond(prompt), tiny_models.prompt_cond(""), lat, seed=seed, disable_pbar=True)


def run_sampler(nodes, model, kb, prompt, *, key=3, value=5, h=1, guard=-1.0, seed_mode="kb", seed=0, batch=1, mode="lstsq", resume_positive=None):
    import tiny_models
    out = nodes.redi_sampler.ReDiSampler.execute(model=model, positive=tiny_models.prompt_cond(prompt), negative=tiny_models.prompt_cond(""),
                                    latent_image={"samples": tiny_models.empty_latent(batch)}, knowledge_base=kb, key_step=key,
                                    value_step=value, neighbours=h, weight_mode=mode, guard=guard, seed_mode=seed_mode, seed=seed,
                                    resume_positive=resume_positive)
    return out.result[0]["samples"]


@pytest.mark.parametrize("model_type", ["EPS", "V_PREDICTION", "FLOW"])
def test_own_trajectory_reproduces_ksampler_and_saves_exactly_the_skipped_steps(redi, nodes, tiny, model_type, tmp_path):
    model = tiny.make_tiny_model(0, model_type)
    kb = build(redi, model, tmp_path / "kb", ["a cat", "a dog", "a red car"])
    reference = ksampler(model, "a cat")
    counted_model, counter = counted(model)
    out = run_sampler(nodes, counted_model, kb, "a cat", key=3, value=7)
    assert torch.isfinite(out).all()
    # Random tiny EPS models produce latents of magnitude ~80: compare relative to the scale.
    assert (out - reference).abs().max().item() < 1e-4 * max(1.0, reference.abs().max().item())
    # 10 steps, key 3, value 7: 3 before retrieval + 3 after = 6 evaluations, 4 saved.
    assert counter.count == STEPS - (7 - 3)


def test_partial_then_resume_at_key_equals_split_ksampler_advanced(pack, nodes, model, tmp_path, redi):
    import nodes as comfy_nodes  # ComfyUI's own nodes.py
    import tiny_models
    kb = build(redi, model, tmp_path / "kb", ["a cat", "a dog"], store=(3, 5))
    pos, neg = tiny_models.prompt_cond("a dog"), tiny_models.prompt_cond("")
    lat = {"samples": tiny_models.empty_latent(1)}
    adv = comfy_nodes.KSamplerAdvanced()
    first = adv.sample(model, "enable", SEED, STEPS, CFG, "euler", "normal", pos, neg, lat, 0, 3, "enable")[0]
    split = adv.sample(model, "disable", SEED, STEPS, CFG, "euler", "normal", pos, neg, first, 3, 10000, "disable")[0]["samples"]

    query = nodes.redi_chain.ReDiPartialSample.execute(model=model, positive=pos, negative=neg, latent_image=lat, knowledge_base=kb,
                                            key_step=3, seed_mode="kb", seed=0).result[0]
    assert torch.allclose(query["samples"], first["samples"], atol=1e-5)
    neighbours = nodes.redi_chain.ReDiRetrieve.execute(query_latent=query, knowledge_base=kb, neighbours=1).result[0]
    value = nodes.redi_chain.ReDiBlend.execute(neighbours=neighbours, value_step=3, weight_mode="lstsq").result[0]
    # value step == key step: the blend of the query's own stored key is the query itself.
    out = nodes.redi_chain.ReDiResumeSample.execute(model=model, positive=pos, negative=neg, value_latent=value, guard=-1.0).result[0]["samples"]
    assert (out - split).abs().max().item() < 1e-4


def all_samplers():
    import comfy.samplers
    return list(comfy.samplers.KSampler.SAMPLERS)


def test_every_sampler_resumes_on_exactly_the_remaining_sigmas(redi, model, tmp_path):
    """The resume runs sigmas[v:] exactly: no step dropped (the official code drops one after PNDM)."""
    import comfy.samplers
    import tiny_models
    problems = []
    for i, name in enumerate(comfy.samplers.KSampler.SAMPLERS):
        sigmas = cs.schedule_sigmas(model, name, "normal", STEPS)
        latent = tiny_models.empty_latent(1)
        probed, probe = counted(model)
        start = 5
        guider = redi.cfg_guider(probed, tiny_models.prompt_cond("x"), tiny_models.prompt_cond(""), CFG)
        out, _, _ = redi.sample_counted(guider, latent + 0.5, [SEED], sigmas[start:], name, noise=torch.zeros_like(latent))
        if not torch.isfinite(out).all():
            problems.append(f"{name}: non-finite output")
        if name in cs.SCHEDULE_FREE_SAMPLERS:
            continue
        seen = {round(s, 4) for s in probe.sigmas}
        expected = {round(float(s), 4) for s in sigmas[start:-1] if float(s) > 0}
        # Every remaining schedule sigma is evaluated; none before the resume point is.
        if not expected <= seen:
            problems.append(f"{name}: skipped sigmas {sorted(expected - seen)}")
        if max(probe.sigmas) > float(sigmas[start]) * 1.0001:
            problems.append(f"{name}: evaluated above the resume sigma")
    assert not problems, problems


@pytest.mark.slow
def test_redi_runs_for_every_sampler(redi, nodes, model, tmp_path):
    import comfy.samplers
    failures = []
    for name in comfy.samplers.KSampler.SAMPLERS:
        if name in cs.SCHEDULE_FREE_SAMPLERS:
            with pytest.raises(redi.KBError, match="chooses its own noise levels"):
                build(redi, model, tmp_path / name, ["a cat"], sampler=name)
            continue
        kb = build(redi, model, tmp_path / name, ["a cat", "a dog"], sampler=name, store=(3, 5))
        out = run_sampler(nodes, model, kb, "a cat", key=3, value=5, h=2, guard=100.0)
        if not torch.isfinite(out).all():
            failures.append(name)
    assert not failures


def test_batch_of_two_equals_two_single_runs(redi, nodes, model, tmp_path):
    kb = build(redi, model, tmp_path / "kb", ["a cat", "a dog", "a red car"], seeds=(SEED, SEED + 1))
    batch = run_sampler(nodes, model, kb, "a cat", batch=2, seed_mode="custom", seed=SEED, h=2, guard=100.0)
    one = run_sampler(nodes, model, kb, "a cat", batch=1, seed_mode="custom", seed=SEED, h=2, guard=100.0)
    two = run_sampler(nodes, model, kb, "a cat", batch=1, seed_mode="custom", seed=SEED + 1, h=2, guard=100.0)
    assert torch.allclose(batch[0:1], one, atol=1e-4)
    assert torch.allclose(batch[1:2], two, atol=1e-4)
    assert not torch.allclose(one, two, atol=1e-2)


def test_cfg_one_updates_latents_and_reproduces_ksampler(redi, nodes, model, tmp_path):
    kb = build(redi, model, tmp_path / "kb", ["a cat", "a dog"], cfg=1.0)
    out = run_sampler(nodes, model, kb, "a cat", key=3, value=5)
    reference = ksampler(model, "a cat", cfg=1.0)
    assert (out - reference).abs().max().item() < 1e-4
    noise_only = ksampler(model, "a cat", cfg=1.0) * 0
    assert not torch.allclose(out, noise_only)


def test_mismatched_kb_is_refused_before_any_sampling(redi, nodes, model, tiny, tmp_path, errors):
    kb = build(redi, model, tmp_path / "kb", ["a cat"])
    other, counter = counted(tiny.make_tiny_model(1, "V_PREDICTION"))
    with pytest.raises(errors.KBMismatchError, match="weights differ"):
        run_sampler(nodes, other, kb, "a cat")
    eps, eps_counter = counted(tiny.make_tiny_model(0, "EPS"))
    with pytest.raises(errors.KBMismatchError, match="sampling type"):
        run_sampler(nodes, eps, kb, "a cat")
    bigger = tiny.make_tiny_model(0, "V_PREDICTION", model_channels=64)
    with pytest.raises(errors.KBMismatchError, match="architecture"):
        run_sampler(nodes, bigger, kb, "a cat")
    assert counter.count == 0 and eps_counter.count == 0

    mine, mine_counter = counted(model)
    with pytest.raises(errors.KBMismatchError, match=r"latent size.*\[4, 8, 8\].*\[4, 16, 16\]"):
        nodes.redi_chain.ReDiPartialSample.execute(model=mine, positive=tiny.prompt_cond("a"), negative=tiny.prompt_cond(""),
                                        latent_image={"samples": tiny.empty_latent(1, size=16)}, knowledge_base=kb,
                                        key_step=3, seed_mode="kb", seed=0)
    for override in ({"sampler_override": "dpmpp_2m"}, {"steps_override": 20}):
        with pytest.raises(errors.KBMismatchError, match="knowledge base has"):
            nodes.redi_chain.ReDiPartialSample.execute(model=mine, positive=tiny.prompt_cond("a"), negative=tiny.prompt_cond(""),
                                            latent_image={"samples": tiny.empty_latent(1)}, knowledge_base=kb,
                                            key_step=3, seed_mode="kb", seed=0, **override)
    with pytest.raises(errors.KBError, match="stores no latents at key step 4"):
        run_sampler(nodes, mine, kb, "a cat", key=4, value=5)
    assert mine_counter.count == 0

    # Rebuilding into the same KB with a different recipe names the differing setting.
    with pytest.raises(errors.KBMismatchError, match="sampler"):
        build(redi, model, tmp_path / "kb", ["a dog"], sampler="heun")


def test_guard_falls_back_for_foreign_noise_and_says_so(redi, nodes, model, tmp_path, caplog):
    prompts = [f"prompt {i}" for i in range(20)]
    kb = build(redi, model, tmp_path / "kb", prompts, seeds=(SEED,))
    counted_model, counter = counted(model)
    reference = ksampler(model, "prompt 3", seed=SEED + 1000)
    with caplog.at_level(logging.INFO, logger="ReDi"):
        out = run_sampler(nodes, counted_model, kb, "prompt 3", key=3, value=7, h=2, seed_mode="custom", seed=SEED + 1000)
    text = caplog.text
    assert "not in the knowledge base" in text
    assert "guard fell back to plain sampling" in text
    # Fallback continues from the query's own key latent: the full 10 steps, output = plain run.
    assert counter.count == STEPS
    assert (out - reference).abs().max().item() < 1e-4


def test_guard_accepts_a_kb_seed_query_and_skips(redi, nodes, model, tmp_path, caplog):
    prompts = [f"prompt {i}" for i in range(20)]
    kb = build(redi, model, tmp_path / "kb", prompts)
    counted_model, counter = counted(model)
    with caplog.at_level(logging.INFO, logger="ReDi"):
        run_sampler(nodes, counted_model, kb, "prompt 3", key=3, value=7, h=2)
    assert "skipped 4 steps" in caplog.text
    assert counter.count == STEPS - 4


def test_stylization_resumes_with_a_different_conditioning(redi, nodes, model, tmp_path):
    import tiny_models
    kb = build(redi, model, tmp_path / "kb", ["a cat", "a dog"])
    plain = run_sampler(nodes, model, kb, "a cat", key=3, value=5)
    styled = run_sampler(nodes, model, kb, "a cat", key=3, value=5, resume_positive=tiny_models.prompt_cond("a cat, oil painting"))
    assert torch.isfinite(styled).all()
    assert not torch.allclose(plain, styled, atol=1e-3)


def test_latent_from_elsewhere_gets_a_clear_error(nodes, model, tmp_path, errors, redi):
    import tiny_models
    kb = build(redi, model, tmp_path / "kb", ["a cat"])
    with pytest.raises(errors.KBError, match="needs the LATENT that comes out of ReDiPartialSample"):
        nodes.redi_chain.ReDiRetrieve.execute(query_latent={"samples": tiny_models.empty_latent(1)}, knowledge_base=kb, neighbours=1)


def test_every_node_has_description_category_and_input_tooltips(nodes):
    for node in [*nodes.knowledge_base.NODES, *nodes.redi_chain.NODES, *nodes.redi_sampler.NODES]:
        schema = node.define_schema()
        assert schema.category == "sampling/ReDi"
        assert schema.description
        for inp in schema.inputs:
            assert inp.tooltip, f"{schema.node_id}.{inp.id} has no tooltip"
    ids = {n.define_schema().node_id for n in [*nodes.knowledge_base.NODES, *nodes.redi_chain.NODES, *nodes.redi_sampler.NODES]}
    assert {"ReDiLoadKnowledgeBase", "BuildKnowledgeBase", "ReDiPartialSample", "ReDiRetrieve", "ReDiBlend",
            "ReDiResumeSample", "ReDiSampler"} <= ids


def test_lora_patch_warns_through_the_fingerprint_and_still_runs(redi, nodes, model, tmp_path, caplog):
    kb = build(redi, model, tmp_path / "kb", ["a cat", "a dog"])
    patched = model.clone()
    key = next(k for k in patched.model_state_dict() if k.endswith(".weight") and "diffusion_model" in k)
    weight = patched.model_state_dict()[key]
    patched.add_patches({key: (torch.full_like(weight, 0.01),)}, strength_patch=1.0)
    with caplog.at_level(logging.WARNING, logger="ReDi"):
        out = run_sampler(nodes, patched, kb, "a cat")
    assert torch.isfinite(out).all()
    assert "weight patches (LoRA) differ" in caplog.text
    # The patched clone was loaded last; the base model's fingerprint must still read base weights.
    assert cs.model_fingerprint(model)["weight_probe"] == list(kb.settings.model_fingerprint["weight_probe"])  # settings hold tuples (frozen)


def test_interrupted_build_keeps_finished_entries_and_resumes(redi, model, tmp_path):
    import comfy.model_management
    import tiny_models
    prompts = [f"prompt {i}" for i in range(6)]
    spec = redi.BuildSpec(prompts=prompts, seeds=[SEED], recipe=redi.Recipe("euler", "normal", STEPS, CFG),
                          store_steps=[3, 5], latent_shape=(4, 8, 8), batch_size=2, dtype="float32", commit_every=64)
    calls = {"n": 0}

    def interrupt_on_third_batch():
        calls["n"] += 1
        if calls["n"] == 3:
            raise comfy.model_management.InterruptProcessingException()

    with pytest.raises(comfy.model_management.InterruptProcessingException):
        redi.build_knowledge_base(str(tmp_path / "kb"), model, tiny_models.prompt_cond, spec, check_interrupt=interrupt_on_third_batch)
    kb = redi.KnowledgeBase.open(str(tmp_path / "kb"))
    assert len(kb) == 4 and kb.verify() == []  # the two finished batches were committed
    report = redi.build_knowledge_base(str(tmp_path / "kb"), model, tiny_models.prompt_cond, spec)
    assert (report.added, report.already_present, len(report.kb)) == (2, 4, 6)
    assert sorted(p for p, _ in report.kb.entries) == sorted(prompts)
