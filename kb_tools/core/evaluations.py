"""Model evaluations counted per model and batch item: what every sampler of the pack reports it spent."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np


@dataclass
class Evaluations:
    """Denoiser evaluations per model name and batch item (one evaluation = one CFG'd prediction).

    per_model: name -> int64 [B]. The names are the run's roles ("model", "small_model",
    "large_model"); a run on one model has the single name "model".
    """

    batch: int
    per_model: dict[str, np.ndarray] = field(default_factory=dict)

    def add(self, model: str, items: Iterable[int] | np.ndarray) -> None:
        """Count one evaluation of `model` for each of `items` (indices into the batch)."""
        counts = self.per_model.setdefault(model, np.zeros(self.batch, np.int64))
        np.add.at(counts, np.asarray(list(items) if not isinstance(items, np.ndarray) else items, np.int64), 1)

    def of(self, model: str) -> np.ndarray:
        """int64 [B]: evaluations of `model` per item (zeros when it never ran)."""
        return self.per_model.get(model, np.zeros(self.batch, np.int64))

    def per_item(self) -> np.ndarray:
        """int64 [B]: evaluations of all models per item."""
        return sum(self.per_model.values(), np.zeros(self.batch, np.int64))

    def total(self, model: str | None = None) -> int:
        """Evaluations summed over items (of one model, or of all)."""
        return int((self.per_item() if model is None else self.of(model)).sum())

    def concat(self, other: Evaluations) -> Evaluations:
        """These items followed by `other`'s (for runs made batch by batch)."""
        names = set(self.per_model) | set(other.per_model)
        return Evaluations(self.batch + other.batch,
                           {n: np.concatenate([self.of(n), other.of(n)]) for n in sorted(names)})

    def describe(self) -> str:
        """'6 evaluations per item' or '4-10 evaluations per item (mean 7)' (all models together)."""
        per = self.per_item()
        if per.size == 0:
            return "no evaluations"
        lo, hi = int(per.min()), int(per.max())
        return f"{lo} evaluations per item" if lo == hi else f"{lo}-{hi} evaluations per item (mean {per.mean():.3g})"
