"""Benchmarks of the pack, run as scripts (`python benchmarks/<name>.py`); results land in benchmarks/results/.

metrics  Frechet distance, noise floors, per-sample errors, verdicts (plain numpy)
report   JSON records of typed results, number formatting, README blocks, plot helpers
claims   the experiments of paper_claims.py
"""
