"""benchmarks/compare_results.py: which numbers of two result files differ, timings kept apart."""
from __future__ import annotations

import json

from benchmarks.compare_results import compare, main


def test_results_that_differ_are_named_and_timings_kept_apart():
    before = {"fd": 41.9, "rows": [{"nfe": 5, "mse": 0.01, "wall_seconds": 3.0}], "note": "x", "old": 1}
    after = {"fd": 42.4, "rows": [{"nfe": 5, "mse": 0.01, "wall_seconds": 9.0}], "note": "x", "new": 2}
    got = compare(before, after)
    assert [r["key"] for r in got["differ"]] == ["fd"]
    assert abs(got["differ"][0]["relative_difference"] - 0.5 / 42.4) < 1e-12
    assert [r["key"] for r in got["timings_differ"]] == ["rows[0].wall_seconds"]
    assert got["equal"] == 3  # rows[0].nfe, rows[0].mse, note
    assert got["only_before"] == ["old"] and got["only_after"] == ["new"]


def test_unreadable_file_is_a_message_not_a_traceback(tmp_path, capsys):
    good = tmp_path / "a.json"
    good.write_text(json.dumps({"a": 1}))
    bad = tmp_path / "b.json"
    bad.write_text("{not json")
    assert main([str(good), str(bad)]) == 2
    assert "cannot read the result files" in capsys.readouterr().err
