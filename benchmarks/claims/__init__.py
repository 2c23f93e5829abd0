"""The paper-claims benchmark (`benchmarks/paper_claims.py`), one job per module.

config       what the run measures (sizes, budgets, H, ...); the smoke config
rows         typed result rows and the table experiments look them up in
bench        models, judge, reference sets, knowledge bases; runs plain / ReDi / T-Stitch and scores them
experiments  one function per experiment, each returning typed rows
goals        the regime map and the pre-declared goals, from the rows
writers      markdown, plots and the README block, from the results JSON
"""
