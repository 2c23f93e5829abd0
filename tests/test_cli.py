"""The offline command line (`python -m kb_tools`) on a real checkpoint, in real subprocesses."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kb_tools.core.errors import KBError
from kb_tools.build.prompts import read_prompts, shard_of

PACK_DIR = Path(__file__).resolve().parent.parent
PROMPTS = ["a cat on a sofa", "a dog in the snow", "a red car", "a lighthouse at dusk"]


def kb_tools(*args: str, comfy_root: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if comfy_root is not None:
        env["COMFYUI_PATH"] = str(comfy_root)
    return subprocess.run([sys.executable, "-m", "kb_tools", *args], cwd=PACK_DIR, env=env, capture_output=True,
                          text=True, timeout=1800)  # a safety net, not a speed check


def test_prompt_files_text_jsonl_and_coco(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n a dog \na cat\n")
    assert read_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat"}\n"a dog"\n{"caption": "a car"}\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["a cat", "a dog", "a car"]
    coco = {"annotations": [{"image_id": 2, "id": 5, "caption": "two b"}, {"image_id": 1, "id": 3, "caption": "one a"},
                            {"image_id": 1, "id": 4, "caption": "one b"}]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    assert read_prompts(tmp_path / "captions.json") == ["one a", "two b"]
    assert shard_of(list(range(7)), "2/3") == [1, 4]


def test_prompt_file_errors_name_the_fix(tmp_path):
    with pytest.raises(KBError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"title": 3}\n')
    with pytest.raises(KBError, match=r"bad.jsonl:2 has no 'prompt', 'caption' or 'text'"):
        read_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "x.json").write_text('{"images": []}')
    with pytest.raises(KBError, match="not a COCO captions file"):
        read_prompts(tmp_path / "x.json")
    with pytest.raises(KBError, match="must look like 'i/N'"):
        shard_of([1], "2")


def test_info_on_a_folder_that_is_no_kb_fails_cleanly(tmp_path):
    out = kb_tools("info", str(tmp_path))
    assert out.returncode == 2
    assert "error:" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.comfy
@pytest.mark.slow
def test_build_shards_resume_merge_info_verify(tmp_path, comfy_root):
    from make_checkpoint import make_sd15_checkpoint

    ckpt = make_sd15_checkpoint()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    common = ["--ckpt", str(ckpt), "--prompts", str(prompts), "--steps", "4", "--store-steps", "1,2,3",
              "--width", "64", "--height", "64", "--cfg", "3", "--batch-size", "2", "--cpu"]

    # An interrupted shard (here: cut short with --limit) is resumed by running it again.
    first = kb_tools("build", *common, "--out", str(tmp_path / "part1"), "--shard", "1/2", "--limit", "1", comfy_root=comfy_root)
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = kb_tools("build", *common, "--out", str(tmp_path / "part1"), "--shard", "1/2", comfy_root=comfy_root)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "added 1 trajectories (1 were already there), 2 in total" in resumed.stdout
    second = kb_tools("build", *common, "--out", str(tmp_path / "part2"), "--shard", "2/2", comfy_root=comfy_root)
    assert second.returncode == 0, second.stderr[-2000:]

    merged = kb_tools("merge", "--out", str(tmp_path / "all"), str(tmp_path / "part1"), str(tmp_path / "part2"))
    assert merged.returncode == 0, merged.stderr
    info = kb_tools("info", str(tmp_path / "all"))
    assert info.returncode == 0, info.stderr
    summary = json.loads(info.stdout)
    assert summary["count"] == len(PROMPTS)
    assert kb_tools("verify", str(tmp_path / "all")).returncode == 0

    # The merged KB serves queries from both shards.
    from kb_tools.store import KnowledgeBase
    kb = KnowledgeBase.open(str(tmp_path / "all"))
    assert sorted(p for p, _ in kb.entries) == sorted(PROMPTS)
    assert kb.settings.sampler == "euler" and kb.settings.steps == 4 and list(kb.settings.latent_shape) == [4, 8, 8]

    # Damage a shard: verify names it and exits non-zero.
    shard = sorted((tmp_path / "all" / "shards").glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    os.chmod(shard, 0o644)
    shard.unlink()  # merged shards are hard links: replace the file, leave part1's copy intact
    shard.write_bytes(bytes(data))
    bad = kb_tools("verify", str(tmp_path / "all"))
    assert bad.returncode == 1
    assert "PROBLEM" in bad.stdout and shard.name in bad.stdout


def test_calibrate_with_the_checkpoint_stores_the_plain_reference(tmp_path, comfy_root):
    """`calibrate --ckpt` samples a few KB prompts (in full, at equal NFE, resumed from blends) once and stores the
    tolerance "no worse than plain at equal NFE" beside the blend-error model."""
    from make_checkpoint import make_sd15_checkpoint

    from kb_tools.store import KnowledgeBase
    from kb_tools.calibration.plain_reference import reference_of

    ckpt = make_sd15_checkpoint()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "kb"
    built = kb_tools("build", "--ckpt", str(ckpt), "--prompts", str(prompts), "--steps", "4", "--store-steps", "1,2,3",
                     "--width", "64", "--height", "64", "--cfg", "3", "--cpu", "--out", str(out), comfy_root=comfy_root)
    assert built.returncode == 0, built.stderr[-2000:]
    done = kb_tools("calibrate", str(out), "--key-step", "1", "--neighbours", "2", "--sample", "4", "--ckpt", str(ckpt),
                    "--reference-items", "2", "--cpu", comfy_root=comfy_root)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1].startswith("plain reference for key step 1, H=2 (2 KB entries")
    reference = reference_of(KnowledgeBase.open(str(out)).calibration(1), 1, 2)
    assert [(r["value_step"], r["plain_nfe"]) for r in reference["rows"]] == [(2, 3), (3, 2)]  # k + T - v evaluations
    assert all(r["plain_rms"] > 0 and r["tolerance"] > 0 for r in reference["rows"])

    skip = kb_tools("calibrate", str(out), "--key-step", "1", "--ckpt", str(ckpt), "--skip-blend-error")
    assert skip.returncode == 2 and "drop --skip-blend-error" in skip.stderr
