"""Prompt lists for knowledge-base builds: plain text, JSONL, or COCO captions JSON."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import KBError


def read_prompts(path: str | Path, *, first_caption_only: bool = True) -> list[str]:
    """Prompts from a file, in file order, blank lines and exact duplicates dropped.

    - ``.txt`` (or anything else): one prompt per line.
    - ``.jsonl``: one JSON object per line with a ``prompt``, ``caption`` or ``text`` field (or a bare string).
    - ``.json``: a COCO captions file (``annotations`` with ``image_id`` and ``caption``); by
      default the first caption of each image, as the official ReDi knowledge base used.
    """
    path = Path(path)
    if not path.is_file():
        raise KBError(f"prompt file {path} does not exist; give the path of a .txt (one prompt per line), .jsonl or COCO captions .json file.")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        prompts = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise KBError(f"{path}:{n} is not valid JSON ({e.msg}); each line must be an object like {{\"prompt\": \"...\"}}.") from None
            if isinstance(item, str):
                prompts.append(item)
                continue
            value = next((item[k] for k in ("prompt", "caption", "text") if isinstance(item, dict) and k in item), None)
            if not isinstance(value, str):
                raise KBError(f"{path}:{n} has no 'prompt', 'caption' or 'text' string field; add one.")
            prompts.append(value)
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise KBError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); give a COCO captions file or use .txt/.jsonl.") from None
        annotations = data.get("annotations") if isinstance(data, dict) else None
        if not isinstance(annotations, list):
            raise KBError(f"{path} is not a COCO captions file (no 'annotations' list); use .txt (one prompt per line) or .jsonl for other prompt lists.")
        seen_images = set()
        prompts = []
        for ann in sorted(annotations, key=lambda a: (a.get("image_id", 0), a.get("id", 0))):
            if first_caption_only:
                if ann.get("image_id") in seen_images:
                    continue
                seen_images.add(ann.get("image_id"))
            prompts.append(str(ann.get("caption", "")))
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
