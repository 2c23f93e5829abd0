"""Defensive JSON reading for KB files: size, nesting and number limits, each failure a KBError.

Python's json accepts NaN, Infinity, 1e999 (-> inf), repeated keys (the last one wins) and
nests until the interpreter's recursion limit. A KB file holding any of these was damaged or
forged, so they are refused here, with a message naming the file, the problem and the fix.
"""

from __future__ import annotations

import json
from typing import Any

from ..core.errors import KBError

#: Deepest nesting a KB JSON file may have (a manifest needs about 6 levels).
MAX_DEPTH = 32
#: Integers are seeds, counts, sizes and offsets: all fit in 64 bits.
INT_MIN, INT_MAX = -(2**63), 2**64 - 1


class _Refused(ValueError):
    """Raised inside the decoder's hooks; turned into a KBError by load_json."""


def _no_constant(name: str) -> Any:
    raise _Refused(f"holds the non-number {name}")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _Refused(f"holds the number {text[:40]}, beyond the float range")
    return value


def _bounded_int(text: str) -> int:
    if len(text) > 21:  # 2**64 has 20 digits, plus a sign
        raise _Refused(f"holds an integer of {len(text)} digits, beyond 64 bits")
    value = int(text)
    if not INT_MIN <= value <= INT_MAX:
        raise _Refused(f"holds the integer {value}, beyond 64 bits")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        repeated = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _Refused(f"repeats the key {repeated[:60]!r} in one object")
    return out


def depth(value: Any) -> int:
    """Nesting depth of a decoded JSON value (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, d = stack.pop()
        deepest = max(deepest, d)
        if isinstance(item, dict):
            stack.extend((v, d + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, d + 1) for v in item)
    return deepest


def load_json(data: bytes | memoryview, *, name: str, fix: str, max_bytes: int, max_depth: int | None = MAX_DEPTH,
              strict: bool = True) -> Any:
    """Decode `data` (UTF-8 JSON) or raise KBError("<name> <problem>. <fix>").

    strict=True also refuses repeated keys and checks every number's range (manifests and
    headers); strict=False keeps the C decoder's fast path for large entries files, whose
    fields the caller type-checks one by one.
    """
    if len(data) > max_bytes:
        raise KBError(f"{name} is {len(data)} bytes, more than the {max_bytes} a KB file of its kind may have. {fix}")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as e:
        raise KBError(f"{name} is not UTF-8 text ({e.reason} at byte {e.start}). {fix}") from None
    hooks: dict[str, Any] = {"parse_constant": _no_constant}
    if strict:
        hooks.update(parse_float=_finite_float, parse_int=_bounded_int, object_pairs_hook=_unique_keys)
    try:
        value = json.loads(text, **hooks)
    except _Refused as e:
        raise KBError(f"{name} {e}. {fix}") from None
    except RecursionError:
        raise KBError(f"{name} nests its JSON too deeply to be a KB file. {fix}") from None
    except json.JSONDecodeError as e:
        raise KBError(f"{name} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}). {fix}") from None
    except ValueError as e:  # e.g. an integer beyond Python's digit limit in non-strict mode
        raise KBError(f"{name} holds a value Python cannot decode ({e}). {fix}") from None
    if max_depth is not None and depth(value) > max_depth:
        raise KBError(f"{name} nests its JSON {depth(value)} levels deep, more than the {max_depth} a KB file may. {fix}")
    return value


def json_kind(value: Any) -> str:
    """What a decoded JSON value is, for an error message ("an object", "the number 3", ...)."""
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), f"the number {short(value)}" if isinstance(value, (int, float)) else type(value).__name__)


def short(value: Any, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
