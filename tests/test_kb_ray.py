"""Distributed KB builds (`python -m kb_tools build --ray`) on a real local Ray cluster with 2 CPU workers and
the tiny SD1.5-format checkpoint: same entries and bit-identical latents as a single-process build, a worker
killed mid-build, a driver killed mid-build. Every build runs in a real subprocess."""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

pytestmark = [pytest.mark.comfy, pytest.mark.slow]

PACK_DIR = Path(__file__).resolve().parent.parent
PROMPTS = ["a cat on a sofa", "a dog in the snow", "a red car", "a lighthouse at dusk", "a bowl of fruit", "a mountain lake"]
SAFETY = 1800  # seconds: a safety net for a hung process on a busy machine, not a speed check
# The test cluster's own token (Ray's token authentication), given to it and to every driver here,
# so nothing is read from or written to ~/.ray.
RAY_TOKEN = secrets.token_hex(32)


def _env(comfy_root: Path) -> dict:
    # One thread per process, as Ray gives its workers: the reference build then computes exactly as they do.
    return dict(os.environ, COMFYUI_PATH=str(comfy_root), PYTHONPATH=str(PACK_DIR), OMP_NUM_THREADS="1",
                RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=RAY_TOKEN)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _until(what: str, check, timeout: float = SAFETY):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = check()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def cluster(comfy_root):
    """A Ray head on 127.0.0.1 with 2 CPUs, started here (`ray start --head --block`) and stopped by its pids."""
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    log = open(os.path.join(temp, "ray-start.log"), "wb")
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}",
                             "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false", f"--temp-dir={temp}",
                             "--node-ip-address=127.0.0.1", "--disable-usage-stats"],
                            env=_env(comfy_root), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def gcs_up():
        if head.poll() is not None:
            raise AssertionError(f"ray start exited: {Path(temp, 'ray-start.log').read_text()[-3000:]}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0
    _until("the Ray head", gcs_up, 600)
    yield {"address": f"127.0.0.1:{port}", "head": head}
    procs = psutil.Process(head.pid).children(recursive=True)
    head.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started
    try:
        head.wait(timeout=1200)  # teardown: a busy machine may stop Ray slowly; kill only if it never does
    except subprocess.TimeoutExpired:
        head.kill()
    for p in procs:  # whatever it left behind, by pid
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    log.close()
    shutil.rmtree(temp, ignore_errors=True)


def _build_args(ckpt: Path, prompts: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "kb_tools", "build", "--ckpt", str(ckpt), "--prompts", str(prompts), "--out", str(out),
            "--steps", "4", "--store-steps", "1,2,3", "--width", "64", "--height", "64", "--cfg", "3",
            "--batch-size", "2", "--seeds-per-prompt", "2", "--cpu", *extra]


def _run(args: list[str], comfy_root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=PACK_DIR, env=_env(comfy_root), capture_output=True, text=True, timeout=SAFETY)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, comfy_root):
    from make_checkpoint import make_sd15_checkpoint

    root = tmp_path_factory.mktemp("ray")
    ckpt = make_sd15_checkpoint()
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    ref = _run(_build_args(ckpt, prompts, root / "reference"), comfy_root)  # single process, no Ray
    assert ref.returncode == 0, ref.stderr[-3000:]
    return {"root": root, "ckpt": ckpt, "prompts": prompts, "reference": root / "reference"}


def _same_as_reference(kb_path: Path, reference: Path) -> None:
    from kb_tools.store import KnowledgeBase

    kb, ref = KnowledgeBase.open(kb_path, verify="full"), KnowledgeBase.open(reference)
    assert sorted(kb.entries) == sorted(ref.entries) and len(set(kb.entries)) == len(kb.entries)
    assert kb.verify() == []
    ids = {p: i for i, p in enumerate(kb.entries)}
    for step in ref.stored_steps:
        np.testing.assert_array_equal(kb.latents(step, [ids[p] for p in ref.entries]), ref.latents(step, range(len(ref))))


def _shard_builders(cluster) -> list:
    found = []
    for p in psutil.Process(cluster["head"].pid).children(recursive=True):
        try:
            if "ShardBuilder" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def _shard_counts(out: Path) -> dict[str, int]:
    from kb_tools.store import KnowledgeBase
    from kb_tools.build.distributed import shards_folder

    folder = Path(shards_folder(str(out)))
    counts = {}
    for d in sorted(folder.glob("shard-*")) if folder.is_dir() else []:
        if (d / "manifest.json").is_file():
            counts[d.name] = len(KnowledgeBase.open(d))
    return counts


def test_ray_build_equals_single_process_build_and_resumes_a_finished_kb(setup, cluster, comfy_root):
    out = setup["root"] / "on_ray"
    run = _run(_build_args(setup["ckpt"], setup["prompts"], out, "--ray", cluster["address"], "--workers", "2"), comfy_root)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"added {2 * len(PROMPTS)} trajectories (0 were already there)" in run.stdout
    _same_as_reference(out, setup["reference"])
    assert not Path(str(out) + ".ray-shards").exists()  # merged shards are cleaned up

    # A rerun with one more prompt samples only that prompt's pairs and adds them to the finished KB.
    more = setup["root"] / "more.txt"
    more.write_text("\n".join(PROMPTS + ["a tall ship"]) + "\n")
    run = _run(_build_args(setup["ckpt"], more, out, "--ray", cluster["address"], "--workers", "2"), comfy_root)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"added 2 trajectories ({2 * len(PROMPTS)} were already there), {2 * len(PROMPTS) + 2} in total" in run.stdout


def test_a_killed_worker_is_retried_and_the_kb_is_complete(setup, cluster, comfy_root):
    out = setup["root"] / "worker_killed"
    driver = subprocess.Popen(_build_args(setup["ckpt"], setup["prompts"], out, "--ray", cluster["address"], "--workers", "2"),
                              cwd=PACK_DIR, env=_env(comfy_root), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Once a worker has its model and writes its first shard, kill it (a real SIGKILL of the actor's process).
        _until("a shard being built", lambda: _shard_counts(out) or driver.poll() is not None)
        victims = _until("a worker process", lambda: _shard_builders(cluster) or driver.poll() is not None)
        assert driver.poll() is None, "the build finished before a worker could be killed"
        busy = [p for p in victims if ".build" in " ".join(p.cmdline())] or victims
        busy[0].kill()
        stdout, stderr = driver.communicate(timeout=SAFETY)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, stderr[-3000:]
    assert "added 12 trajectories" in stdout
    _same_as_reference(out, setup["reference"])


def test_rerun_after_a_killed_driver_adds_only_what_is_missing(setup, cluster, comfy_root):
    out = setup["root"] / "driver_killed"
    args = _build_args(setup["ckpt"], setup["prompts"], out, "--ray", cluster["address"], "--workers", "2")
    driver = subprocess.Popen(args, cwd=PACK_DIR, env=_env(comfy_root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _until("a finished shard", lambda: any(_shard_counts(out).values()) or driver.poll() is not None)
    finally:
        driver.kill()  # SIGKILL: no cleanup runs in the driver
        driver.wait(timeout=SAFETY)
    assert not (out / "manifest.json").exists(), "the build finished before the driver could be killed"
    _until("the killed driver's workers to exit", lambda: not _shard_builders(cluster))
    folder = Path(str(out) + ".ray-shards")
    kept = {os.stat(f).st_ino for f in folder.glob("shard-*/shards/*.safetensors")}
    assert kept, "no shard was committed before the kill"

    run = _run(args, comfy_root)
    assert run.returncode == 0, run.stderr[-3000:]
    _same_as_reference(out, setup["reference"])
    # What the killed run committed was merged as it was (hard links to the same files), not sampled again.
    assert kept <= {os.stat(f).st_ino for f in (out / "shards").glob("*.safetensors")}
    assert not folder.exists()
