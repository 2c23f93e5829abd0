"""What the writing operations (create, append, merge, evict) share: a new KB's folder and first
manifest, and the index and stats files each commit derives from the shards.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

import faiss
import numpy as np
import safetensors.numpy

from ..core.errors import KBError
from . import index as ix
from .files import check_kb_path
from .format import FORMAT_VERSION, MANIFEST, IndexRecord, Manifest, index_file_name, now, stats_file_name, sum_name
from .generation import Generation
from .integrity import BadValues, bad_entries, bad_rows, describe_bad_entries
from .settings import KBSettings, freeze
from .transaction import Transaction


def new_kb_folder(path: Any, exist_ok: bool) -> str:
    root = check_kb_path(path)
    if os.path.exists(os.path.join(root, MANIFEST)):
        raise KBError(f"{root} already holds a knowledge base. Open it with KnowledgeBase.open "
                      "(or open_or_create), or choose another path.")
    if os.path.exists(root) and not exist_ok:
        raise KBError(f"{root} already exists. Choose a new path, or pass exist_ok=True to use this folder.")
    if os.path.exists(root) and not os.path.isdir(root):
        raise KBError(f"{root} is a file, not a folder. Choose another path for the KB.")
    return root


def empty_manifest(settings: KBSettings, dtype: str) -> Manifest:
    """The manifest fields of a new KB; indexes and stats are filled in by stage_derived."""
    return Manifest(format_version=FORMAT_VERSION, generation=0, settings=settings, count=0, dtype=dtype, shards=(),
                    indexes=(), stats=None, calibration=freeze({}), created=now(), updated=now())  # type: ignore[arg-type]


def stage_derived(txn: Transaction, m: Manifest, indexes: dict[int, faiss.Index], sums: dict[int, np.ndarray],
                   kind: str | None = None, reduce: int | None = None) -> Manifest:
    """Write new index files and a new stats file for this commit; `m` with them recorded."""
    kind = m.index_type if kind is None else kind
    reduce = m.reduce if reduce is None else reduce
    records = []
    for st in m.settings.stored_steps:
        index = indexes[st]
        structure, nlist = ix.structure_of(index)
        ref = txn.write(index_file_name(st, txn.tag), ix.encode(index))
        records.append(IndexRecord(st, kind, structure, reduce, index.d, nlist, int(index.ntotal), ref))
    stats = txn.write(stats_file_name(txn.tag), safetensors.numpy.save({sum_name(st): s for st, s in sums.items()}))
    return m.evolve(indexes=tuple(records), stats=stats)


def keys_and_sums(chunks: Iterable[np.ndarray], reduce: int, total: np.ndarray) -> Iterator[np.ndarray]:
    """Reduced keys of each chunk, adding the chunk's full keys to `total` on the way."""
    for chunk in chunks:
        if len(bad_rows(chunk)):  # NaN/Inf keys and sums would be committed, and the KB would no longer open
            raise BadValues()
        total += chunk.reshape(len(chunk), -1).sum(axis=0, dtype=np.float64)
        yield ix.reduce_keys(chunk, reduce)


def derive_from_shards(*gens: Generation) -> tuple[dict[int, faiss.Index], dict[int, np.ndarray]]:
    """Indexes and key sums over the shards of `gens`, in order, one chunk at a time (bounded memory)."""
    m = gens[0].manifest
    rec = m.indexes[0]
    indexes, sums = {}, {}
    for st in m.settings.stored_steps:
        sums[st] = np.zeros(gens[0].D, np.float64)
        chunks = (c for g in gens for c in g.key_chunks(st))
        try:
            indexes[st] = ix.build(rec.type, rec.dim, keys_and_sums(chunks, rec.reduce, sums[st]))
        except BadValues:
            found = [e for g in gens for e in bad_entries(g)][:10]
            raise KBError(describe_bad_entries(gens[0], found)) from None
    return indexes, sums
