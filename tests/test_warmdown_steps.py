"""warmdown_steps: a step-based warmdown that ignores the wallclock, and a floor under the LR."""
from __future__ import annotations

import pytest
import torch

import train_gpt
from conftest import tiny_args


@pytest.mark.parametrize("cap", ["0", "600"])
def test_step_based_warmdown_ignores_the_wallclock(cap):
    cpu = torch.device("cpu")
    by_step = train_gpt.TrainClock(tiny_args(ITERATIONS="1000", WARMDOWN_START_STEP="600", MIN_LR_FRAC="0.05",
                                             MAX_WALLCLOCK_SECONDS=cap), cpu)
    by_frac = train_gpt.TrainClock(tiny_args(ITERATIONS="1000", WARMDOWN_FRAC="0.4", MAX_WALLCLOCK_SECONDS=cap), cpu)
    by_step.elapsed_ms = by_frac.elapsed_ms = 599_000.0  # near the cap: no effect on a step-based schedule
    by_step.step_ms = by_frac.step_ms = 100.0
    for step, linear in ((0, 1.0), (600, 1.0), (700, 0.75), (900, 0.25), (990, 0.025), (1000, 0.0)):
        assert by_frac.lr_mul(step) == pytest.approx(linear)
        assert by_step.lr_mul(step) == pytest.approx(max(linear, 0.05))
    assert by_step.describe() == "lr_schedule:steps warmdown:600->1000 min_lr_frac:0.05"
    wallclock = train_gpt.TrainClock(tiny_args(MAX_WALLCLOCK_SECONDS="600", MIN_LR_FRAC="0.2"), cpu)
    assert wallclock.describe() == "lr_schedule:wallclock warmdown_iters:1200 min_lr_frac:0.2"
    wallclock.elapsed_ms, wallclock.step_ms = 600_000.0, 100.0
    assert wallclock.lr_mul(0) == 0.2  # the floor holds for the wallclock warmdown too
