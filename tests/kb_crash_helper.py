"""Toy KB data for the KB tests, and a script that builds a KB chunk by chunk (to be killed).

Toy trajectories imitate a shared-seed ReDi KB: x_t = sigma_t * z(seed) + a_t * s(prompt),
so keys are dominated by the shared noise and values are a fixed function of the same
(z, s). Everything is deterministic in (prompt, seed), so a resumed build can be checked
bit for bit.

Script usage (run by tests/test_kb_crash.py):
    python kb_crash_helper.py KBDIR N_CHUNKS CHUNK_SIZE [PAUSE_SECONDS [PAUSE_FROM_CHUNK]]
prints "COMMITTED <count>" after each committed append; with PAUSE_SECONDS > 0, from chunk
PAUSE_FROM_CHUNK (default 2) on, it prints "BEFORE_COMMIT <count>" inside the append, after
every file is written and before the manifest commit, then sleeps that long there.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import zlib

import numpy as np
import safetensors.numpy

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kb_tools.store import KBSettings, open_or_create
from kb_tools.store.format import manifest_checksum

LATENT_SHAPE = (4, 8, 8)
STEPS = 10
STORED_STEPS = [2, 4, 6]
SIGMAS = [float(s) for s in np.linspace(14.6, 0.0, STEPS + 1)]


def toy_settings(**overrides) -> KBSettings:
    """Settings of a 10-step euler KB over 4x8x8 latents storing steps 2, 4 and 6."""
    kw = dict(model_fingerprint={"name": "toy", "sha256": "0" * 8}, latent_shape=LATENT_SHAPE,
              sampling_type="eps", sampler="euler", scheduler="normal", steps=STEPS, cfg=7.0, denoise=1.0,
              stored_steps=STORED_STEPS, sigmas=SIGMAS)
    kw.update(overrides)
    return KBSettings(**kw)


def _rng(text: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(text.encode("utf-8")))


def toy_latents(pairs, steps=STORED_STEPS, shape=LATENT_SHAPE) -> dict[int, np.ndarray]:
    """{step: float32 [n, C, H, W]} for (prompt, seed) pairs: sigma_t * z(seed) + a_t * s(prompt)."""
    z = np.stack([_rng(f"seed {s}").standard_normal(shape) for _, s in pairs])
    s = np.stack([_rng(f"prompt {p}").standard_normal(shape) for p, _ in pairs])
    return {t: (SIGMAS[t] * z + (1.0 + 0.2 * t) * s).astype(np.float32) for t in steps}


def manifest_of(kbdir) -> dict:
    """manifest.json of a KB folder, as plain JSON."""
    with open(os.path.join(kbdir, "manifest.json"), "rb") as f:
        return json.load(f)


def write_manifest(kbdir, manifest: dict, sign: bool = True) -> None:
    """Replace manifest.json; `sign` recomputes its checksum, as someone forging it on purpose would."""
    if sign:
        manifest = {**manifest, "checksum": manifest_checksum(manifest)}
    with open(os.path.join(kbdir, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, ensure_ascii=False)


def kb_file(kbdir, rel: str) -> str:
    return os.path.join(kbdir, *rel.split("/"))


def replace_file_signed(kbdir, rel: str, data: bytes) -> None:
    """Overwrite a KB file and record its new size and sha256 in a re-signed manifest: a forgery
    that every checksum agrees with, so only the content checks can catch it."""
    m = manifest_of(kbdir)
    records = [(s, "") for s in m["shards"] if s["file"] == rel] + [(s, "entries_") for s in m["shards"] if s["entries_file"] == rel]
    records += [(i, "") for i in m["indexes"].values() if i["file"] == rel] + [(m["stats"], "")] * (m["stats"]["file"] == rel)
    assert records, f"{rel} is not named by the manifest"
    for rec, prefix in records:
        rec[prefix + "bytes"], rec[prefix + "sha256"] = len(data), hashlib.sha256(data).hexdigest()
    with open(kb_file(kbdir, rel), "wb") as f:
        f.write(data)
    write_manifest(kbdir, m)


def forge_safetensors(tensors: dict, header_edit=None) -> bytes:
    """A safetensors file of numpy arrays, its JSON header passed through `header_edit` first (if given)."""
    data = safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in tensors.items()})
    if header_edit is None:
        return data
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header = header_edit(header) or header  # edits may work in place
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data[8 + n:]


def chunk_pairs(chunk: int, size: int) -> list[tuple[str, int]]:
    """The (prompt, seed) pairs of build chunk `chunk`; seeds repeat so they are shared."""
    return [(f"prompt {chunk * size + i}", (chunk * size + i) % 3) for i in range(size)]


def main(argv: list[str]) -> None:
    kbdir, n_chunks, size = argv[0], int(argv[1]), int(argv[2])
    pause = float(argv[3]) if len(argv) > 3 else 0.0
    pause_from = int(argv[4]) if len(argv) > 4 else 2
    kb = open_or_create(kbdir, toy_settings(), dtype="float32")

    def before_commit() -> None:
        print(f"BEFORE_COMMIT {len(kb)}", flush=True)
        time.sleep(pause)

    for c in range(n_chunks):
        todo = kb.missing(chunk_pairs(c, size))
        if todo:
            kb.append(toy_latents(todo), [p for p, _ in todo], [s for _, s in todo],
                      _before_commit=before_commit if pause > 0 and c >= pause_from else None)
        print(f"COMMITTED {len(kb)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
