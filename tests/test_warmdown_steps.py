"""warmdown_steps: a step-based warmdown that ignores the wallclock, and a floor under the LR."""
from __future__ import annotations

import pytest

import train_gpt
from conftest import clock_of, tiny_args


@pytest.mark.parametrize("cap", ["0", "600"])
def test_step_based_warmdown_ignores_the_wallclock(cap):
    step_args = tiny_args(ITERATIONS="1000", WARMDOWN_START_STEP="600", MIN_LR_FRAC="0.05", MAX_WALLCLOCK_SECONDS=cap)
    frac_args = tiny_args(ITERATIONS="1000", WARMDOWN_FRAC="0.4", MAX_WALLCLOCK_SECONDS="0")
    by_step, by_frac = clock_of(step_args), clock_of(frac_args)
    by_step.elapsed_ms = by_frac.elapsed_ms = 599_000.0  # near the cap: no effect on a step-based schedule
    by_step.step_ms = by_frac.step_ms = 100.0
    for step, linear in ((0, 1.0), (600, 1.0), (700, 0.75), (900, 0.25), (990, 0.025), (1000, 0.0)):
        assert train_gpt.lr_multiplier(frac_args, by_frac, step) == pytest.approx(linear)
        assert train_gpt.lr_multiplier(step_args, by_step, step) == pytest.approx(max(linear, 0.05))
    assert train_gpt.describe_lr_schedule(step_args, cap != "0") == "lr_schedule:steps warmdown:600->1000 min_lr_frac:0.05"
    wallclock_args = tiny_args(MAX_WALLCLOCK_SECONDS="600", MIN_LR_FRAC="0.2")
    wallclock = clock_of(wallclock_args)
    assert train_gpt.describe_lr_schedule(wallclock_args, True) == "lr_schedule:wallclock warmdown_iters:1200 min_lr_frac:0.2"
    wallclock.elapsed_ms, wallclock.step_ms = 600_000.0, 100.0
    assert train_gpt.lr_multiplier(wallclock_args, wallclock, 0) == 0.2  # the floor holds for the wallclock warmdown too


def test_a_capped_fraction_warmdown_follows_the_wallclock_as_the_records():
    # The records' schedule: 1 until 1 - WARMDOWN_FRAC of the cap, then linear to 0 at the cap.
    args = tiny_args(ITERATIONS="20000", WARMDOWN_FRAC="0.72", MAX_WALLCLOCK_SECONDS="100")
    clock = clock_of(args)
    clock.step_ms, clock.sync_step = 20.0, 0
    for elapsed_s, expected in ((0, 1.0), (28, 1.0), (64, 0.5), (82, 0.25), (100, 0.0)):
        clock.elapsed_ms = 1000.0 * elapsed_s
        assert train_gpt.lr_multiplier(args, clock, 0) == pytest.approx(expected)
    assert train_gpt.describe_lr_schedule(args, True) == "lr_schedule:wallclock warmdown_frac:0.72 min_lr_frac:0.0"
