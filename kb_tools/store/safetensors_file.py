"""safetensors files read defensively: the header checked field by field, data memory-mapped or viewed.

Layout (https://github.com/huggingface/safetensors#format): 8 bytes, a little-endian
unsigned 64-bit header length N; N bytes of UTF-8 JSON mapping each tensor name to
{"dtype", "shape", "data_offsets": [begin, end]} (plus an optional "__metadata__" of
strings); then the data buffer, offsets relative to its start, values little-endian.

Why not safetensors' own reader: `safe_open` slices only contiguous ranges and copies each
one, while ReDi gathers arbitrary rows (neighbour ids) across shards; so shards are mapped
and their rows indexed here, and the KB's few other safetensors files share this parser.
Writing uses the reference writer (`safetensors.numpy.save`).
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import numpy as np

from ..core.errors import KBError
from .files import open_regular
from .safe_json import load_json

# Only the dtypes a KB writes: latents (F16, F32), key sums (F64), index arrays (F32, I32, I64, F64).
DTYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "I32": "<i4", "I64": "<i8"}
# The reference implementation refuses headers above 100 MB; so do we (a damaged length
# field must not make us allocate gigabytes).
MAX_HEADER_BYTES = 100_000_000
MAX_DIMS = 8
MAX_NAME = 256


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a safetensors header; begin/end are absolute file offsets."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**62


def parse_header(head: bytes, size: int, where: str, fix: str) -> dict[str, TensorInfo]:
    """Check a header (`head` = the file's first 8 + N bytes, `size` = file size) against the format."""
    def damaged(why: str) -> KBError:
        return KBError(f"{where} is not a valid safetensors file: {why}. {fix}")

    if size < 8 or len(head) < 8:
        raise damaged(f"only {size} bytes, shorter than the 8-byte header length")
    n = int.from_bytes(head[:8], "little")
    if n > MAX_HEADER_BYTES or n > size - 8 or len(head) < 8 + n:
        raise damaged(f"header length {n} does not fit in a {size}-byte file")
    header = load_json(head[8:8 + n], name=f"{where} (safetensors header)", fix=fix, max_bytes=MAX_HEADER_BYTES, max_depth=3)
    if not isinstance(header, dict):
        raise damaged("header is not a JSON object")
    data_start, data_len = 8 + n, size - 8 - n
    infos: dict[str, TensorInfo] = {}
    for name, spec in header.items():
        if name == "__metadata__":
            if not isinstance(spec, dict) or not all(isinstance(v, str) for v in spec.values()):
                raise damaged("__metadata__ is not a map of strings")
            continue
        if not name or len(name) > MAX_NAME:
            raise damaged(f"a tensor name is empty or longer than {MAX_NAME} characters")
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
            raise damaged(f"tensor {name!r} has a malformed entry (need exactly dtype, shape, data_offsets)")
        dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise damaged(f"tensor {name!r} has dtype {dtype!r}; a KB writes only {sorted(DTYPES)}")
        if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_count(s) for s in shape):
            raise damaged(f"tensor {name!r} has shape {shape!r}; need up to {MAX_DIMS} non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
            raise damaged(f"tensor {name!r} has data_offsets {offsets!r}; need two non-negative integers")
        b, e = offsets
        if not b <= e <= data_len:
            raise damaged(f"tensor {name!r} has offsets {[b, e]} outside the {data_len}-byte data")
        need = np.dtype(DTYPES[dtype]).itemsize  # Python ints: no overflow however large the shape
        for s in shape:
            need *= s
        if e - b != need:
            raise damaged(f"tensor {name!r} spans {e - b} bytes, its shape {shape} needs {need}")
        infos[name] = TensorInfo(dtype, tuple(shape), data_start + b, data_start + e)
    # The reference writer packs tensors back to back; holes or overlaps mean a forged header.
    end = data_start
    for info in sorted(infos.values(), key=lambda i: (i.begin, i.end)):
        if info.begin != end:
            raise damaged("tensors overlap or leave holes in the data buffer")
        end = info.end
    if end != size:
        raise damaged(f"the tensors cover {end - data_start} of the {data_len} data bytes")
    return infos


def read_header(path: str, fix: str = "Restore the file from a backup, or rebuild the knowledge base.") -> dict[str, TensorInfo]:
    """Parse and check the header of a safetensors file without touching its data."""
    with open_regular(path, "safetensors file") as f:
        size = os.fstat(f.fileno()).st_size
        return parse_header(_read_head(f, size), size, path, fix)


def _read_head(f, size: int) -> bytes:
    """The length field and, when it fits in the file, the header it announces."""
    head = f.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else 0
    if len(head) == 8 and n <= min(MAX_HEADER_BYTES, size - 8):
        head += f.read(n)
    return head


def _views(buffer: np.ndarray, infos: dict[str, TensorInfo]) -> dict[str, np.ndarray]:
    return {name: buffer[i.begin:i.end].view(np.dtype(DTYPES[i.dtype])).reshape(i.shape) for name, i in infos.items()}


class MappedFile:
    """A read-only memory map of one safetensors file and a view per tensor; nothing is read until used."""

    def __init__(self, path: str, fix: str):
        with open_regular(path, "KB shard") as f:
            size = os.fstat(f.fileno()).st_size
            infos = parse_header(_read_head(f, size), size, path, fix)
            # The map keeps the file's data alive after a writer's cleanup unlinks the name (POSIX).
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.path, self.size = path, size
        self.tensors = _views(np.frombuffer(self._map, dtype=np.uint8), infos)

    def current_size(self) -> int:
        """Size of the mapped file now (fstat of the map's own descriptor, not the path)."""
        return self._map.size()


def tensors_from_bytes(data: bytes, where: str, fix: str) -> dict[str, np.ndarray]:
    """Read-only views of every tensor in a safetensors file held in memory."""
    view = memoryview(data)
    n = int.from_bytes(view[:8], "little") if len(view) >= 8 else 0
    infos = parse_header(view[:8 + min(n, MAX_HEADER_BYTES)], len(view), where, fix)
    return _views(np.frombuffer(data, dtype=np.uint8), infos)
