"""Pure math and records, no ComfyUI: weights, schedules, coarse grids, stitching, evaluations, records, errors.
Imports nothing of the pack: only the standard library, numpy and torch (tests/test_layering.py holds the rule)."""
