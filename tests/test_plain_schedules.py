"""The plain choices by name (kb_tools.comfy.schedules) on the real ComfyUI: KSampler's schedulers give KSampler's
sigmas, the preset names give exactly what the AlignYourStepsScheduler / GITSScheduler nodes give, Heun's budget counts
2 evaluations per step but 1 on the last, and what no schedule can do is refused with KBError."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def sch(pack):
    import importlib
    return importlib.import_module(f"{pack.__name__}.kb_tools.comfy.schedules")


@pytest.fixture(scope="module")
def model():
    import tiny_models
    return tiny_models.make_tiny_model(0, "EPS")


def test_every_listed_choice_builds_a_falling_schedule(sch, model):
    import comfy.samplers
    assert set(sch.PLAIN_SAMPLERS) <= set(comfy.samplers.KSampler.SAMPLERS)
    assert set(sch.PLAIN_SCHEDULES) <= set(sch.schedule_names())
    for schedule in sch.PLAIN_SCHEDULES:
        sigmas = sch.plain_sigmas(model, "euler", schedule, 6)
        assert sigmas.shape == (7,), schedule
        assert float(sigmas[-1]) == 0.0 and bool((sigmas[:-1] > sigmas[1:]).all()), schedule


def test_presets_are_the_nodes_sigmas_and_schedulers_are_ksamplers(sch, model):
    from comfy_extras.nodes_align_your_steps import AlignYourStepsScheduler
    from comfy_extras.nodes_gits import GITSScheduler
    assert torch.equal(sch.plain_sigmas(model, "euler", "ays_sd1", 8), AlignYourStepsScheduler.execute("SD1", 8, 1.0).result[0])
    assert torch.equal(sch.plain_sigmas(model, "deis", "gits_1.2", 6), GITSScheduler.execute(1.2, 6, 1.0).result[0])
    import comfy.samplers
    ks = comfy.samplers.KSampler(model, steps=5, device="cpu", sampler="uni_pc", scheduler="karras", model_options={})
    assert torch.equal(sch.plain_sigmas(model, "uni_pc", "karras", 5), ks.sigmas.float().cpu())


def test_budgets_count_heun_twice_but_its_last_step_once(sch):
    assert [sch.steps_for_nfe("heun", n) for n in (1, 2, 3, 4, 5, 10)] == [1, 1, 2, 2, 3, 5]
    assert [sch.nfe_for_steps("heun", s) for s in (1, 2, 3, 5)] == [1, 3, 5, 9]
    assert sch.steps_for_nfe("dpmpp_2m", 7) == 7 and sch.nfe_for_steps("euler", 7) == 7


def test_what_no_schedule_can_do_is_refused(sch, model):
    with pytest.raises(sch.KBError, match="at least 1"):
        sch.steps_for_nfe("euler", 0)
    with pytest.raises(sch.KBError, match="2 to 1000 steps"):
        sch.plain_sigmas(model, "euler", "gits_1.2", 1)
    with pytest.raises(sch.KBError, match="unknown scheduler"):
        sch.plain_sigmas(model, "euler", "ays_sd3", 6)
