"""One write to a KB, used by create, append, merge, rebuild and calibration storage alike.

    with transaction(root, base) as txn:    # lock, then check that `base` is still the committed generation
        ref = txn.write(name, data)          # stage new files under new names (fsynced)
        txn.commit(manifest)                 # fsync the folders, atomically replace manifest.json
                                             # an exception anywhere before: staged files are discarded
                                             # after the commit: leftovers are collected (gc.py)

A crash at any point leaves the previous manifest and everything it names intact.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import stat
import threading
from collections.abc import Iterator

from filelock import FileLock

from ..core.errors import KBChangedError, KBError
from .files import describe_mode, fsync_dir, is_inside, link_or_copy, remove_quietly, sha256_bytes, write_atomic
from .format import FORMAT_VERSION, INDEX_DIR, LOCK_FILE, MANIFEST, SHARDS_DIR, FileRef, Manifest, manifest_bytes, new_tag, now
from .gc import collect_garbage
from .manifest import read_manifest


class Transaction:
    """Files staged for one commit of one KB, and the commit itself."""

    def __init__(self, root: str, base: Manifest | None):
        self.root, self.base = root, base
        self.generation = (base.generation if base else 0) + 1
        self.tag = new_tag(self.generation)  # names of this commit's index and stats files
        self.committed: Manifest | None = None
        self._staged: list[str] = []

    def path(self, rel: str) -> str:
        return os.path.join(self.root, *rel.split("/"))

    def write(self, rel: str, data: bytes) -> FileRef:
        """Stage a new file (written to a temporary name, fsynced, renamed)."""
        self._staged.append(self.path(rel))
        write_atomic(self._staged[-1], data)
        return FileRef(rel, len(data), sha256_bytes(data))

    def link(self, src: str, rel: str, ref: FileRef) -> FileRef:
        """Stage `src` under a new name by hard link (or copy); `ref` holds its recorded size and checksum."""
        self._staged.append(self.path(rel))
        link_or_copy(src, self._staged[-1])
        return FileRef(rel, ref.bytes, ref.sha256)

    def commit(self, m: Manifest) -> Manifest:
        """The commit point: make the staged files durable, then atomically replace manifest.json."""
        if self.committed is not None:
            raise AssertionError("a transaction commits once")
        m = m.evolve(format_version=FORMAT_VERSION, generation=self.generation, updated=now())
        data = manifest_bytes(m)
        for d in (SHARDS_DIR, INDEX_DIR):
            fsync_dir(os.path.join(self.root, d))
        write_atomic(os.path.join(self.root, MANIFEST), data)
        fsync_dir(self.root)
        self.committed = m
        return m

    def discard(self) -> None:
        for p in self._staged:
            remove_quietly(p)


def check_writable_layout(root: str) -> None:
    """Refuse to write where new files could never be cleaned up: index/ linked outside the KB folder."""
    index = os.path.join(root, INDEX_DIR)
    if os.path.lexists(index) and not is_inside(index, root):
        raise KBError(f"{index} is a symbolic link to {os.path.realpath(index)}, outside the KB folder. Every change "
                      "writes new index files there, and this pack never deletes files outside a KB's folder (it "
                      "could delete another KB's), so old ones would pile up. Replace the link with a real folder "
                      f"holding the same files (e.g. rm {index} && cp -r {os.path.realpath(index)} {index}); "
                      "reading the KB works as it is.")


def check_lock_file(root: str) -> str:
    """The path of the KB's writer lock, once it is known to be absent or a plain file of this KB; else a KBError.

    Taking the lock opens this path for writing. Older filelock versions the pack allows (3.8.0 and
    3.12.2 among them) open it with O_CREAT|O_TRUNC and follow a symbolic link: a `.writer.lock`
    leading to a user's file would empty that file, and a hard link would too. So, whatever the
    installed filelock, the path is lstat-ed (never followed) right before the lock is taken.
    filelock's API takes only a path (no descriptor, no open flags), so the lock cannot be opened
    with O_NOFOLLOW by us: between this check and filelock's open a process that can write into
    the KB folder could still swap a link in. This check is the defence there; recent filelock
    versions (4.2.11, the test pin) also open with O_NOFOLLOW and without O_TRUNC.
    """
    path = os.path.join(root, LOCK_FILE)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    fix = f"Nothing was written. Remove it (rm {shlex.quote(path)}); the pack recreates the lock file at its next write."
    if stat.S_ISLNK(st.st_mode):
        raise KBError(f"{path}, the KB's writer lock, is a symbolic link to {os.path.realpath(path)}. Taking the lock "
                      "opens it for writing, which could empty the file it leads to, so this pack refuses to write "
                      f"to the KB. Remove the link: rm {shlex.quote(path)}; the pack recreates the lock file.")
    if not stat.S_ISREG(st.st_mode):
        raise KBError(f"{path}, the KB's writer lock, is {describe_mode(st.st_mode)}, not the plain file the pack "
                      f"creates there, so this pack refuses to write to the KB. {fix}")
    if st.st_nlink > 1 and st.st_size > 0:
        raise KBError(f"{path}, the KB's writer lock, holds {st.st_size} bytes and is a hard link shared with "
                      f"{st.st_nlink - 1} other name(s): taking the lock could empty that file, so this pack refuses "
                      f"to write to the KB. {fix}")
    if not is_inside(path, root):  # cannot happen for a non-link in root; kept so the rule holds if LOCK_FILE moves
        raise KBError(f"{path}, the KB's writer lock, lies outside the KB folder {root}. {fix}")
    return path


#: The KB folders whose writer lock this thread holds (per thread: another thread of this process must wait for it).
_held = threading.local()


@contextlib.contextmanager
def writer_lock(root: str) -> Iterator[None]:
    """Hold the KB's writer lock (released by the OS if this process dies); a transaction inside it does not wait for it.

    For a caller that reads the KB and writes what it read must allow (learning: which pairs are new,
    what the budget evicts): under this lock no other writer commits in between, so the write cannot
    be refused as stale, and a writer that commits in a loop cannot starve it. Reentrant per thread;
    another thread of this process waits like another process does (flock is per open file).
    """
    key = os.path.realpath(root)
    held = getattr(_held, "roots", None)
    if held is None:
        held = _held.roots = set()
    if key in held:
        yield
        return
    with FileLock(check_lock_file(root)):
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)


@contextlib.contextmanager
def transaction(root: str, base: Manifest | None) -> Iterator[Transaction]:
    """Lock the KB for writing, check that `base` (None: no KB yet) is what is committed, and yield a Transaction."""
    check_writable_layout(root)
    txn = None
    try:
        for d in (root, os.path.join(root, SHARDS_DIR), os.path.join(root, INDEX_DIR)):
            os.makedirs(d, exist_ok=True)
        with writer_lock(root):
            # lexists, not isfile: a manifest.json that is a FIFO, folder or dangling link is refused by
            # read_manifest, never replaced by a new KB's manifest.
            on_disk = read_manifest(root) if os.path.lexists(os.path.join(root, MANIFEST)) else None
            if base is None and on_disk is not None:
                raise KBError(f"{root} already holds a knowledge base. Open it with KnowledgeBase.open "
                              "(or open_or_create), or choose another path.")
            if base is not None and (on_disk is None or on_disk.generation != base.generation):
                raise KBChangedError(f"KB at {root} was changed by another process since it was opened (generation "
                              f"{on_disk.generation if on_disk else 'none'}, expected {base.generation}). Reopen it and retry.")
            txn = Transaction(root, base)
            yield txn
            if txn.committed is None:
                txn.discard()
                return
            keep = txn.committed.files() | (base.files() if base else set())  # readers may still open `base`
            collect_garbage(root, keep)
    except BaseException as e:
        committed = txn is not None and txn.committed is not None
        if txn is not None and not committed:
            txn.discard()
        if not isinstance(e, OSError):
            raise
        where = f"{e.strerror or e} ({getattr(e, 'filename', '')})"
        if committed:
            raise KBError(f"the change to the KB at {root} was committed, but reading it back failed: {where}. "
                          "Reopen the KB.") from e
        raise KBError(f"could not write to the KB at {root}: {where}. Nothing was committed: the KB is as it was. "
                      "Free disk space or fix the folder's permissions, then retry.") from e
