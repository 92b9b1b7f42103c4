"""Learning-rate schedules: A1111's piecewise syntax and kohya's scheduler names."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lib_ti.schedule import SCHEDULERS, base_rate, lr_at, parse_piecewise, scheduler_factor


def test_a1111_piecewise():
    pieces = parse_piecewise("0.005:100, 1e-3:1000, 1e-5")
    assert pieces == [(0.005, 100), (1e-3, 1000), (1e-5, -1)]
    assert base_rate(pieces, 0) == 0.005 and base_rate(pieces, 99) == 0.005
    assert base_rate(pieces, 100) == 1e-3 and base_rate(pieces, 5000) == 1e-5
    assert base_rate(parse_piecewise("0.01:10"), 50) == 0.01  # past the end keeps the last rate


@pytest.mark.parametrize("bad", ["", "abc", "0.1:10, 0.2:5", "0.1, 0.2:10", "-1", "0.1:x"])
def test_piecewise_errors(bad):
    with pytest.raises(ValueError):
        parse_piecewise(bad)


def test_scheduler_shapes():
    assert scheduler_factor("constant_with_warmup", 5, 100, warmup=10) == 0.5
    assert scheduler_factor("linear", 100, 100) == 0.0
    assert math.isclose(scheduler_factor("cosine", 50, 100), 0.5)
    assert math.isclose(scheduler_factor("cosine_with_restarts", 50, 100, num_cycles=2), 1.0)
    assert scheduler_factor("polynomial", 0, 100, power=2.0) == pytest.approx(1.0)
    assert lr_at(parse_piecewise("0.01"), "constant", 3, 10, scale=4) == pytest.approx(0.04)


@given(st.sampled_from(SCHEDULERS), st.integers(0, 2000), st.integers(1, 2000), st.integers(0, 500),
       st.integers(1, 5), st.floats(0.1, 5))
def test_factor_in_unit_interval(name, step, total, warmup, cycles, power):
    f = scheduler_factor(name, step, total, warmup, cycles, power)
    assert 0.0 <= f <= 1.0


@given(st.lists(st.tuples(st.floats(1e-6, 1.0), st.integers(1, 50)), min_size=1, max_size=5))
def test_piecewise_roundtrip(parts):
    steps, text = 0, []
    for rate, gap in parts:
        steps += gap
        text.append(f"{rate!r}:{steps}")
    pieces = parse_piecewise(", ".join(text))
    assert [p[0] for p in pieces] == [p[0] for p in parts]
