"""One sampler per file: ReDi (Algorithm 2) and its chain of steps, the KB-corrected solver, T-Stitch, learning.
May import core, store, comfy and calibration (tests/test_layering.py holds the rule)."""
