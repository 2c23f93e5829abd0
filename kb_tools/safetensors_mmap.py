"""Read-only memory maps of safetensors files, parsed from the documented format.

safetensors layout (https://github.com/huggingface/safetensors#format): 8 bytes, a
little-endian unsigned 64-bit header length N; N bytes of UTF-8 JSON mapping each tensor
name to {"dtype", "shape", "data_offsets": [begin, end]} (plus an optional
"__metadata__"); then the data buffer, offsets relative to its start, values little-endian.
We map the file instead of loading it so that a KB with a million entries opens without
reading its latents: the OS pages rows in when `latents()` touches them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from .errors import KBError

# safetensors dtype names -> little-endian numpy dtypes. BF16 has no numpy dtype; KBs never
# write it, so a file holding it is not ours.
DTYPES = {
    "F16": "<f2", "F32": "<f4", "F64": "<f8",
    "I8": "i1", "I16": "<i2", "I32": "<i4", "I64": "<i8",
    "U8": "u1", "U16": "<u2", "U32": "<u4", "U64": "<u8", "BOOL": "?",
}
# The reference implementation refuses headers above 100 MB; so do we (a damaged length
# field must not make us allocate gigabytes).
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a safetensors header; begin/end are absolute file offsets."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _damaged(path: str, why: str) -> KBError:
    return KBError(
        f"{path} is not a readable safetensors file: {why}. The file is damaged or "
        "truncated; restore it from a backup or rebuild the knowledge base."
    )


def read_header(path: str) -> dict[str, TensorInfo]:
    """Parse and check the header of a safetensors file without touching its data."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _damaged(path, f"only {size} bytes, shorter than the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise _damaged(path, f"header length {n} does not fit in a {size}-byte file")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _damaged(path, f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise _damaged(path, "header is not a JSON object")
    data_start, data_len = 8 + n, size - 8 - n
    infos = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (b, e) = spec["dtype"], [int(s) for s in spec["shape"]], spec["data_offsets"]
            b, e = int(b), int(e)
        except (KeyError, TypeError, ValueError):
            raise _damaged(path, f"tensor {name!r} has a malformed header entry") from None
        if dtype not in DTYPES:
            raise _damaged(path, f"tensor {name!r} has unsupported dtype {dtype!r}")
        if any(s < 0 for s in shape) or not 0 <= b <= e <= data_len:
            raise _damaged(path, f"tensor {name!r} has offsets {[b, e]} outside the {data_len}-byte data")
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype]).itemsize
        if e - b != expected:
            raise _damaged(path, f"tensor {name!r} spans {e - b} bytes, its shape {shape} needs {expected}")
        infos[name] = TensorInfo(dtype, tuple(shape), data_start + b, data_start + e)
    return infos


def open_memmaps(path: str) -> dict[str, np.ndarray]:
    """Read-only views of every tensor in `path`, backed by one np.memmap of the file."""
    infos = read_header(path)
    # One mapping per file (not per tensor) keeps the number of mappings low for big KBs.
    base = np.memmap(path, dtype=np.uint8, mode="r")
    return {
        name: base[i.begin:i.end].view(np.dtype(DTYPES[i.dtype])).reshape(i.shape)
        for name, i in infos.items()
    }
