"""What a KB measures about itself: the error guards, the blend-error model, the plain reference, residuals.
May import core, store and comfy (tests/test_layering.py holds the rule)."""
