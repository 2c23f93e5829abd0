"""Model evaluations counted where they happen: at the diffusion model's forward pass (the benchmarks' NFE).

One NFE (network function evaluation) of a batch item is one CFG'd prediction for it: the
diffusion model runs the item's conditional (positive) prompt once, and at cfg != 1 its
unconditional (negative) prompt once more, usually in the same forward call. `ForwardCounter`
counts those forward rows per item, positive and negative apart; an item's NFE is its number of
positive rows.

Why not count at the denoiser (`core.evaluations.Evaluations`)? Caches such as ComfyUI's EasyCache
answer a sampler's model call from a cache inside the model call, without running the diffusion
model; the sampler (and the pack's post-CFG probe) still sees a full evaluation. Counted at
the forward pass, a skipped step costs nothing and a computed one costs one NFE, whatever
wraps the model.

The counter is a DIFFUSION_MODEL wrapper added to a model clone through ComfyUI's wrapper
mechanism (`counted(model)`), and it must be the innermost such wrapper (added after
EasyCache / LazyCache and the like), or it would count the calls a cache answers; it refuses to
run otherwise. Items: inside the pack's samplers every denoiser call goes through
`kb_tools.comfy.counted.CountedDenoiser`, which names the batch items it evaluates
(`kb_tools.comfy.counting.evaluating`, read here with `evaluating_items`), so the rows of a
sub-batch (ReDi resumes items from different steps) go to the right items. A forward call
outside one is counted for items 0..b-1 of its own batch.

No ComfyUI import at module level: `counted` imports it when called.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

try:  # imported as part of the pack (the tests' `redi_pack.benchmarks`): the pack's own kb_tools, whose
    # CountedDenoiser names the items this counter reads
    from ..kb_tools.comfy.counting import evaluating_items
    from ..kb_tools.core.errors import KBError
except ImportError:  # the benchmarks' scripts: the pack root on sys.path
    from kb_tools.comfy.counting import evaluating_items
    from kb_tools.core.errors import KBError

#: Key of the counter among a model's DIFFUSION_MODEL wrappers.
COUNTER_KEY = "redi_forward_counter"


@dataclass
class ForwardCounts:
    """Forward rows of one run per batch item: positive (conditional) and negative (unconditional)."""

    batch: int
    positive: np.ndarray = field(init=False)  # int64 [B]
    negative: np.ndarray = field(init=False)  # int64 [B]
    calls: int = 0  # forward calls of the diffusion model
    rows: int = 0  # rows those calls evaluated, all items and prompts together

    def __post_init__(self) -> None:
        self.positive = np.zeros(self.batch, np.int64)
        self.negative = np.zeros(self.batch, np.int64)

    def nfe(self) -> np.ndarray:
        """int64 [B]: NFE per item, one per CFG'd prediction = the item's positive forward rows."""
        return self.positive.copy()

    def add(self, cond_or_uncond: Sequence[int], items: np.ndarray) -> None:
        """Count one forward call: one chunk of rows per entry of cond_or_uncond (0 positive, 1 negative)."""
        if items.size and (items.min() < 0 or items.max() >= self.batch):
            raise KBError(f"a forward call evaluated batch items {items.tolist()[:8]}, outside this run's batch of "
                          f"{self.batch}; start the counting session with the batch size the sampler runs.")
        self.calls += 1
        self.rows += len(cond_or_uncond) * len(items)
        for kind in cond_or_uncond:
            target = self.positive if int(kind) == 0 else self.negative
            np.add.at(target, items, 1)


class ForwardCounter:
    """DIFFUSION_MODEL wrapper that counts forward rows per item into the current session (see module docstring)."""

    def __init__(self) -> None:
        self._session: ForwardCounts | None = None
        self.uncounted_calls = 0  # forward calls made while no session was open

    @contextlib.contextmanager
    def session(self, batch: int) -> Iterator[ForwardCounts]:
        """Count the forward calls of one run of `batch` items into a fresh ForwardCounts."""
        counts, previous = ForwardCounts(int(batch)), self._session
        self._session = counts
        try:
            yield counts
        finally:
            self._session = previous

    @contextlib.contextmanager
    def item(self, index: int) -> Iterator[ForwardCounts]:
        """Count a run of one item (batch 1) as item `index` of the open session: a query set generated one at a time."""
        outer = self._session
        if outer is None or not 0 <= index < outer.batch:
            raise KBError(f"item {index} is outside the open counting session ({'none' if outer is None else outer.batch} "
                          "items); open a session with the query set's size before counting its items one at a time.")
        with self.session(1) as one:
            yield one
        outer.positive[index] += one.positive[0]
        outer.negative[index] += one.negative[0]
        outer.calls += one.calls
        outer.rows += one.rows

    def __call__(self, executor, *args, **kwargs):
        if executor.idx != len(executor.wrappers) - 1:
            raise KBError(
                "the forward counter must be the innermost DIFFUSION_MODEL wrapper, or it counts the calls a cache "
                "answers without running the model; apply it last (counted(model) after EasyCache / LazyCache).")
        counts = self._session
        if counts is None:
            self.uncounted_calls += 1
            return executor(*args, **kwargs)
        x = args[0]
        options = args[-1] if args and isinstance(args[-1], dict) else kwargs.get("transformer_options", {})
        chunks = list(options.get("cond_or_uncond") or [0])
        per_chunk, rest = divmod(int(x.shape[0]), len(chunks))
        if rest:
            raise KBError(f"a forward call of {int(x.shape[0])} rows does not split into {len(chunks)} prompt chunks.")
        items = evaluating_items()
        if items is None:
            items = np.arange(per_chunk, dtype=np.int64)
        elif len(items) != per_chunk:
            raise KBError(f"a forward call evaluated {per_chunk} rows per prompt, but its denoiser call names "
                          f"{len(items)} batch items; count each sub-batch through its own CountedDenoiser.")
        counts.add(chunks, items)
        return executor(*args, **kwargs)


def counted(model, counter: ForwardCounter | None = None):
    """(a clone of `model` whose diffusion model counts its forward rows, the ForwardCounter).

    Apply it after every other model patch that wraps the diffusion model (EasyCache,
    LazyCache): the counter must see only the calls that run the model.
    """
    import comfy.patcher_extension

    counter = ForwardCounter() if counter is None else counter
    clone = model.clone()
    clone.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, COUNTER_KEY)
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, COUNTER_KEY, counter)
    return clone, counter
