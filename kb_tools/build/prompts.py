"""Prompt lists for knowledge-base builds: plain text, JSONL, or COCO captions JSON; where a node may read them."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..core.errors import KBError
from ..store.files import open_regular


def input_file(name: str, input_dir: str | Path) -> Path:
    """The file `name` inside ComfyUI's input folder, or a KBError saying what is wrong and what to do.

    A node reads user-named files only from the input folder: `name` must be relative, with no
    `..` part, and must not lead outside the folder through a symbolic link. (The offline
    command reads any path the user gives it on the command line.)
    """
    fix = ("Put the file in ComfyUI's input folder and give its name relative to that folder, e.g. "
           "'prompts.txt' or 'lists/coco.jsonl'; use the offline command (python -m kb_tools build --prompts) "
           "for files elsewhere.")
    if not isinstance(name, str) or not name.strip():
        raise KBError(f"prompts_file {name!r} is empty. {fix}")
    name = name.strip()
    if "\0" in name:
        raise KBError(f"prompts_file {name[:80]!r} contains a NUL byte. {fix}")
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive \
            or name.startswith(("\\", "/", "~")):
        raise KBError(f"prompts_file {name[:120]!r} is an absolute path; a node reads only files in ComfyUI's input folder. {fix}")
    parts = re.split(r"[\\/]", name)
    if ".." in parts:
        raise KBError(f"prompts_file {name[:120]!r} contains '..'; a node reads only files in ComfyUI's input folder. {fix}")
    root = os.path.realpath(input_dir)
    path = os.path.realpath(os.path.join(root, *[p for p in parts if p not in ("", ".")]))
    if path != root and not path.startswith(root.rstrip(os.sep) + os.sep):
        raise KBError(f"prompts_file {name[:120]!r} leads outside ComfyUI's input folder (through a symbolic link). {fix}")
    if not os.path.isfile(path):
        raise KBError(f"prompts_file {name[:120]!r} is not a file in ComfyUI's input folder ({root}). {fix}")
    return Path(path)


def _shown(path: object, limit: int = 120) -> str:
    """A path for a message: repr'd, cut to `limit` characters (a 5,000-character name stays readable)."""
    text = repr(str(path)) if isinstance(path, (str, os.PathLike)) else repr(path)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _order(value) -> tuple:
    """Sort key for COCO ids: numbers by value (as the official KB ordered them), anything else after, by text."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value, "")
    return (1, 0, json.dumps(value, sort_keys=True))


def _loads(text: str, where: str, hint: str):
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise KBError(f"{where} is not valid JSON ({e.msg} at line {e.lineno}); {hint}") from None
    except (RecursionError, ValueError) as e:
        raise KBError(f"{where} holds JSON this reader cannot take ({type(e).__name__}); {hint}") from None
    return value


def read_prompts(path: str | Path, *, first_caption_only: bool = True) -> list[str]:
    """Prompts from a file, in file order, blank lines and exact duplicates dropped.

    - ``.txt`` (or anything else): one prompt per line.
    - ``.jsonl``: one JSON object per line with a ``prompt``, ``caption`` or ``text`` field (or a bare string).
    - ``.json``: a COCO captions file (``annotations`` with ``image_id`` and ``caption``); by
      default the first caption of each image, as the official ReDi knowledge base used.
    """
    kinds = "give the path of a .txt (one prompt per line), .jsonl or COCO captions .json file"
    try:
        path = Path(path)
        is_file = path.is_file()  # stat: a name too long, a NUL byte or a folder it may not enter raise here
    except (TypeError, ValueError, OSError) as e:
        why, fix = getattr(e, "strerror", None) or e, "pass it as text (str or Path)"
        if isinstance(e, OSError):
            fix = "check the path: within the system's length limit, in folders you may enter"
        raise KBError(f"cannot use {_shown(path)} as a prompt file ({why}); {fix}, and {kinds}.") from None
    if not is_file:
        what = "is a directory" if path.is_dir() else "is not a regular file" if path.exists() else "does not exist"
        raise KBError(f"prompt file {_shown(path)} {what}; {kinds}.")
    try:
        with open_regular(str(path), "prompt file", "give the path of a .txt, .jsonl or COCO captions .json file.") as f:
            # (not read_text: a FIFO swapped in after the check above is refused here, never waited on)
            text = f.read().decode("utf-8")
    except UnicodeDecodeError as e:
        raise KBError(f"prompt file {path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8.") from None
    except OSError as e:
        raise KBError(f"cannot read prompt file {path} ({e.strerror or e}); check its permissions.") from None
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        prompts = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            item = _loads(line, f"{path}:{n}", "each line must be an object like {\"prompt\": \"...\"}.")
            if isinstance(item, str):
                prompts.append(item)
                continue
            value = next((item[k] for k in ("prompt", "caption", "text") if isinstance(item, dict) and k in item), None)
            if not isinstance(value, str):
                raise KBError(f"{path}:{n} has no 'prompt', 'caption' or 'text' string field; add one.")
            prompts.append(value)
    elif suffix == ".json":
        data = _loads(text, str(path), "give a COCO captions file or use .txt/.jsonl.")
        annotations = data.get("annotations") if isinstance(data, dict) else None
        if not isinstance(annotations, list) or not all(isinstance(a, dict) for a in annotations):
            raise KBError(f"{path} is not a COCO captions file (no 'annotations' list of objects); use .txt (one prompt per line) or .jsonl for other prompt lists.")
        seen_images = set()
        prompts = []
        for ann in sorted(annotations, key=lambda a: (_order(a.get("image_id", 0)), _order(a.get("id", 0)))):
            image = json.dumps(ann.get("image_id"), sort_keys=True)
            if first_caption_only:
                if image in seen_images:
                    continue
                seen_images.add(image)
            caption = ann.get("caption", "")
            prompts.append(caption if isinstance(caption, str) else "")
    else:
        prompts = text.splitlines()
    out, seen = [], set()
    for p in (p.strip() for p in prompts):
        if p and p not in seen:
            seen.add(p)
            out.append(p)
    return out


def shard_of(items: list, shard: str | None) -> list:
    """The i-th of N interleaved slices of `items` for ``shard='i/N'`` (1-based), or all of them."""
    if not shard:
        return items
    try:
        i, n = (int(v) for v in shard.split("/"))
    except ValueError:
        raise KBError(f"--shard {shard!r} must look like 'i/N', e.g. '2/8' for the second of eight machines.") from None
    if not (n >= 1 and 1 <= i <= n):
        raise KBError(f"--shard {shard!r}: need 1 <= i <= N.")
    return items[i - 1::n]
