"""cosine_schedule against lightly (the oracle) and the anchor values."""

import math
import warnings

import pytest

import ssl_ops


def test_anchor_values():
    assert ssl_ops.cosine_schedule(1, 10, 1.0, 0.0) == pytest.approx(0.96984631, abs=1e-8)
    assert ssl_ops.cosine_schedule(2, 10, 1.0, 0.0) == pytest.approx(0.88302222, abs=1e-8)


def test_edges():
    assert ssl_ops.cosine_schedule(0, 10, 0.996, 1.0) == pytest.approx(0.996, abs=1e-15)
    assert ssl_ops.cosine_schedule(9, 10, 0.996, 1.0) == 1.0  # step >= max_steps - 1
    assert ssl_ops.cosine_schedule(0, 1, 0.5, 2.0) == 2.0  # max_steps <= 1
    assert ssl_ops.cosine_schedule(0, 0, 0.5, 2.0) == 2.0
    # A period is a full cycle: start at 0, end at half a period, start again.
    assert ssl_ops.cosine_schedule(5, 10, 1.0, 0.0, period=10) == pytest.approx(0.0, abs=1e-15)
    assert ssl_ops.cosine_schedule(10, 10, 1.0, 0.0, period=10) == pytest.approx(1.0)
    assert isinstance(ssl_ops.cosine_schedule(1, 10, 1, 0), float)


def test_errors_and_warning():
    with pytest.raises(ValueError, match="Current step number -1 can't be negative."):
        ssl_ops.cosine_schedule(-1, 10, 1.0, 0.0)
    with pytest.raises(ValueError, match="Total step number -2 can't be negative."):
        ssl_ops.cosine_schedule(0, -2, 1.0, 0.0)
    with pytest.raises(ValueError, match="Period 0 must be >= 1"):
        ssl_ops.cosine_schedule(0, 10, 1.0, 0.0, period=0)
    with pytest.warns(RuntimeWarning, match="Current step number 11 exceeds max_steps 10."):
        assert ssl_ops.cosine_schedule(11, 10, 1.0, 0.0) == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ssl_ops.cosine_schedule(11, 10, 1.0, 0.0, period=4)  # no warning with a period


def test_matches_lightly():
    scheduler = pytest.importorskip("lightly.utils.scheduler")
    cases = [
        (step, max_steps, start, end, period)
        for max_steps in (0, 1, 2, 3, 10, 1000)
        for step in (0, 1, 2, max_steps // 2, max_steps - 2, max_steps - 1, max_steps)
        if step >= 0
        for start, end in ((0.996, 1.0), (1.0, 0.0), (0.5, 0.1))
        for period in (None, 7)
    ]
    for step, max_steps, start, end, period in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            ours = ssl_ops.cosine_schedule(step, max_steps, start, end, period)
            theirs = scheduler.cosine_schedule(step, max_steps, start, end, period)
        assert math.isclose(ours, theirs, rel_tol=1e-15, abs_tol=1e-15), (step, max_steps, period)


def test_solo_learn_tau_formula():
    assert ssl_ops.solo_learn_tau(0, 100) == pytest.approx(0.996, abs=1e-15)
    assert ssl_ops.solo_learn_tau(100, 100) == pytest.approx(1.0, abs=1e-15)
    expected = 1.0 - (1.0 - 0.99) * (math.cos(math.pi * 30 / 100) + 1) / 2
    assert ssl_ops.solo_learn_tau(30, 100, base_tau=0.99) == expected


def test_timm_ema_decay_matches_timm():
    timm_utils = pytest.importorskip("timm.utils")
    model = __import__("torch").nn.Linear(2, 2)
    for kwargs in ({}, {"use_warmup": True}, {"use_warmup": True, "min_decay": 0.5, "update_after_step": 3},
                   {"decay": 0.99, "use_warmup": True, "warmup_gamma": 2.0, "warmup_power": 0.75}):
        ema = timm_utils.ModelEmaV3(model, **kwargs)
        for step in (None, 0, 1, 2, 3, 4, 10, 1000, 10**6):
            assert ssl_ops.timm_ema_decay(step, **kwargs) == ema.get_decay(step), (kwargs, step)
    # The anchor formula: 1 - (1 + s / gamma) ** -power, clamped.
    assert ssl_ops.timm_ema_decay(10, use_warmup=True) == pytest.approx(1 - (1 + 9) ** (-2 / 3))
