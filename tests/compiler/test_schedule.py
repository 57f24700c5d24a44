import json

import pytest

from flexdit_export.errors import UserError
from flexdit_export.schedule import Stage, paper4_grids, parse_schedule


def P(spec, grid=16, family="flexdit", T=1000, s=8):
    return parse_schedule(spec, T=T, grid=grid, family=family, semantic_size=s)


def test_presets():
    assert P("released") == [Stage(0, 999, 8)]
    assert P("dense") == [Stage(0, 999, None)]
    assert P("paper4") == [Stage(750, 999, 6), Stage(500, 749, 7), Stage(250, 499, 9), Stage(0, 249, 10)]
    assert [s.sparse_grid for s in P("paper4", grid=32)] == [12, 15, 17, 20]
    assert paper4_grids(8) == [3, 4, 5, 5]


def test_custom_text_each_lo_covers_up_to_next_boundary():
    assert P("750:6,500:7,250:9,0:10") == P("paper4")
    assert P("0:8") == [Stage(0, 999, 8)]
    assert P("0:dense,500:4") == [Stage(500, 999, 4), Stage(0, 499, None)]


def test_json_file(tmp_path):
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"stages": [{"t_min": 0, "t_max": 399, "sparse_grid": None},
                                        {"t_min": 400, "t_max": 999, "sparse_grid": 5}]}))
    assert P(str(f)) == [Stage(400, 999, 5), Stage(0, 399, None)]


@pytest.mark.parametrize("spec,match", [
    ("500:6", "uncovered"),
    ("0:17", "outside 1..16"),
    ("0:0", "outside 1..16"),
    ("1000:4,0:5", "outside timesteps"),
    ("0:6,0:7", "repeats"),
    ("a:6", "not a timestep"),
    ("0:x", "not an integer"),
    ("fast", "unknown schedule"),
])
def test_invalid_text(spec, match):
    with pytest.raises(UserError, match=match):
        P(spec)


def test_invalid_json_overlap_and_gap(tmp_path):
    f = tmp_path / "s.json"
    f.write_text(json.dumps([{"t_min": 0, "t_max": 600, "sparse_grid": 4}, {"t_min": 500, "t_max": 999, "sparse_grid": 5}]))
    with pytest.raises(UserError, match="overlap"):
        P(str(f))
    f.write_text(json.dumps([{"t_min": 0, "t_max": 100, "sparse_grid": 4}, {"t_min": 500, "t_max": 999, "sparse_grid": 5}]))
    with pytest.raises(UserError, match="101-499 uncovered"):
        P(str(f))
    with pytest.raises(UserError, match="not found"):
        P(str(tmp_path / "missing.json"))


def test_dit_has_only_a_dense_stage():
    assert P("released", family="dit") == [Stage(0, 999, None)]
    with pytest.raises(UserError, match="plain DiT"):
        P("paper4", family="dit")
