"""Files appear whole or not at all, and reports hold strict JSON."""

import json
import math

import pytest

from backend.atomic import json_number, write_atomically, write_json


def test_a_failed_write_leaves_the_old_file_and_no_partial_one(tmp_path):
    path = tmp_path / "report.json"
    write_json(path, {"a": 1})

    def half_then_fail(partial):
        partial.write_text('{"a": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, half_then_fail)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_reports_refuse_nan_and_turn_numbers_that_are_not_finite_into_null(tmp_path):
    with pytest.raises(ValueError):
        write_json(tmp_path / "bad.json", {"max_radiance": math.nan})
    assert not (tmp_path / "bad.json").exists()
    assert [json_number(v) for v in (math.nan, math.inf, None, 2.5)] == [None, None, None, 2.5]
    assert json_number(1.23456, 2) == 1.23
    write_json(tmp_path / "ok.json", {"max_radiance": json_number(math.inf)})
    assert json.loads((tmp_path / "ok.json").read_text()) == {"max_radiance": None}
