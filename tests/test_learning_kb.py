"""A knowledge base that learns from the user's generations (`redi.generate_learning`), on the real ComfyUI with a
tiny model: first use creates it, only trajectories sampled in full are stored (checked against plain runs of the
same prompt and seed), the budget holds, and another process appending to the same KB meanwhile loses nothing."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from test_redi_nodes import CFG, SEED, STEPS

pytestmark = pytest.mark.comfy

STORE, KEY, VALUE, H = (3, 5, 7), 3, 7, 2
HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "learning_writer.py")


@pytest.fixture(scope="module")
def redi(pack):
    return pack.kb_tools


@pytest.fixture(scope="module")
def model():
    import tiny_models
    return tiny_models.make_tiny_model(0, "EPS")


@pytest.fixture(scope="module")
def settings(redi, model):
    return redi.learning_settings(model, redi.Recipe("euler", "normal", STEPS, CFG), STORE, (4, 8, 8))


def conds(redi, prompts):
    import tiny_models
    return (redi.batch_conditioning([tiny_models.prompt_cond(p) for p in prompts]),
            redi.batch_conditioning([tiny_models.prompt_cond("")] * len(prompts)))


def generate(redi, model, settings, path, prompts, seeds, guard=-1.0, budget=None):
    import tiny_models
    positive, negative = conds(redi, prompts)
    kw = {} if budget is None else {"budget": budget}
    return redi.generate_learning(str(path), settings, model, positive, negative, tiny_models.empty_latent(len(prompts)),
                                  list(prompts), list(seeds), key_step=KEY, value_step=VALUE, neighbours=H, guard=guard,
                                  dtype="float32", **kw)


def plain_states(redi, model, prompt, seed):
    """The stored steps of a plain run of one prompt from one seed, sampled on its own."""
    import tiny_models
    positive, negative = conds(redi, [prompt])
    guider = redi.cfg_guider(model, positive, negative, CFG)
    sigmas = redi.schedule_sigmas(model, "euler", "normal", STEPS)
    _, kept, _ = redi.sample_counted(guider, tiny_models.empty_latent(1), [seed], sigmas, "euler", keep_steps=STORE)
    return kept


def assert_stored_as_plain(redi, model, kb, pair):
    i = kb.entries.index(pair)
    want = plain_states(redi, model, *pair)
    for st in STORE:
        np.testing.assert_allclose(kb.latents(st, [i]), want[st].numpy(), rtol=1e-4, atol=1e-4)


def test_first_use_creates_the_kb_and_learns_every_item(redi, model, settings, tmp_path):
    path = tmp_path / "learned"
    r = generate(redi, model, settings, path, ["prompt a", "prompt b"], [SEED, SEED])
    assert r.redi is None and (r.evaluations.per_item() == STEPS).all()
    assert "the KB was empty" in r.summary() and r.learned.added == 2
    kb = redi.KnowledgeBase.open(str(path))
    assert kb.entries == [("prompt a", SEED), ("prompt b", SEED)] and kb.settings.seed_policy == "per_entry"
    for pair in kb.entries:
        assert_stored_as_plain(redi, model, kb, pair)


def test_only_trajectories_sampled_in_full_are_stored(redi, model, settings, tmp_path):
    """A batch with a KB seed (near key: blended) and a foreign seed (far: sampled in full), the guard between them."""
    path = tmp_path / "learned"
    generate(redi, model, settings, path, [f"prompt {i}" for i in range(4)], [SEED] * 4)
    prompts, seeds = ["prompt 1 changed", "prompt 9"], [SEED, SEED + 1000]
    kb = redi.KnowledgeBase.open(str(path))
    count = len(kb)
    # Residuals of this batch, measured with a guard that accepts everything: nothing of it may be learned.
    everything = generate(redi, model, settings, path, prompts, seeds, guard=1e9)
    assert everything.redi.accepted.all() and everything.learned.added == 0
    assert len(redi.KnowledgeBase.open(str(path))) == count
    near, far = everything.redi.centered_residual
    assert near < far
    mixed = generate(redi, model, settings, path, prompts, seeds, guard=float(np.sqrt(near * far)))
    assert mixed.redi.accepted.tolist() == [True, False]
    assert mixed.learned.added == 1
    kb = redi.KnowledgeBase.open(str(path))
    assert len(kb) == count + 1 and ("prompt 9", SEED + 1000) in kb.entries
    assert ("prompt 1 changed", SEED) not in kb.entries  # the blended item never feeds back
    assert_stored_as_plain(redi, model, kb, ("prompt 9", SEED + 1000))
    # The refused item's output is the plain sampler's own.
    positive, negative = conds(redi, ["prompt 9"])
    import tiny_models
    out, _, _ = redi.sample_counted(redi.cfg_guider(model, positive, negative, CFG), tiny_models.empty_latent(1),
                                    [SEED + 1000], redi.schedule_sigmas(model, "euler", "normal", STEPS), "euler")
    torch.testing.assert_close(mixed.latent[1:], out, rtol=1e-4, atol=1e-4)
    assert kb.verify() == []


def test_budget_keeps_the_newest_generations(redi, model, settings, tmp_path):
    path = tmp_path / "learned"
    budget = redi.KBBudget(max_entries=3)
    for i in range(3):
        r = generate(redi, model, settings, path, [f"round {i} a", f"round {i} b"], [SEED + 10 * i, SEED + 10 * i + 1],
                     guard=0.0, budget=budget)
        assert r.learned.count <= 3
    kb = redi.KnowledgeBase.open(str(path), verify="full")
    assert kb.entries == [("round 2 a", SEED + 20), ("round 2 b", SEED + 21)] and kb.verify() == []


def test_another_process_appending_meanwhile_loses_nothing(redi, model, settings, tmp_path):
    """A real second process learns into the same KB in a loop while this one generates and learns."""
    path = tmp_path / "learned"
    generate(redi, model, settings, path, ["first"], [SEED])
    done = tmp_path / "done"
    writer = subprocess.Popen([sys.executable, HELPER, str(path), str(done)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        ours = [(f"ours {i}", SEED + 100 + i) for i in range(6)]
        for a, b in zip(ours[::2], ours[1::2]):
            r = generate(redi, model, settings, path, [a[0], b[0]], [a[1], b[1]], guard=0.0)
            assert r.learned.added == 2
    finally:
        done.write_text("done")
    out, err = writer.communicate(timeout=1800)  # a safety net, not a speed requirement
    assert writer.returncode == 0, err[-3000:]
    theirs = [line.split("\t") for line in out.splitlines() if line.startswith("LEARNED\t")]
    assert len(theirs) >= 3, out
    kb = redi.KnowledgeBase.open(str(path), verify="full")
    assert kb.verify() == []
    assert len(set(kb.entries)) == len(kb.entries)
    assert set(ours) <= set(kb.entries)
    assert {(p, int(s)) for _, p, s in theirs} <= set(kb.entries)
    assert len(kb) == 1 + len(ours) + len(theirs)
    for pair in ours[:2]:
        assert_stored_as_plain(redi, model, kb, pair)


def test_learning_node_schema_is_documented_and_registered(pack):
    import asyncio
    node = pack.nodes.learning.ReDiLearningSampler
    schema = node.define_schema()
    assert schema.node_id == "ReDiLearningSampler" and schema.category == "sampling/ReDi" and schema.description
    assert all(inp.tooltip for inp in schema.inputs), [inp.id for inp in schema.inputs if not inp.tooltip]
    assert node in asyncio.run(pack.nodes.ReDiExtension().get_node_list())
    assert node.validate_inputs(kb_name="../outside") is not True  # a KB name is a folder name, never a path
