"""Wall and CPU seconds of a block, side by side (the machine is shared: wall time alone says little)."""
from __future__ import annotations

import time


class Timer:
    """`with Timer() as t:` -> t.wall (perf_counter seconds) and t.cpu (this process's CPU seconds, all threads)."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0

    def __enter__(self) -> Timer:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def elapsed(self) -> tuple[float, float]:
        """(wall, CPU) seconds so far, inside the block."""
        return time.perf_counter() - self._wall, time.process_time() - self._cpu

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu
