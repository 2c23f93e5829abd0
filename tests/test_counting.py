"""NFE counted at the diffusion model's forward pass (benchmarks/forward_counter.py) on the real ComfyUI with a tiny model:
the known counts of plain samplers, cfg 1, ComfyUI's EasyCache skipping work inside the model call,
the innermost-wrapper rule, and per-item counts of a ReDi batch whose items resume from different steps."""
from __future__ import annotations

import importlib

import pytest
import torch

from test_native_sampling import PerItemNoise, cfg_guider, cond, native
from test_redi_nodes import SEED, STEPS, build

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def kt(pack):
    return pack.kb_tools


@pytest.fixture(scope="module")
def fc(pack):
    """The forward counter, imported within the pack so that it reads the items the pack's CountedDenoiser names."""
    return importlib.import_module(f"{pack.__name__}.benchmarks.forward_counter")


@pytest.fixture(scope="module")
def model():
    import tiny_models
    return tiny_models.make_tiny_model(0, "V_PREDICTION")


def plain_run(kt, fc, model, sampler, *, steps=STEPS, cfg=3.0, batch=3, scheduler="normal"):
    """(forward counts, denoiser evaluations) of one plain run of `batch` items."""
    import tiny_models
    clone, counter = fc.counted(model)
    guider = kt.cfg_guider(clone, cond(*[f"prompt {i}" for i in range(batch)]) if batch > 1 else cond("prompt 0"),
                                 cond(""), cfg)
    sigmas = kt.schedule_sigmas(clone, sampler, scheduler, steps)
    with counter.session(batch) as counts:
        _, _, tally = kt.sample_counted(guider, tiny_models.empty_latent(batch), [SEED + i for i in range(batch)],
                                              sigmas, sampler)
    return counts, tally


@pytest.mark.parametrize("sampler, expected", [("euler", STEPS), ("heun", 2 * STEPS - 1), ("dpmpp_2m", STEPS),
                                               ("uni_pc", STEPS), ("ipndm", STEPS)])
def test_plain_samplers_count_their_known_nfe(kt, fc, model, sampler, expected):
    """Euler evaluates once per step, Heun twice except on the last step (it ends with an Euler step to sigma 0)."""
    counts, tally = plain_run(kt, fc, model, sampler)
    assert counts.nfe().tolist() == [expected] * 3
    assert counts.negative.tolist() == [expected] * 3  # cfg 3: one unconditional row per prediction
    assert counts.nfe().tolist() == tally.per_item().tolist()  # nothing skipped: both places agree
    assert counts.rows == 2 * 3 * expected


def test_cfg_one_runs_no_unconditional_rows(kt, fc, model):
    counts, _ = plain_run(kt, fc, model, "euler", cfg=1.0)
    assert counts.nfe().tolist() == [STEPS] * 3 and counts.negative.tolist() == [0] * 3


def easycache(model, threshold):
    from comfy_extras import nodes_easycache
    return nodes_easycache.EasyCacheNode.execute(model, reuse_threshold=threshold, start_percent=0.0, end_percent=1.0,
                                                 verbose=False).result[0]


def test_easycache_skips_are_not_counted(kt, fc):
    """EasyCache answers some model calls from its cache: the denoiser still sees every step, the forward pass fewer."""
    import tiny_models
    model = tiny_models.make_tiny_model(0, "V_PREDICTION")
    counts, tally = plain_run(kt, fc, easycache(model, 3.0), "euler", steps=20)
    assert tally.per_item().tolist() == [20] * 3
    assert 0 < counts.nfe()[0] < 20 and len(set(counts.nfe().tolist())) == 1  # one skip decision for the batch
    assert counts.negative.tolist() == counts.nfe().tolist()
    full, _ = plain_run(kt, fc, easycache(model, 0.0), "euler", steps=20)  # threshold 0 never reuses
    assert full.nfe().tolist() == [20] * 3


def test_counter_must_be_innermost(kt, fc, model):
    """A cache applied after the counter would hide its skips from it: refused with the fix."""
    import tiny_models
    clone, counter = fc.counted(model)
    cached = easycache(clone, 0.2)
    guider = kt.cfg_guider(cached, cond("prompt 0"), cond(""), 3.0)
    sigmas = kt.schedule_sigmas(cached, "euler", "normal", STEPS)
    with counter.session(1), pytest.raises(kt.KBError, match="innermost"):
        kt.sample_counted(guider, tiny_models.empty_latent(1), [SEED], sigmas, "euler")


def test_redi_items_resuming_from_different_steps_are_counted_per_item(pack, kt, fc, model, tmp_path):
    """Items 0 and 2 jump from k=3 to v=7, item 1 (foreign noise) is sent back to k: sub-batches counted per item."""
    from comfy_extras import nodes_custom_sampler as custom
    import tiny_models
    kb = build(kt, model, tmp_path / "kb", [f"prompt {i}" for i in range(10)], seeds=(SEED, SEED + 2))
    clone, counter = fc.counted(model)
    guider = cfg_guider(custom, clone, cond("prompt 2", "prompt 4", "prompt 7"))
    noise = PerItemNoise(kt.seeded_noise, [SEED, SEED + 1, SEED + 2])
    with counter.session(3) as counts:
        _, result = native(pack.nodes, custom, guider, kb, tiny_models.empty_latent(3), noise=noise)
    assert result.accepted.tolist() == [True, False, True]
    assert counts.nfe().tolist() == result.evaluations.per_item().tolist() == [STEPS - 4, STEPS, STEPS - 4]


def test_calls_outside_a_session_are_not_counted(kt, fc, model):
    import tiny_models
    clone, counter = fc.counted(model)
    guider = kt.cfg_guider(clone, cond("prompt 0"), cond(""), 3.0)
    sigmas = kt.schedule_sigmas(clone, "euler", "normal", 4)
    kt.sample_counted(guider, tiny_models.empty_latent(1), [SEED], sigmas, "euler")
    assert counter.uncounted_calls == 4
    with counter.session(1) as counts:
        kt.sample_counted(guider, torch.zeros(1, 4, 8, 8), [SEED], sigmas, "euler")
    assert counts.nfe().tolist() == [4]


def test_runs_of_one_item_count_for_their_item_of_the_session(kt, fc, model):
    """A query set generated one item at a time (a learning KB's order): each batch-of-one run counts for its own item."""
    import tiny_models
    clone, counter = fc.counted(model)
    guider = kt.cfg_guider(clone, cond("prompt 0"), cond(""), 3.0)
    with counter.session(3) as counts:
        for index, steps in ((2, 4), (0, 3)):
            sigmas = kt.schedule_sigmas(clone, "euler", "normal", steps)
            with counter.item(index) as one:
                kt.sample_counted(guider, tiny_models.empty_latent(1), [SEED], sigmas, "euler")
            assert one.nfe().tolist() == [steps]
        with pytest.raises(kt.KBError, match="outside the open counting session"):
            with counter.item(3):
                pass
    assert counts.nfe().tolist() == [3, 0, 4] and counts.negative.tolist() == [3, 0, 4]
    assert counts.calls == 7 and counts.rows == 14
