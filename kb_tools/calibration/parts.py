"""The named parts a key step's stored calibration holds beside the residual percentiles ("blend_error", "plain_reference").

Each part is a JSON dict measured for one key step and one H; a KB stores one per key step
(the manifest's calibration), so a part for another H reads as absent. Plain Python.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable

from ..core.errors import KBError
from ..store import KnowledgeBase


def part_of(calibration: Mapping | None, name: str, key_step: int, h: int, check: Callable[[object], dict],
            recalibrate: str) -> dict | None:
    """The part `name` of a key step's calibration, checked, if it was measured for this H; None if absent or for another H."""
    part = calibration.get(name) if isinstance(calibration, Mapping) else None
    if part is None:
        return None
    part = check(part)
    if part["key_step"] != key_step:
        raise KBError(f"the {name.replace('_', '-')} part stored for key step {key_step} says it was measured at key "
                      f"step {part['key_step']}: the calibration is damaged. {recalibrate}.")
    return part if part["h"] == h else None


def store_part(kb: KnowledgeBase, key_step: int, name: str, part: Mapping) -> None:
    """Merge `part` into the key step's stored calibration under `name` (one atomic manifest commit), keeping the rest."""
    kb.set_calibration(key_step, {**(kb.calibration(key_step) or {}), name: dict(part)})
