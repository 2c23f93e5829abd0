"""Everything that imports ComfyUI: counted sampling, plain sampling, guiders, model facts, the environment.
May import core only, besides ComfyUI itself (tests/test_layering.py holds the rule)."""
