"""Building KBs (Algorithm 1): the builder, job files, prompts, distributed builds on Ray, the `python -m kb_tools` command.
May import every other room (tests/test_layering.py holds the rule)."""
