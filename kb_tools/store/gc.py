"""Cleanup after a commit: delete leftovers this KB's writers made, and nothing else.

What is deleted: regular files whose names match the store's own naming patterns
(format.OWN_NAMES) that neither the new generation nor the one it replaced names (readers
that read the previous manifest may still be opening its files). What is never deleted: a
name the store does not write, a symbolic link or folder, or anything in a folder that,
symlinks resolved, lies outside the KB folder (a `shards/` linked to another disk may be
shared with another KB, whose files would match our patterns).
"""

from __future__ import annotations

import os

from .files import is_inside, remove_quietly
from .format import INDEX_DIR, SHARDS_DIR, is_own_name

FOLDERS = ("", SHARDS_DIR, INDEX_DIR)


def linked_outside(root: str) -> list[str]:
    """The KB's folders that are symbolic links leading outside the KB folder (cleanup skips them)."""
    return [d for d in FOLDERS[1:] if os.path.lexists(os.path.join(root, d)) and not is_inside(os.path.join(root, d), root)]


def leftovers(root: str, keep: set[str]) -> list[str]:
    """Files (relative names) the store wrote that no generation in `keep` names, by folder."""
    out = []
    for folder in FOLDERS:
        path = os.path.join(root, folder) if folder else root
        try:
            entries = list(os.scandir(path))
        except OSError:
            continue
        for entry in entries:
            rel = f"{folder}/{entry.name}" if folder else entry.name
            if rel not in keep and is_own_name(folder, entry.name) and entry.is_file(follow_symlinks=False):
                out.append(rel)
    return out


def collect_garbage(root: str, keep: set[str]) -> None:
    """Delete the leftovers in folders inside the KB folder (called under the writer lock)."""
    outside = set(linked_outside(root))
    for rel in leftovers(root, keep):
        folder = rel.split("/")[0] if "/" in rel else ""
        if folder not in outside:
            remove_quietly(os.path.join(root, *rel.split("/")))
