"""Repairing a KB from its shards: `python -m kb_tools repair DIR`, or `repair(path)`.

Opening a KB checks its index and stats files, so a KB whose index or stats file is truncated,
missing or corrupt does not open for `rebuild_indexes()`. `repair` checks only what the derived
files are made from (the signed manifest, the shards and the entries files: sizes and sha256),
rebuilds every index and the key sums from the shards, one chunk at a time, and commits them
through the one write path (transaction.py: new files under new names, then the manifest; the
cleanup afterwards deletes only files this store wrote that no recent generation names).

Stored latents that are NaN, Inf or beyond +-MAX_ABS_LATENT are refused before anything is
committed, naming each entry (shard file, row, prompt, seed): remove them by rebuilding the KB
without them. A version-1 KB is repaired only if its FAISS files show it is one (integrity.py).
"""

from __future__ import annotations

import os
import stat
from typing import Any

import numpy as np

from ..core.errors import KBError
from .commits import derive_from_shards, stage_derived
from .files import check_kb_path, sha256_stream
from .generation import FileVanished, Generation
from .integrity import check_legacy_indexes
from .knowledge_base import KnowledgeBase
from .manifest import read_manifest
from .transaction import transaction


def _check_shard_hashes(g: Generation) -> None:
    fix = "Restore the file from a backup, or rebuild the KB."
    for s in g.manifest.shards:
        path = g.path(s.data.file)
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise KBError(f"KB shard {s.data.file} at {g.root} is not a regular file. {fix}")
        with open(path, "rb") as f:
            if sha256_stream(f) != s.data.sha256:
                raise g.checksum_error(s.data.file, "shard (stored latents)", fix)


def repair(path: Any) -> KnowledgeBase:
    """Rebuild every index and the stats file of the KB at `path` from its shards; returns the repaired KB.

    Refuses (KBError, nothing committed) a damaged manifest, shard or entries file, and stored latents no KB can
    hold, naming them. Also upgrades a version-1 KB.
    """
    root = check_kb_path(path)
    m = read_manifest(root)
    try:
        g = Generation.load(root, m, "size", tolerate_derived=True)
    except FileVanished as e:
        raise KBError(f"KB at {root} is missing {e.rel} (named in manifest.json): it was deleted or the KB was copied "
                      "incompletely. Restore the file, or rebuild the KB; repair rebuilds only indexes and stats.") from None
    except OSError as e:
        raise KBError(f"cannot read the KB at {root}: {e.strerror or e} ({getattr(e, 'filename', '')}). "
                      "Check the disk and the folder's permissions.") from None
    try:
        _check_shard_hashes(g)
        if m.legacy:
            check_legacy_indexes(g, "full")
    except FileNotFoundError as e:
        raise KBError(f"KB at {root} is missing {e.filename}. Restore the file, or rebuild the KB.") from None
    with transaction(root, m) as txn:
        indexes, sums = derive_from_shards(g)  # refuses NaN/Inf latents, naming them
        for st, total in sums.items():
            if not np.isfinite(total).all():
                raise KBError(f"the key sums of step {st} of the KB at {root} overflow: its stored latents are too large "
                              "for a KB. Nothing was committed; rebuild the KB.")
        txn.commit(stage_derived(txn, m, indexes, sums))
    return KnowledgeBase.open(root, verify="size")
