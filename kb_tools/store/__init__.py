"""The ReDi knowledge base (KB) on disk: stored trajectory latents, their search indexes and statistics.
May import core only (tests/test_layering.py holds the rule).

One module per job:
    settings.py          KBSettings: what a KB was built with (frozen, validated once)
    format.py            file names, the manifest's frozen records and bytes, entries files
    manifest.py          manifest.json read and checked field by field (signed, versions upgraded)
    safe_json.py         JSON reading with size, nesting and number limits
    safetensors_file.py  safetensors headers checked field by field; shards memory-mapped
    files.py             path checks, atomic writes, checksums, links
    transaction.py       the one write path: lock, generation check, stage, fsync, commit
    gc.py                cleanup of leftovers: own file names only, never outside the KB folder
    generation.py        one committed generation as a reader holds it (open files, maps, facts)
    index.py             FAISS indexes: key reduction, build, arrays on disk, search, re-rank
    verify.py            KnowledgeBase.verify (sampled, or full)
    integrity.py         what a version-1 manifest must look like; stored values no KB can hold
    repair.py            repair: rebuild indexes and stats from the shards alone
    arguments.py         checks of what callers pass in (steps, queries, ids, latents)
    knowledge_base.py    KnowledgeBase: open, read, search; open_or_create
    writes.py            KnowledgeBase's writes: create, append, rebuild_indexes, set_calibration
    commits.py           what writes share: new folders, index and stats files of a commit
    merge.py             merge (a new KB of several), merge_into (several into one)
    eviction.py          KBBudget, evict_oldest: drop whole oldest shards to fit a size budget
    retrieval.py         nearest keys of a query and blends of their stored values
    learning.py          a learning KB's appends (learn), within its budget
"""

from ..core.errors import KBError, KBMismatchError
from .eviction import KBBudget, evict_oldest
from .files import check_kb_name, check_kb_path
from .format import (
    DTYPES,
    FORMAT_VERSION,
    INDEX_DIR,
    INDEX_TYPES,
    LOCK_FILE,
    MANIFEST,
    SHARDS_DIR,
    step_name,
    sum_name,
)
from .generation import AUTO_VERIFY_MAX_BYTES, VERIFY_MODES
from .index import AUTO_FLAT_MAX_ENTRIES, MAX_AUTO_INDEX_DIM, auto_reduce, ivf_nlist, reduce_keys
from .knowledge_base import KnowledgeBase, open_or_create
from .merge import merge, merge_into
from .repair import repair
from .settings import SEED_POLICIES, SETTING_KEYS, KBSettings

__all__ = [
    "AUTO_FLAT_MAX_ENTRIES", "AUTO_VERIFY_MAX_BYTES", "DTYPES", "FORMAT_VERSION", "INDEX_DIR", "INDEX_TYPES",
    "KBBudget", "KBError", "KBMismatchError", "KBSettings", "KnowledgeBase", "LOCK_FILE", "MANIFEST", "MAX_AUTO_INDEX_DIM",
    "SEED_POLICIES", "SETTING_KEYS", "SHARDS_DIR", "VERIFY_MODES", "auto_reduce", "check_kb_name", "check_kb_path", "evict_oldest",
    "ivf_nlist", "merge", "merge_into", "open_or_create", "reduce_keys", "repair", "step_name", "sum_name",
]
