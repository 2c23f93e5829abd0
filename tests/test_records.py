"""Recipe validation and the one record comparer (no ComfyUI needed)."""
from __future__ import annotations

import pytest

from kb_tools.core.errors import KBError
from kb_tools.core.records import Difference, Recipe, describe_differences, differences


def test_recipe_validates_once_and_round_trips():
    r = Recipe("euler", "normal", 20, 3)
    assert r.cfg == 3.0 and isinstance(r.cfg, float)
    assert Recipe.from_dict(r.to_dict()) == r
    assert r.describe() == "euler/normal, 20 steps, cfg 3"
    for bad in (("", "normal", 20, 3.0), ("euler", "normal", 0, 3.0), ("euler", "normal", True, 3.0),
                ("euler", "normal", 20, float("inf")), ("euler", "normal", 20, -1.0), ("euler", None, 20, 3.0)):
        with pytest.raises(KBError):
            Recipe(*bad)
    with pytest.raises(KBError, match="lacks"):
        Recipe.from_dict({"sampler": "euler"})


def test_differences_names_every_leaf():
    a = {"sampler": "euler", "steps": 20, "cfg": 3.0, "sig": {"ch": 4, "smin": 0.0292}, "sigmas": [14.6, 1.0, 0.0]}
    b = {"sampler": "dpmpp_2m", "steps": 20, "cfg": 3.0 + 1e-9, "sig": {"ch": 16, "smin": 0.0292}, "sigmas": [14.6, 1.1, 0.0]}
    diffs = differences(a, b)
    assert [d.path for d in diffs] == ["sampler", "sig.ch", "sigmas[1]"]
    text = describe_differences(diffs, "KB", "query")
    assert "sampler: KB has 'euler', query has 'dpmpp_2m'" in text and "sig.ch" in text and "sigmas[1]" in text


def test_differences_tolerances_ignore_and_missing_keys():
    a = {"weight_probe": [1.0, 2.0], "patches": {"count": 0}, "only_a": 1}
    b = {"weight_probe": [1.01, 2.0], "patches": {"count": 2}}
    assert [d.path for d in differences(a, b)] == ["only_a", "patches.count", "weight_probe[0]"]
    loose = differences(a, b, tolerances={"weight_probe": (2e-2, 1e-3)}, ignore=("patches",))
    assert loose == [Difference("only_a", 1, differences.__globals__["_ABSENT"])]
    assert "nothing" in loose[0].describe()
    assert differences([1, 2], [1, 2, 3])[0].path == ""
    assert differences(1, 1.0) == [] and differences(True, 1) != [] and differences("a", "a") == []
