"""The sampler calibration on a tiny real model: stored and reloaded bit for bit, resumed after a stop without
recomputing stored teachers (evaluations counted), the held-out winner rule, the refusals (another model, an
uncalibrated cfg / size / N, a damaged, hostile or linked record), and the CLI subcommand in a real subprocess."""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.comfy

PACK_DIR = Path(__file__).resolve().parent.parent
SHAPE = (4, 8, 8)
PROMPTS = [f"teacher prompt {i}" for i in range(8)]
#: small sizes: 8 teachers (2 held out), an 8-step teacher grid, two step counts, a 2 x 2 built-in grid
SMALL = dict(nfe=(2, 3), cfgs=(3.0,), teachers=8, latent_shape=SHAPE, fine_steps=8, samplers=("euler", "dpmpp_2m"),
             schedules=("normal", "karras"), rhos=(3.0,), search_sweeps=1, chunk=4)


@pytest.fixture(scope="module")
def k(pack):
    import importlib
    for name in ("store.sampler_calibration", "calibration.heldout", "store.transaction"):
        importlib.import_module(f"{pack.__name__}.kb_tools.{name}")
    return pack.kb_tools


@pytest.fixture(scope="module")
def model():
    import tiny_models
    return tiny_models.make_tiny_model(0, "EPS")


def encode(prompt: str) -> list:
    import tiny_models
    return tiny_models.prompt_cond(prompt)


@pytest.fixture(scope="module")
def calibrated(k, model, tmp_path_factory):
    """A calibration from prompts into an empty folder (which builds the KB first): (folder, calibration)."""
    root = str(tmp_path_factory.mktemp("calibrated") / "kb")
    cal = k.calibrate_sampler(root, model, encode, prompts=PROMPTS, **SMALL)
    return root, cal


def _record_file(k, root: str) -> Path:
    return Path(root) / k.store.manifest.read_manifest(root).calibration["sampler"]["file"]


# --------------------------------------------------------------------------- stored and reloaded


def test_the_calibration_is_stored_with_the_kb_and_reloads_bit_for_bit(k, model, calibrated):
    root, cal = calibrated
    assert cal.nfe_values == [2, 3] and cal.cfgs == [3.0] and cal.latent_shape == SHAPE
    kb = k.KnowledgeBase.open(root)
    assert kb.verify() == [] and kb.info()["sampler_calibration"] is True and len(kb) == len(PROMPTS)
    again = k.load_sampler_calibration(kb)
    assert again.record == cal.record == k.store.sampler_calibration.read_record(root)
    block = cal.record["cfgs"]["3"]
    for n in (2, 3):
        a, b = cal.choice(model, 3.0, SHAPE, n), again.choice(model, 3.0, SHAPE, n)
        assert torch.equal(a.sigmas, b.sigmas) and a.sigmas.dtype == torch.float32 and len(a.sigmas) == a.steps + 1
        if a.kind == "calibrated":
            assert torch.equal(a.coeffs, torch.tensor(block["nfe"][str(n)]["coeffs"], dtype=torch.float64))
        assert a.summary_line().startswith(f"best for this model at {n} steps: ")
    files = [Path(root) / t["file"] for t in block["teachers"]]
    assert len(files) == 8 and all(f.is_file() for f in files)
    fields = k.store.sampler_calibration.teacher_fields
    first = block["teachers"][0]
    f = fields(cal.record["model_fingerprint"], first["prompt"], first["seed"], 3.0, "", SHAPE, 8)
    s1, d1, sha = k.store.sampler_calibration.load_teacher(root, f, first["sha256"])
    s2, d2, _ = k.store.sampler_calibration.load_teacher(root, f)
    assert sha == first["sha256"] and torch.equal(s1, s2) and torch.equal(d1, d2) and s1.shape == (9, *SHAPE)
    # the record says what was measured: split, doubling figure, cost, every held-out figure
    assert sorted(sum(block["split"].values(), [])) == list(range(8)) and len(block["split"]["heldout"]) == 2
    assert block["doubling"]["mse"] >= 0 and block["doubling"]["items"] == 2
    assert block["cost"]["teacher_evaluations"] == 64 and block["cost"]["seconds"] > 0
    h = block["nfe"]["3"]["heldout"]
    assert set(h["grid"]) == {"euler/normal", "euler/karras", "dpmpp_2m/normal", "dpmpp_2m/karras"} and h["n"] == 2


@pytest.mark.parametrize("kind", ["calibrated", "builtin"])
def test_the_choice_runs_in_comfyui_at_its_nfe(k, model, calibrated, kind):
    root, cal = calibrated
    record = copy.deepcopy(cal.record)  # both verdicts, whichever the 2 held-out items gave (too few to prove a win)
    record["cfgs"]["3"]["nfe"]["3"]["heldout"]["kind"] = kind
    choice = k.SamplerCalibration(record).choice(model, 3.0, SHAPE, 3)
    assert choice.kind == kind and cal.choice(model, 3.0, SHAPE, 3).kind == "builtin"
    pos = k.batch_conditioning([encode("a fresh prompt"), encode("another one")])
    neg = k.batch_conditioning([encode("")] * 2)
    latent = torch.zeros(2, *SHAPE)
    tally = k.Evaluations(2)
    with torch.no_grad():
        out = k.cfg_guider(model, pos, neg, 3.0).sample(k.seeded_noise(latent, [11, 12]), latent, choice.ksampler(tally),
                                                        choice.sigmas, disable_pbar=True, seed=11)
    assert torch.isfinite(out).all()
    assert tally.per_item().tolist() == [3, 3]  # counted for a built-in choice too


# --------------------------------------------------------------------------- resume after a stop


def test_a_rerun_after_a_stop_resumes_without_recomputing_stored_teachers(k, model, calibrated, tmp_path):
    root, cal = calibrated
    copy = tmp_path / "kb"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("sampler_calibration"))
    quick = {**SMALL, "nfe": (2,), "samplers": ("euler",), "schedules": ("karras",), "rhos": (), "search_sweeps": 0}
    calls = []

    def stop_at_second_chunk() -> bool:
        calls.append(1)
        return len(calls) >= 2  # the first teacher chunk (4 items) runs, then the run stops
    assert k.calibrate_sampler(str(copy), model, encode, should_stop=stop_at_second_chunk, **quick) is None
    stored = sorted((copy / "sampler_calibration").glob("teacher-*.safetensors"))
    assert len(stored) == 4
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in stored}
    with pytest.raises(k.KBError, match="calibrate-sampler"):
        k.load_sampler_calibration(str(copy))  # nothing finished: no record yet

    resumed = k.calibrate_sampler(str(copy), model, encode, **quick)
    cost = resumed.record["cfgs"]["3"]["cost"]
    assert cost["teacher_evaluations_this_run"] == 4 * SMALL["fine_steps"]  # only the 4 missing teachers ran
    assert cost["evaluations_this_run"] == (cost["teacher_evaluations_this_run"] + cost["fit_evaluations"]
                                            + cost["heldout_evaluations"])
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in stored} == before
    assert resumed.record["cfgs"]["3"]["teachers"] == cal.record["cfgs"]["3"]["teachers"]  # same items, same files
    assert resumed.nfe_values == [2]


def test_a_rerun_with_more_step_counts_computes_only_the_new_ones(k, model, calibrated, tmp_path):
    root, cal = calibrated
    copy = tmp_path / "kb"
    shutil.copytree(root, copy)
    said = []
    more = k.calibrate_sampler(str(copy), model, encode, prompts=PROMPTS, log=said.append, **{**SMALL, "nfe": (2, 3, 4)})
    block, before = more.record["cfgs"]["3"], cal.record["cfgs"]["3"]
    assert more.nfe_values == [2, 3, 4]
    assert block["nfe"]["2"] == before["nfe"]["2"] and block["nfe"]["3"] == before["nfe"]["3"]
    assert block["cost"]["teacher_evaluations_this_run"] == 0 and block["cost"]["fit_evaluations"] > 0
    assert sum("kept" in line for line in said) == 2
    said.clear()  # another search is another calibration: every N is computed again
    k.calibrate_sampler(str(copy), model, encode, prompts=PROMPTS, log=said.append, **{**SMALL, "search_sweeps": 0})
    assert not any("kept" in line for line in said)


# --------------------------------------------------------------------------- the held-out winner rule


def test_the_calibrated_sampler_wins_only_beyond_two_paired_standard_errors(k):
    choose = k.calibration.heldout.choose_winner
    rng = np.random.default_rng(0)
    base = rng.uniform(1.0, 2.0, 32)
    builtin = {"deis/karras": base, "euler/normal": base * 3}
    clear = choose(base * 0.5, builtin)
    assert clear["kind"] == "calibrated" and clear["best_builtin"] == "deis/karras" and clear["n"] == 32
    noisy = base * 0.98 + rng.normal(0, 0.3, 32)  # a little better on average, well within 2 paired SE
    verdict = choose(noisy, builtin)
    assert verdict["best_builtin_mse"] - verdict["calibrated_mse"] < 2 * verdict["diff_se"]
    assert verdict["kind"] == "builtin"
    assert choose(base * 1.5, builtin)["kind"] == "builtin"
    assert choose(np.full(32, np.inf), builtin)["kind"] == "builtin"
    se = k.calibration.heldout.paired_se(np.array([1.0, 2.0, 3.0]), np.array([0.5, 1.0, 2.5]))
    assert se == pytest.approx(np.std([0.5, 1.0, 0.5], ddof=1) / np.sqrt(3))
    few = {name: v[:3] for name, v in builtin.items()}
    assert choose(base[:3] * 0.5, few)["kind"] == "builtin"  # 3 held-out items cannot prove a win
    assert choose(base[:4] * 0.5, {name: v[:4] for name, v in builtin.items()})["kind"] == "calibrated"
    with pytest.raises(k.KBError):
        choose(base, {})


# --------------------------------------------------------------------------- refusals


def test_other_model_cfg_size_and_nfe_are_refused_naming_the_fix(k, calibrated):
    import tiny_models
    root, cal = calibrated
    with pytest.raises(k.KBError, match="different model"):
        cal.choice(tiny_models.make_tiny_model(1, "EPS"), 3.0, SHAPE, 3)
    model = tiny_models.make_tiny_model(0, "EPS")
    with pytest.raises(k.KBError, match=r"cfg 3, not 7.5.*calibrate-sampler.*--cfg 7.5"):
        cal.choice(model, 7.5, SHAPE, 3)
    with pytest.raises(k.KBError, match=r"latents \[4, 8, 8\], not \[4, 16, 16\].*calibrate-sampler"):
        cal.choice(model, 3.0, (4, 16, 16), 3)
    with pytest.raises(k.KBError, match=r"covers \[2, 3\] steps.*not 7.*--nfe 7"):
        cal.choice(model, 3.0, SHAPE, 7)


def _plant_record(k, root: str, data: bytes) -> None:
    """Commit a hand-made record file with a correct manifest pointer: what a hostile writer could leave."""
    store = k.store
    digest = store.files.sha256_bytes(data)
    rel = f"sampler_calibration/record-{digest[:16]}.json"
    (Path(root) / rel).write_bytes(data)
    base = store.manifest.read_manifest(root)
    with store.transaction.transaction(root, base) as txn:
        pointer = {"file": rel, "bytes": len(data), "sha256": digest}
        txn.commit(base.evolve(calibration=store.settings.freeze({**base.calibration, "sampler": pointer})))


def test_damaged_hostile_or_linked_records_are_refused(k, calibrated, tmp_path):
    root, cal = calibrated
    copy = tmp_path / "kb"
    shutil.copytree(root, copy)
    record = _record_file(k, str(copy))
    good = record.read_bytes()

    record.write_bytes(good.replace(b'"version": 1', b'"version": 2'))
    with pytest.raises(k.KBError, match=r"fails its sha256.*calibrate-sampler"):
        k.load_sampler_calibration(str(copy))

    record.unlink()
    (tmp_path / "elsewhere.json").write_bytes(good)
    os.symlink(tmp_path / "elsewhere.json", record)
    with pytest.raises(k.KBError, match=r"symbolic link.*calibrate-sampler"):
        k.load_sampler_calibration(str(copy))
    record.unlink()
    record.write_bytes(good)
    assert k.load_sampler_calibration(str(copy)).nfe_values == [2, 3]

    hostile = json.loads(good)
    hostile["cfgs"]["3"]["nfe"]["3"]["heldout"]["best_builtin_mse"] = 1e999  # decodes to inf
    _plant_record(k, str(copy), json.dumps(hostile).encode().replace(b"Infinity", b"1e999"))
    with pytest.raises(k.KBError, match=r"(?i)(finite|infinit|range).*calibrate-sampler"):
        k.load_sampler_calibration(str(copy))

    broken = json.loads(good)
    block = broken["cfgs"]["3"]["nfe"]["3"]
    block["heldout"]["kind"] = "calibrated"
    block["coeffs"] = [[0.0, 0.0]]
    _plant_record(k, str(copy), json.dumps(broken).encode())
    with pytest.raises(k.KBError, match=r"unusable schedule or table.*calibrate"):
        k.load_sampler_calibration(str(copy))

    folder = copy / "sampler_calibration"
    shutil.move(folder, tmp_path / "moved")
    os.symlink(tmp_path / "moved", folder)
    with pytest.raises(k.KBError, match=r"symbolic link or not a folder.*calibrate-sampler"):
        k.load_sampler_calibration(str(copy))


def test_a_kb_without_a_calibration_names_the_command(k, calibrated, tmp_path):
    root, _ = calibrated
    copy = tmp_path / "kb"
    shutil.copytree(root, copy)
    base = k.store.manifest.read_manifest(str(copy))
    with k.store.transaction.transaction(str(copy), base) as txn:
        txn.commit(base.evolve(calibration=k.store.settings.freeze(
            {s: v for s, v in base.calibration.items() if s != "sampler"})))
    with pytest.raises(k.KBError, match=r"holds no sampler calibration.*calibrate-sampler .*--ckpt"):
        k.load_sampler_calibration(str(copy))
    with pytest.raises(k.KBError, match="no knowledge base, and no prompts"):
        k.calibrate_sampler(str(tmp_path / "empty"), None, encode, **SMALL)


# --------------------------------------------------------------------------- the command line


def test_the_calibrate_sampler_command_on_a_checkpoint(tmp_path, comfy_root):
    from make_checkpoint import make_sd15_checkpoint

    ckpt = make_sd15_checkpoint()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(["a cat on a sofa", "a dog in the snow", "a red car", "a lighthouse at dusk"]) + "\n")
    out = tmp_path / "kb"
    env = {**os.environ, "COMFYUI_PATH": str(comfy_root)}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kb_tools", *args], cwd=PACK_DIR, env=env, capture_output=True,
                              text=True, timeout=1800)  # a safety net, not a speed check

    done = run("calibrate-sampler", str(out), "--ckpt", str(ckpt), "--prompts", str(prompts), "--nfe", "2,3", "--cfg", "3",
               "--teachers", "4", "--width", "64", "--height", "64", "--fine-steps", "8", "--samplers", "euler",
               "--schedules", "karras", "--search-sweeps", "0", "--batch-size", "4", "--cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert [line.split(": best for this model at ")[1][:7] for line in lines[-2:]] == ["2 steps", "3 steps"]
    info = json.loads(run("info", str(out)).stdout)
    assert info["sampler_calibration"] is True and info["count"] == 4
    refused = run("calibrate-sampler", str(tmp_path / "none"), "--ckpt", str(ckpt), "--cpu")
    assert refused.returncode == 2 and "no prompts were given" in refused.stderr
