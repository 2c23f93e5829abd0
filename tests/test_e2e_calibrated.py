"""End to end: the calibrated sampler's template in a real ComfyUI server with the pack loaded from outside its tree.

The build template makes the example knowledge base, template 9 calibrates it and samples with ReDi Calibrated Sampler
beside KSampler; the same calibration then runs as native custom-sampling parts (with CFGGuider, and with EasyCache on
the model), and the refusals reach the user as the prompt's error. The SD1.5-format test checkpoint of
test_e2e_server.py (random weights), 64x64 pixels, on the CPU.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_checkpoint import make_sd15_checkpoint  # noqa: E402
from server_harness import ServerError, server_for_prompts  # noqa: E402

pytestmark = [pytest.mark.comfy, pytest.mark.server, pytest.mark.slow]

PACK_DIR = Path(__file__).resolve().parent.parent
WORKFLOWS = PACK_DIR / "example_workflows"
BUILD = "1. Build a ReDi knowledge base"
TEMPLATE = "9. Generate with a calibrated sampler"
# Safety nets only (a busy 2-core machine is slow); the tests poll for completion.
TIMEOUT_S = 1800


def load_api(name: str) -> dict:
    return json.loads((WORKFLOWS / "api" / f"{name}.api.json").read_text(encoding="utf-8"))


def node_of(prompt: dict, class_type: str) -> str:
    ids = [nid for nid, node in prompt.items() if node["class_type"] == class_type]
    assert len(ids) == 1, (class_type, ids)
    return ids[0]


@pytest.fixture(scope="module")
def server(comfy_root, tmp_path_factory):
    with server_for_prompts(comfy_root, tmp_path_factory.mktemp("comfy-e2e-calibrated"), PACK_DIR,
                            [load_api(n) for n in (BUILD, TEMPLATE)], make_sd15_checkpoint()) as srv:
        yield srv


@pytest.fixture(scope="module")
def calibrated(server):
    """Build the example KB, then run template 9 once: (its API prompt, its history entry)."""
    assert server.run(load_api(BUILD), timeout=TIMEOUT_S)["status"]["status_str"] == "success"
    prompt = load_api(TEMPLATE)
    return prompt, server.run(prompt, timeout=TIMEOUT_S)


def native_prompt(template: dict, *, steps: int, cfg: float, easycache: bool = False, scheduler: str | None = None) -> dict:
    """Template 9's model, prompts and calibrated KB into SamplerCustomAdvanced with the native parts."""
    prompt = {k: v for k, v in template.items() if v["class_type"] in (
        "CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "ReDiLoadKnowledgeBase", "ReDiCalibrateSampler")}
    ckpt, kb = node_of(template, "CheckpointLoaderSimple"), node_of(template, "ReDiCalibrateSampler")
    sampler = node_of(template, "ReDiCalibratedSampler")
    inputs = template[sampler]["inputs"]
    model = [ckpt, 0]
    if easycache:
        prompt["100"] = {"class_type": "EasyCache", "inputs": {"model": model, "reuse_threshold": 0.2, "start_percent": 0.15,
                                                               "end_percent": 0.95, "verbose": False}}
        model = ["100", 0]
    prompt["101"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}}
    prompt["102"] = {"class_type": "CFGGuider", "inputs": {"model": model, "positive": inputs["positive"],
                                                           "negative": inputs["negative"], "cfg": cfg}}
    prompt["103"] = {"class_type": "SamplerReDiCalibrated", "inputs": {"knowledge_base": [kb, 0], "steps": steps, "cfg": cfg}}
    if scheduler is None:
        prompt["104"] = {"class_type": "ReDiCalibratedSigmas", "inputs": {"model": model, "knowledge_base": [kb, 0],
                                                                          "steps": steps, "cfg": cfg}}
    else:
        prompt["104"] = {"class_type": "BasicScheduler", "inputs": {"model": model, "scheduler": scheduler, "steps": steps,
                                                                    "denoise": 1.0}}
    prompt["105"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["101", 0], "guider": ["102", 0], "sampler": ["103", 0], "sigmas": ["104", 0],
        "latent_image": inputs["latent_image"]}}
    prompt["106"] = {"class_type": "VAEDecode", "inputs": {"samples": ["105", 0], "vae": [ckpt, 2]}}
    prompt["107"] = {"class_type": "SaveImage", "inputs": {"images": ["106", 0], "filename_prefix": "redi/native-calibrated"}}
    return prompt


def refusal(server, prompt: dict) -> str:
    """The error message of a prompt that must fail while it runs."""
    with pytest.raises(ServerError) as failed:
        server.run(prompt, timeout=TIMEOUT_S)
    return str(failed.value)


def test_template_calibrates_then_samples_beside_ksampler(server, calibrated):
    prompt, entry = calibrated
    calibrate, sampler = node_of(prompt, "ReDiCalibrateSampler"), node_of(prompt, "ReDiCalibratedSampler")
    nfe = [int(n) for n in prompt[calibrate]["inputs"]["nfe"].split(",")]
    steps = prompt[sampler]["inputs"]["steps"]
    assert steps == prompt[node_of(prompt, "KSampler")]["inputs"]["steps"], "the comparison runs at the same steps"
    summary = entry["outputs"][calibrate]["text"][0]
    assert [int(re.match(r"best for this model at (\d+) steps: ", line).group(1)) for line in summary.splitlines()] == nfe
    ran = entry["outputs"][sampler]["text"][0]
    assert ran.startswith(f"best for this model at {steps} steps: "), ran
    # No silent fallback: the node says which sampler ran; the calibrated one's evaluations are counted per item.
    assert "Ran the calibrated sampler" in ran and f"{steps} evaluations per item" in ran or "Ran the built-in " in ran, ran
    saves = [nid for nid, node in prompt.items() if node["class_type"] == "SaveImage"]
    assert len(saves) == 2 and all(len(entry["outputs"][nid]["images"]) == 1 for nid in saves)
    from kb_tools import load_sampler_calibration
    kb_name = prompt[node_of(prompt, "ReDiLoadKnowledgeBase")]["inputs"]["kb_name"]
    stored = load_sampler_calibration(str(server.layout.redi_kb / kb_name))  # on disk, with the KB
    assert [int(n) for n in stored.nfe_values] == nfe


def test_native_parts_run_with_cfg_guider_and_easycache_and_say_what_ran(server, calibrated):
    template, _ = calibrated
    sampler = node_of(template, "ReDiCalibratedSampler")
    steps, cfg = template[sampler]["inputs"]["steps"], template[sampler]["inputs"]["cfg"]
    for easycache in (False, True):
        entry, texts = server.run_collecting_texts(native_prompt(template, steps=steps, cfg=cfg, easycache=easycache),
                                                   timeout=TIMEOUT_S)
        assert entry["status"]["status_str"] == "success"
        assert len(entry["outputs"]["107"]["images"]) == 1
        shown = [text for nid, text in texts if nid == "103"]
        assert shown and shown[-1].startswith(f"best for this model at {steps} steps: "), texts


def test_refusals_name_the_fix(server, calibrated):
    template, _ = calibrated
    sampler = node_of(template, "ReDiCalibratedSampler")
    steps, cfg = template[sampler]["inputs"]["steps"], template[sampler]["inputs"]["cfg"]
    calibrated_steps = [int(n) for n in template[node_of(template, "ReDiCalibrateSampler")]["inputs"]["nfe"].split(",")]
    other_steps = max(calibrated_steps) + 1

    wrong_steps = json.loads(json.dumps(template))
    wrong_steps[sampler]["inputs"]["steps"] = other_steps
    message = refusal(server, wrong_steps)
    assert f"calibrated for {calibrated_steps} steps" in message and "nfe list" in message, message

    wrong_cfg = json.loads(json.dumps(template))
    wrong_cfg[sampler]["inputs"]["cfg"] = cfg + 1.0
    message = refusal(server, wrong_cfg)
    assert f"calibrated for cfg {cfg:g}" in message, message

    message = refusal(server, native_prompt(template, steps=steps, cfg=cfg, scheduler="simple"))
    assert "ReDiCalibratedSigmas" in message, message

    bad_list = json.loads(json.dumps(template))
    bad_list[node_of(template, "ReDiCalibrateSampler")]["inputs"]["nfe"] = "4,six"
    with pytest.raises(ServerError, match="e.g. 4,5,6,8,10"):  # refused at validation, before anything runs
        server.queue(bad_list)
