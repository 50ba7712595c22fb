"""Momentum schedules: the float and the device-tensor forms against the published formulas."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eman_fused import schedules


# The formulas as the papers / libraries write them, spelled out independently of the module.
def byol(k, m0, total):
    return 1 - (1 - m0) * (math.cos(math.pi * min(k, total) / total) + 1) / 2


def mean_teacher(k, m):
    return min(1 - 1 / (k + 1), m)


def timm_warmup(k, gamma, power, cap):
    return min(1 - (1 + k / gamma) ** -power, cap)


def triangle(k, low, high, period):
    pos = k % period
    half = period / 2
    up = pos / half if pos <= half else (period - pos) / half
    return low + (high - low) * up


def timm_get_decay(step, decay, min_decay=0.0, update_after_step=0, use_warmup=False, gamma=1.0, power=2 / 3):
    # timm's ModelEmaV3.get_decay, written out
    step = max(0, step - update_after_step - 1)
    if step <= 0:
        return 0.0
    if use_warmup:
        return max(min(1 - (1 + step / gamma) ** -power, decay), min_decay)
    return decay


CASES = [
    (schedules.Constant(0.996), lambda k: 0.996),
    (schedules.CosineToOne(0.996, 300), lambda k: byol(k, 0.996, 300)),
    (schedules.MeanTeacherRamp(0.99), lambda k: mean_teacher(k, 0.99)),
    (schedules.Warmup(gamma=1.0, power=0.75), lambda k: timm_warmup(k, 1.0, 0.75, 1.0)),
    (schedules.Warmup(gamma=5.0, power=2 / 3, max_momentum=0.9998), lambda k: timm_warmup(k, 5.0, 2 / 3, 0.9998)),
    (schedules.Cyclical(0.99, 0.999, 40), lambda k: triangle(k, 0.99, 0.999, 40)),
    (schedules.CopyFirst(schedules.Constant(0.95)), lambda k: 0.0 if k == 0 else 0.95),
    (schedules.CopyFirst(schedules.MeanTeacherRamp(0.99), updates=20),
     lambda k: 0.0 if k < 20 else mean_teacher(k, 0.99)),
    (schedules.TimmDecay(0.9998), lambda k: timm_get_decay(k, 0.9998)),
    (schedules.TimmDecay(0.9999, min_decay=0.2, update_after_step=19, use_warmup=True, warmup_gamma=2.0,
                         warmup_power=0.75),
     lambda k: timm_get_decay(k, 0.9999, 0.2, 19, True, 2.0, 0.75)),
]
IDS = [repr(s) for s, _ in CASES]


@pytest.mark.parametrize("schedule,formula", CASES, ids=IDS)
@settings(max_examples=60, deadline=None)
@given(k=st.integers(0, 100_000))
def test_float_form_is_the_formula(schedule, formula, k):
    assert schedule(k) == pytest.approx(formula(k), rel=0, abs=1e-12)
    assert 0.0 <= schedule(k) <= 1.0


@pytest.mark.parametrize("schedule,formula", CASES, ids=IDS)
def test_tensor_form_matches_float_form(schedule, formula):
    for k in [0, 1, 2, 19, 20, 21, 150, 299, 300, 301, 10_000, 123_457]:
        m = schedule.tensor(torch.tensor(k))
        assert m.dim() == 0 and m.dtype == torch.float64
        assert m.item() == pytest.approx(schedule(k), rel=0, abs=1e-12), k


def test_known_values():
    cos = schedules.CosineToOne(0.996, 100)
    assert cos(0) == pytest.approx(0.996) and cos(50) == pytest.approx(0.998)
    assert cos(100) == 1.0 and cos(1000) == 1.0
    mt = schedules.MeanTeacherRamp(0.99)
    assert mt(0) == 0.0 and mt(1) == 0.5 and mt(1000) == 0.99
    assert schedules.Warmup()(0) == 0.0
    assert schedules.Warmup(power=0.75)(9999) == pytest.approx(0.999)  # timm: 0.999 near 10k
    cyc = schedules.Cyclical(0.9, 0.99, 10)
    assert cyc(0) == pytest.approx(0.9) and cyc(5) == pytest.approx(0.99) and cyc(10) == pytest.approx(0.9)


def test_tensor_form_stays_on_the_step_device_and_needs_no_host_value():
    step = torch.tensor(7, dtype=torch.int64)
    for schedule, _ in CASES:
        out = schedule.tensor(step)
        assert out.device == step.device


@pytest.mark.parametrize("make", [
    lambda: schedules.Constant(1.5),
    lambda: schedules.Constant(-0.1),
    lambda: schedules.CosineToOne(0.99, 0),
    lambda: schedules.MeanTeacherRamp(2.0),
    lambda: schedules.Warmup(gamma=0),
    lambda: schedules.Warmup(power=-1),
    lambda: schedules.Cyclical(0.9, 0.99, 1),
    lambda: schedules.Cyclical(0.9, 1.2, 10),
    lambda: schedules.CopyFirst(schedules.Constant(0.9), updates=-1),
    lambda: schedules.TimmDecay(1.5),
    lambda: schedules.TimmDecay(0.99, min_decay=-0.1),
    lambda: schedules.TimmDecay(0.99, update_after_step=-1),
    lambda: schedules.TimmDecay(0.99, warmup_gamma=0),
])
def test_bad_arguments_raise(make):
    with pytest.raises(ValueError):
        make()


def test_bad_steps_raise():
    s = schedules.Constant(0.9)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError):
            s(bad)
    with pytest.raises(ValueError):
        s.tensor(torch.tensor([1, 2]))
