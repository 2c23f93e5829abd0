"""Foundations of the converged-reference benchmark (benchmarks/h2h/converged.py, benchmarks/h2h/store.py).

converged: references sampled with the plain dpmpp_2m/karras path at N and 2N on a tiny real ComfyUI model,
cached by the digest of their fields, loaded without any model call, only missing items computed.
store: per-item results in SQLite that survive a SIGKILLed writer, resume without duplicates, read while
written (WAL), and aggregate as numpy does.
"""
from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny_models import make_tiny_model, prompt_cond

pytestmark = pytest.mark.comfy

PACK = Path(__file__).resolve().parent.parent
SHAPE = (4, 8, 8)
N = 3
SOLVER = ("dpmpp_2m", "karras", N)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: a tiny model's convolutions on a shared machine are far faster without thread contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(one_thread):
    return make_tiny_model(seed=3)


def counting(model):
    """A clone whose post-CFG hook counts denoiser calls (one per call, whatever the batch)."""
    calls = []
    clone = model.clone()

    def hook(args):
        calls.append(args["denoised"].shape[0])
        return args["denoised"]

    clone.set_model_sampler_post_cfg_function(hook)
    return clone, calls


def plain(model, prompts, seeds, steps, cfg=2.0, negative=""):
    from kb_tools.comfy.plain import sample_prompts
    from kb_tools.core.records import Recipe

    return sample_prompts(model, prompt_cond, prompts, seeds, Recipe("dpmpp_2m", "karras", steps, cfg), latent_shape=SHAPE,
                          negative_prompt=negative, batch_size=8).latents.float()


def test_references_are_the_2n_run_cached_by_digest_and_loaded_without_sampling(tiny, tmp_path):
    from benchmarks.h2h import converged as C

    model, calls = counting(tiny)
    prompts, seeds = ["a red square", "a blue circle"], [11, 12]
    first = C.converged(model, prompt_cond, prompts, seeds, cfg=2.0, latent_shape=SHAPE, solver=SOLVER, cache_dir=tmp_path)
    assert first.computed == [0, 1] and len(calls) == N + 2 * N  # one batch at N, one at 2N: dpmpp_2m calls once a step
    assert first.latents.shape == (2, *SHAPE) and first.steps == N

    # the reference is the plain 2N run; the gap is the per-item MSE between the N and 2N runs
    at_n, at_2n = plain(tiny, prompts, seeds, N), plain(tiny, prompts, seeds, 2 * N)
    torch.testing.assert_close(first.latents, at_2n)
    np.testing.assert_allclose(first.gaps, ((at_n - at_2n) ** 2).flatten(1).mean(1).numpy(), rtol=1e-5)
    assert (first.gaps > 0).all() and first.max_gap == first.gaps.max()

    # one file per item, named by the sha256 of the fields' sorted JSON, N and the gap in the metadata, no temp left
    fp = C.model_id(tiny)
    for i, path in enumerate(first.paths):
        f = C.fields(fp, prompts[i], seeds[i], 2.0, "", SHAPE, SOLVER)
        assert path == tmp_path / (hashlib.sha256(json.dumps(f, sort_keys=True).encode()).hexdigest() + ".safetensors")
        tensor, meta = C.load(path)
        torch.testing.assert_close(tensor, at_2n[i])
        assert meta["steps"] == N and meta["gap"] == pytest.approx(first.gaps[i]) and meta["fields"] == f
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in first.paths)

    # the same fields again: loaded, no model call; a new item among them: only it is sampled, in one batch of one
    calls.clear()
    again = C.converged(model, prompt_cond, prompts, seeds, cfg=2.0, latent_shape=SHAPE, solver=SOLVER, cache_dir=tmp_path)
    assert again.computed == [] and calls == []
    assert torch.equal(again.latents, first.latents) and np.array_equal(again.gaps, first.gaps)
    mixed = C.converged(model, prompt_cond, [prompts[1], "a green cross", prompts[0]], [12, 13, 11], cfg=2.0,
                        latent_shape=SHAPE, solver=SOLVER, cache_dir=tmp_path)
    assert mixed.computed == [1] and calls == [1] * (3 * N)
    assert torch.equal(mixed.latents[0], first.latents[1]) and torch.equal(mixed.latents[2], first.latents[0])
    torch.testing.assert_close(mixed.latents[1], plain(tiny, ["a green cross"], [13], 2 * N)[0])

    # any field changed is another reference: cfg, negative prompt, seed, N
    for kw in ({"cfg": 3.0}, {"negative_prompt": "blurry"}, {"solver": ("dpmpp_2m", "karras", N + 1)}):
        calls.clear()
        args = {"cfg": 2.0, "latent_shape": SHAPE, "solver": SOLVER, **kw}
        other = C.converged(model, prompt_cond, prompts[:1], seeds[:1], cache_dir=tmp_path, **args)
        assert other.computed == [0] and calls and other.paths[0] not in first.paths
    other = C.converged(model, prompt_cond, prompts[:1], [99], cfg=2.0, latent_shape=SHAPE, solver=SOLVER, cache_dir=tmp_path)
    assert other.computed == [0]
    torch.testing.assert_close(C.converged(tiny, prompt_cond, prompts[:1], seeds[:1], cfg=2.0, latent_shape=SHAPE,
                                           solver=SOLVER, cache_dir=tmp_path, negative_prompt="blurry").latents[0],
                               plain(tiny, prompts[:1], seeds[:1], 2 * N, negative="blurry")[0])


def test_the_gap_shrinks_as_n_grows_and_gap_ok_is_the_one_twentieth_rule(tiny, tmp_path):
    from benchmarks.h2h import converged as C

    gaps = [C.converged(tiny, prompt_cond, ["a red square"], [5], cfg=2.0, latent_shape=SHAPE, solver=("dpmpp_2m", "karras", n),
                        cache_dir=tmp_path).gaps[0] for n in (2, 8)]
    assert gaps[1] < gaps[0] / 4  # a second-order solver: 4x the steps cuts the doubling gap by far more than 4x
    assert C.gap_ok(0.049, 1.0) and not C.gap_ok(0.05, 1.0) and not C.gap_ok(float("nan"), 1.0)


def test_a_failed_write_leaves_no_reference_and_no_temp_file(tiny, tmp_path, monkeypatch):
    from benchmarks.h2h import converged as C

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(C, "save_file", broken)
    with pytest.raises(OSError):
        C.converged(tiny, prompt_cond, ["a red square"], [5], cfg=2.0, latent_shape=SHAPE, solver=SOLVER, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- the results store

CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    from benchmarks.h2h.store import Row, RunClock, Store

    db, total, batch, stop = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    clock = RunClock()
    with Store(db) as st:
        run = st.start_run("child " + " ".join(sys.argv[3:]), commit="test", cores=2)
        keys = [("T20", "heldout", "euler", "b10", i) for i in range(total)]
        todo = [k for k in keys if k not in st.done(keys)]
        print("todo", " ".join(str(k[4]) for k in todo), flush=True)
        for b, start in enumerate(range(0, len(todo), batch)):
            rows = [Row(*k, nfe=10, mse_converged=k[4] / 7, mse_full_step=None, feature_distance=k[4] * 2.0)
                    for k in todo[start:start + batch]]
            if b == stop:  # the batch in flight: inserted in an open transaction, then the process is killed
                st.db.execute("BEGIN IMMEDIATE")
                st.db.executemany("INSERT INTO results (regime, workload, method, setting, item, nfe) VALUES (?, ?, ?, ?, ?, ?)",
                                  [(*r.key, r.nfe) for r in rows])
                print("inflight", flush=True)
                sys.stdin.readline()
                raise SystemExit("not killed")
            print("committed", st.add(rows, run), flush=True)
        st.finish_run(run, *clock.seconds())
    print("finished", flush=True)
""")


def child(db, total, batch, stop):
    return subprocess.Popen([sys.executable, "-c", CHILD, str(PACK), str(db), str(total), str(batch), str(stop)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_killed_run_keeps_its_committed_batches_and_the_next_run_continues_exactly_once(tmp_path):
    from benchmarks.h2h.store import Store

    db = tmp_path / "results.sqlite"
    first = child(db, 23, 5, 2)
    lines = [first.stdout.readline().strip() for _ in range(4)]
    assert lines == ["todo " + " ".join(map(str, range(23))), "committed 5", "committed 5", "inflight"], first.stderr.read()
    with Store(db) as reader:  # WAL: a report reads while the killed-to-be writer holds its write transaction open
        assert reader.journal_mode == "wal"
        assert [r.item for r in reader.rows()] == list(range(10))
    first.send_signal(signal.SIGKILL)
    assert first.wait(timeout=1800) == -signal.SIGKILL
    for stream in (first.stdout, first.stderr, first.stdin):
        stream.close()

    second = child(db, 23, 5, -1)
    out, err = second.communicate(timeout=1800)
    assert second.returncode == 0, err
    lines = out.split("\n")
    assert lines[0] == "todo " + " ".join(map(str, range(10, 23))) and lines[1:5] == ["committed 5", "committed 5", "committed 3", "finished"]

    with Store(db) as st:
        rows = st.rows()
        assert [r.item for r in rows] == list(range(23))  # every item exactly once (the key is the primary key)
        assert all(r.mse_converged == pytest.approx(r.item / 7) and r.feature_distance == r.item * 2.0 and r.mse_full_step is None
                   for r in rows)
        runs = st.runs()
        assert [r["command"] for r in runs] == ["child 23 5 2", "child 23 5 -1"] and runs[0]["finished"] is None
        assert runs[1]["finished"] and runs[1]["wall_seconds"] >= 0 and runs[1]["cpu_seconds"] >= 0 and runs[1]["cores"] == 2
        assert st.add(rows[:3]) == 0 and len(st.rows()) == 23  # an existing key is never written twice
        by_run = dict(st.db.execute("SELECT run_id, COUNT(*) FROM results GROUP BY run_id").fetchall())
        assert by_run == {runs[0]["run_id"]: 10, runs[1]["run_id"]: 13}


def test_done_cells_and_paired_se_equal_numpy_on_hand_made_rows(tmp_path):
    from benchmarks.h2h.store import Row, Store

    rng = np.random.default_rng(0)
    a, b = rng.gamma(2.0, 0.01, 40), rng.gamma(2.0, 0.012, 40)
    rows = [Row("T20", "heldout", "redi", "k2", i, 10, a[i], a[i] / 2, None) for i in range(40)]
    rows += [Row("T20", "heldout", "oracle", "b10", i, 10 if i < 30 else 9, b[i], None, 1.0 + i) for i in range(40)]
    rows += [Row("T20", "heldout", "redi", "k2", 40, 10, None, None, None)]  # not scored: counted in n, not in the MSE
    with Store(tmp_path / "r.sqlite") as st:
        run = st.start_run("hand", commit="abc", cores=1)
        assert st.add(rows[:50], run) == 50 and st.add(rows, run) == len(rows) - 50
        keys = [("T20", "heldout", "redi", "k2", i) for i in (0, 39, 40, 41)] + [("T20", "other", "redi", "k2", 0)]
        assert st.done(keys) == set(keys[:3])

        cells = {(c["method"], c["nfe"]): c for c in st.cells()}
        assert set(cells) == {("redi", 10), ("oracle", 10), ("oracle", 9)}
        r = cells[("redi", 10)]
        assert (r["n"], r["n_scored"]) == (41, 40) and r["feature_distance_mean"] is None
        assert r["mse_converged_mean"] == pytest.approx(np.mean(a), rel=1e-12)
        assert r["mse_converged_p95"] == pytest.approx(np.percentile(a, 95), rel=1e-12)
        assert r["mse_full_step_mean"] == pytest.approx(np.mean(a / 2), rel=1e-12)
        o = cells[("oracle", 9)]
        assert o["n"] == 10 and o["mse_converged_p95"] == pytest.approx(np.percentile(b[30:], 95), rel=1e-12)
        assert o["feature_distance_mean"] == pytest.approx(np.mean(np.arange(30, 40) + 1.0))

        p = st.paired_se(("redi", "k2"), ("oracle", "b10"), regime="T20", workload="heldout")
        d = a - b
        assert p["n"] == 40 and p["items"] == list(range(40))
        assert p["mean_diff"] == pytest.approx(d.mean(), rel=1e-12)
        assert p["se"] == pytest.approx(d.std(ddof=1) / np.sqrt(40), rel=1e-12)
        assert p["se"] < np.sqrt(a.var(ddof=1) / 40 + b.var(ddof=1) / 40) * 2  # a sane size: the same order as unpaired
        assert st.paired_se(("redi", "k2"), ("oracle", "b10"), regime="T20", workload="other")["se"] is None


def test_a_verdict_is_resolved_only_where_the_reference_gap_cannot_move_it():
    from benchmarks.h2h.summary import resolves

    # The rule: the gap below 1/20 of the smaller error decides any verdict, a tie included.
    assert resolves(1e-7, 4e-6, 3e-6, "tie") and not resolves(2e-7, 4e-6, 3e-6, "tie")
    # A wide loss stands although the oracle's error is small: the gap (1.7e-6) moves each mean by at most
    # g + 2 sqrt(mse g), about 1e-4 together, far below the 1.1e-3 margin.
    assert resolves(1.7e-6, 1.1e-3, 2.0e-5, "loss") and not resolves(1.7e-6, 1.1e-3, 2.0e-5, "tie")
    # A narrow win within that reach is not decided; a non-finite gap decides nothing.
    assert not resolves(1.7e-6, 2.0e-5, 3.0e-5, "win")
    assert not resolves(float("nan"), 1.0, 2.0, "loss")
