"""A second process learning into the same KB (run by tests/test_learning_kb.py).

    python learning_writer.py KBDIR DONE_FILE
        until DONE_FILE exists (and at least MIN_ROUNDS times), learns one new entry of random
        latents with the KB's own settings through `learning.learn`, which holds the KB's writer
        lock from its decision to its commit (the other process waits its turn); prints
        "LEARNED\\t<prompt>\\t<seed>" after each.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kb_tools.store import KnowledgeBase  # noqa: E402
from kb_tools.store.learning import learn  # noqa: E402

MIN_ROUNDS = 3


def main(kbdir: str, done: str) -> None:
    settings = KnowledgeBase.open(kbdir).settings
    rng = np.random.default_rng(0)
    i = 0
    while i < MIN_ROUNDS or not os.path.exists(done):
        prompt, seed = f"theirs {i}", 50_000 + i
        states = {st: rng.standard_normal((1, *settings.latent_shape)).astype(np.float32) for st in settings.stored_steps}
        report = learn(kbdir, settings, states, [prompt], [seed], dtype="float32")
        assert report.added == 1, report
        print(f"LEARNED\t{prompt}\t{seed}", flush=True)
        i += 1
        time.sleep(0.01)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
