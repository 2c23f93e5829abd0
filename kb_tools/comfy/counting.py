"""Which batch items a model evaluation is for: `evaluating(items)`, set by `counted.CountedDenoiser`.

Inside the pack's samplers every denoiser call goes through `CountedDenoiser`, which names the
batch items it evaluates, so that whatever counts work inside the model call (the benchmarks'
forward-pass counter, `benchmarks/forward_counter.py`) credits the rows of a sub-batch (ReDi
resumes items from different steps) to the right items; `evaluating_items()` reads them. A model
call outside one reads None.

No ComfyUI import: this module is pure Python.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Sequence

import numpy as np

_ITEMS: contextvars.ContextVar[np.ndarray | None] = contextvars.ContextVar("redi_evaluating_items", default=None)


@contextlib.contextmanager
def evaluating(items: Sequence[int] | np.ndarray) -> Iterator[None]:
    """Forward calls made inside this block evaluate these batch items (indices into the run's batch), in order."""
    token = _ITEMS.set(np.asarray(items, np.int64))
    try:
        yield
    finally:
        _ITEMS.reset(token)


def evaluating_items() -> np.ndarray | None:
    """int64 [n]: the batch items the current model call evaluates (`evaluating`); None outside a counted denoiser."""
    return _ITEMS.get()
