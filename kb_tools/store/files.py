"""File-system primitives of the store: path checks, atomic writes, checksums, links."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import time
from typing import Any, BinaryIO

from ..core.errors import KBError

#: Longest file-name component on common file systems (ext4, NTFS, APFS), in bytes.
NAME_MAX = 255
#: Longest path Linux accepts (PATH_MAX).
PATH_MAX = 4096
#: Characters Windows refuses in file names; refused everywhere so a KB folder can move between systems.
_WINDOWS_RESERVED = set('<>:"|?*')


def check_kb_path(path: Any) -> str:
    """The absolute path of a KB folder, or a KBError naming what is wrong with `path` and the fix."""
    try:
        text = os.fspath(path)
    except TypeError:
        raise KBError(f"a knowledge-base path must be a string or path, got {type(path).__name__}. "
                      "Pass the KB folder's path.") from None
    if not isinstance(text, str) or not text.strip():
        raise KBError(f"knowledge-base path {text!r} is empty or not text. Pass the KB folder's path as a string.")
    if "\0" in text:
        raise KBError(f"knowledge-base path {text[:80]!r} contains a NUL byte, which no file system accepts. "
                      "Remove it from the path.")
    text = os.path.abspath(text)
    if len(text.encode("utf-8", "surrogateescape")) > PATH_MAX:
        raise KBError(f"knowledge-base path {text[:60]!r}... is longer than {PATH_MAX} bytes. Use a shorter path.")
    long = [p for p in text.replace("\\", "/").split("/") if len(p.encode("utf-8", "surrogateescape")) > NAME_MAX]
    if long:
        raise KBError(f"knowledge-base path {text[:60]!r}... has a folder name of {len(long[0].encode('utf-8', 'surrogateescape'))} "
                      f"bytes ({long[0][:40]!r}...); file systems allow {NAME_MAX}. Use a shorter name.")
    return text


def check_kb_name(name: Any) -> str:
    """A KB name that is one plain folder name (the nodes' kb_name), or a KBError naming the fix."""
    example = "Use a plain folder name such as 'coco-euler-20'."
    if not isinstance(name, str) or not name.strip():
        raise KBError(f"knowledge base name {name!r} is empty. {example}")
    if name != name.strip():
        raise KBError(f"knowledge base name {name!r} starts or ends with spaces. {example}")
    bad = sorted({c for c in name if c in "/\\\0" or c in _WINDOWS_RESERVED or ord(c) < 32})
    if bad or name in (".", ".."):
        raise KBError(f"knowledge base name {name[:80]!r} contains {bad or name!r}, which a folder name cannot. {example}")
    if len(name.encode("utf-8")) > NAME_MAX:
        raise KBError(f"knowledge base name {name[:40]!r}... is {len(name.encode('utf-8'))} bytes long; folder names "
                      f"may have {NAME_MAX}. {example}")
    return name


def is_inside(path: str, root: str) -> bool:
    """Whether `path`, symlinks resolved, is `root` (symlinks resolved) or lies below it."""
    real, base = os.path.realpath(path), os.path.realpath(root)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_stream(f: BinaryIO) -> str:
    """Checksum of an open file from its start (a handle, so a renamed or unlinked file still counts)."""
    f.seek(0)
    h = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 22), b""):
        h.update(block)
    return h.hexdigest()


def sha256_file(path: str, what: str = "KB file") -> str:
    with open_regular(path, what) as f:
        return sha256_stream(f)


def describe_mode(mode: int) -> str:
    """What a file-system node is, for an error message ("a FIFO (named pipe)", "a directory", ...)."""
    kinds = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"))
    return next((text for test, text in kinds if test(mode)), "a special file")


#: Opening for reading never blocks (a FIFO with no writer), never makes a terminal ours, never leaks into children.
_READ_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
               | getattr(os, "O_BINARY", 0))


def open_regular(path: str, what: str, fix: str = "") -> BinaryIO:
    """`path` opened for binary reading if it is a regular file (symbolic links followed), else a KBError.

    Every file the store reads goes through here: a FIFO, device, socket or directory in a KB's
    place would block the open or the read forever (a FIFO with no writer) or return nonsense.
    os.stat first refuses them without opening anything (stat never blocks); the open itself is
    non-blocking and its descriptor is checked again (fstat), so a FIFO swapped in between the two
    is refused too, not waited on. FileNotFoundError and other OSErrors reach the caller as they are.
    `fix` ends the refusal's message (default: restore the KB's file, or rebuild the KB).
    """
    def refuse(mode: int) -> KBError:
        return KBError(f"{what} ({path}) is {describe_mode(mode)}, not a regular file: " + (
            fix or "replace it with the KB's real file (restore it from a backup), or rebuild the KB."))

    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise refuse(st.st_mode)
    fd = os.open(path, _READ_FLAGS)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise refuse(st.st_mode)
        if getattr(os, "O_NONBLOCK", 0):
            os.set_blocking(fd, True)  # a regular file: plain reads from here on
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def fsync_dir(path: str) -> None:
    """Make renames in `path` durable (POSIX); Windows cannot open directories, skip there."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return  # also anything but a folder (O_DIRECTORY): never an open that blocks on a FIFO
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_name(path: str) -> str:
    """A sibling name no other writer uses; cleanup recognises it by the '.tmp-<pid>-<hex>' suffix."""
    return f"{path}.tmp-{os.getpid()}-{os.urandom(4).hex()}"


def replace(src: str, dst: str) -> None:
    """os.replace, retried briefly where Windows refuses to replace a file a reader holds open."""
    for attempt in range(50):
        try:
            os.replace(src, dst)
            return
        except PermissionError:
            if os.name != "nt" or attempt == 49:
                raise
            time.sleep(0.02)


def write_atomic(path: str, data: bytes | memoryview) -> None:
    """Write to a temporary name, fsync, then rename: a reader never sees a partial file."""
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise


def remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass  # a leftover is collected by a later commit


def link_or_copy(src: str, dst: str) -> None:
    """Hard-link src to dst (no data rewritten); copy where links are impossible (other disk)."""
    try:
        os.link(src, dst)
    except OSError:
        tmp = temp_name(dst)
        try:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            replace(tmp, dst)
        except BaseException:
            remove_quietly(tmp)
            raise


def read_handle(f: BinaryIO, size: int, what: str) -> bytes:
    """The whole content of an open file that must be `size` bytes long."""
    f.seek(0)
    data = f.read(size + 1)
    if len(data) != size:
        raise KBError(f"{what} is {len(data)} bytes now, {size} when the KB was opened: something rewrote it in "
                      "place. Reopen the KB; if this repeats, restore the file or rebuild the KB.")
    return data
