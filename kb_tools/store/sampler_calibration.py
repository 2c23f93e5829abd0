"""The sampler calibration's own files inside a KB folder: teacher trajectories and one JSON record.

Layout (next to the KB's shards, never inside them):

    sampler_calibration/teacher-<digest32>.safetensors   one teacher run: "start", "end" float32 [C, H, W],
                                                         "states" float16 [M + 1, C, H, W], "denoised" float16 [M, C, H, W]
    sampler_calibration/record-<sha16>.json              the calibration record (calibration/sampler_calibration.py)

A teacher file is named by the sha256 of its fields (model fingerprint, prompt, seed, cfg, negative
prompt, latent shape, fine grid), which its metadata repeats: a rerun finds the teachers it already
ran and computes nothing again. The manifest's "calibration" object records the record file under
the key "sampler" ({"file", "bytes", "sha256"}), the way it records the guards' calibrations per
step; the record lists every teacher file with its sha256. Files are written atomically under the
KB's writer lock; readers refuse links, non-regular files, wrong sizes or hashes and non-finite numbers.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from typing import Any

import safetensors.torch
import torch

from ..core.errors import KBError
from .files import open_regular, remove_quietly, sha256_bytes, write_atomic
from .format import MANIFEST
from .manifest import MAX_SAMPLER_RECORD_BYTES, SAMPLER_CALIBRATION, SAMPLER_RECORD_RE, read_manifest
from .safe_json import load_json
from .settings import freeze
from .transaction import transaction, writer_lock

CAL_DIR = "sampler_calibration"
#: The largest teacher file read back (a 4x128x128 latent at 400 fine steps is about 100 MB).
MAX_TEACHER_BYTES = 2**31


def _fix(root: str) -> str:
    return (f"Delete the folder {os.path.join(root, CAL_DIR)} and calibrate again (python -m kb_tools calibrate-sampler "
            f"{root} --ckpt CKPT, or the ReDiCalibrateSampler node).")


def teacher_fields(fingerprint: dict, prompt: str, seed: int, cfg: float, negative_prompt: str, latent_shape, fine_steps: int) -> dict:
    """What names one teacher run (JSON-able): a different value of any field is a different teacher."""
    return {"model": fingerprint, "prompt": str(prompt), "seed": int(seed), "cfg": float(cfg),
            "negative_prompt": str(negative_prompt), "latent_shape": [int(s) for s in latent_shape],
            "fine_steps": int(fine_steps), "solver": "dpmpp_2m/karras"}


def teacher_name(fields: dict) -> str:
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    return f"{CAL_DIR}/teacher-{digest[:32]}.safetensors"


def _folder(root: str, create: bool) -> str | None:
    """The calibration folder, checked to be a real folder (not a link) inside the KB folder; None when absent."""
    path = os.path.join(root, CAL_DIR)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not create:
            return None
        os.makedirs(path)
        return path
    if not stat.S_ISDIR(st.st_mode):
        raise KBError(f"{path} is a symbolic link or not a folder; the sampler calibration keeps its files in a real "
                      f"folder inside the KB. {_fix(root)}")
    return path


def _read(root: str, rel: str, what: str, max_bytes: int) -> bytes | None:
    """The bytes of a calibration file (None when absent); links and non-regular files refused."""
    if _folder(root, create=False) is None:
        return None
    path = os.path.join(root, *rel.split("/"))
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        raise KBError(f"{what} ({path}) is a symbolic link; the calibration reads only its own files. {_fix(root)}")
    if st.st_size > max_bytes:
        raise KBError(f"{what} ({path}) is {st.st_size} bytes, more than such a file can be. {_fix(root)}")
    with open_regular(path, what, _fix(root)) as f:
        return f.read(max_bytes + 1)


def save_teacher(root: str, fields: dict, states: torch.Tensor, denoised: torch.Tensor) -> str:
    """Store one teacher run (states [M + 1, C, H, W], denoised [M, C, H, W]); returns its sha256."""
    tensors = {"start": states[0].float().contiguous(), "end": states[-1].float().contiguous(),
               "states": states.half().contiguous(), "denoised": denoised.half().contiguous()}
    data = safetensors.torch.save(tensors, metadata={"fields": json.dumps(fields, sort_keys=True)})
    with writer_lock(root):
        _folder(root, create=True)
        write_atomic(os.path.join(root, *teacher_name(fields).split("/")), data)
    return sha256_bytes(data)


def load_teacher(root: str, fields: dict, sha256: str | None = None) -> tuple[torch.Tensor, torch.Tensor, str] | None:
    """(states float32 [M + 1, C, H, W], denoised float32 [M, C, H, W], sha256) of a stored teacher, or None."""
    rel = teacher_name(fields)
    data = _read(root, rel, "a teacher file of the sampler calibration", MAX_TEACHER_BYTES)
    if data is None:
        return None
    where = os.path.join(root, rel)
    digest = sha256_bytes(data)
    if sha256 is not None and digest != sha256:
        raise KBError(f"{where} fails its sha256 (the record says {sha256[:12]}..., the file is {digest[:12]}...): it was "
                      f"damaged or edited. Delete it and calibrate again; the rerun recomputes only this teacher.")
    try:
        loaded = safetensors.torch.load(data)
        meta = json.loads(data[8:8 + int.from_bytes(data[:8], "little")]).get("__metadata__", {})
    except Exception as e:  # the reference reader's errors: any is a damaged file
        raise KBError(f"{where} is not a readable safetensors file ({e}). Delete it and calibrate again.") from None
    m = int(fields["fine_steps"])
    shape = tuple(fields["latent_shape"])
    want = {"start": shape, "end": shape, "states": (m + 1, *shape), "denoised": (m, *shape)}
    if meta.get("fields") != json.dumps(fields, sort_keys=True) or {k: tuple(v.shape) for k, v in loaded.items()} != want:
        raise KBError(f"{where} does not hold the teacher its name says (other fields or shapes). Delete it and "
                      "calibrate again.")
    if not all(torch.isfinite(v).all() for v in loaded.values()):
        raise KBError(f"{where} holds NaN or infinite values. Delete it and calibrate again.")
    states = loaded["states"].float()
    states[0], states[-1] = loaded["start"], loaded["end"]
    return states, loaded["denoised"].float(), digest


def write_record(root: str, record: dict) -> str:
    """Store the record and commit the manifest's pointer to it (atomic); returns the record's relative name."""
    try:
        data = json.dumps(record, sort_keys=True, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise KBError(f"the sampler calibration record is not JSON of finite numbers ({e}); this is a bug.") from None
    if len(data) > MAX_SAMPLER_RECORD_BYTES:
        raise KBError(f"the sampler calibration record is {len(data)} bytes, more than {MAX_SAMPLER_RECORD_BYTES}; "
                      "calibrate fewer cfg values or teachers.")
    digest = sha256_bytes(data)
    rel = f"{CAL_DIR}/record-{digest[:16]}.json"
    base = read_manifest(root)
    if base.legacy:
        raise KBError(f"{root} is a version-1 knowledge base; upgrade it first (python -m kb_tools upgrade {root}), then "
                      "calibrate the sampler.")
    old = base.calibration.get(SAMPLER_CALIBRATION)
    with transaction(root, base) as txn:  # takes the writer lock
        _folder(root, create=True)
        write_atomic(os.path.join(root, *rel.split("/")), data)
        pointer = {"file": rel, "bytes": len(data), "sha256": digest}
        txn.commit(base.evolve(calibration=freeze({**base.calibration, SAMPLER_CALIBRATION: pointer})))
    if old is not None and old["file"] != rel:
        remove_quietly(os.path.join(root, *old["file"].split("/")))
    return rel


def read_record(root: str) -> dict:
    """The stored record, its size and sha256 checked against the manifest; KBError naming the fix when absent or bad."""
    m = read_manifest(root)
    pointer = m.calibration.get(SAMPLER_CALIBRATION)
    if pointer is None:
        raise KBError(f"the knowledge base at {root} holds no sampler calibration. Calibrate it first: python -m kb_tools "
                      f"calibrate-sampler {root} --ckpt CKPT --nfe 4,5,6,8,10 (or the ReDiCalibrateSampler node).")
    rel = pointer["file"]
    if not SAMPLER_RECORD_RE.fullmatch(rel):
        raise KBError(f"{os.path.join(root, MANIFEST)} points the sampler calibration at {rel!r}. {_fix(root)}")
    data = _read(root, rel, "the sampler calibration record", MAX_SAMPLER_RECORD_BYTES)
    if data is None:
        raise KBError(f"the sampler calibration record {os.path.join(root, rel)} is missing. {_fix(root)}")
    if len(data) != pointer["bytes"] or sha256_bytes(data) != pointer["sha256"]:
        raise KBError(f"the sampler calibration record {os.path.join(root, rel)} fails its sha256 or size (the manifest "
                      f"records {pointer['bytes']} bytes, sha256 {pointer['sha256'][:12]}...): it was damaged or edited. "
                      f"{_fix(root)}")
    record: Any = load_json(data, name=f"the sampler calibration record {os.path.join(root, rel)}", fix=_fix(root),
                            max_bytes=MAX_SAMPLER_RECORD_BYTES, max_depth=12)
    if not isinstance(record, dict):
        raise KBError(f"the sampler calibration record {os.path.join(root, rel)} is not a JSON object. {_fix(root)}")
    return record
