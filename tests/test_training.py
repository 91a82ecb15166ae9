"""TRAINING: the clock's wallclock warmdown and cap, a run's outputs moved aside for the next, and
runs stopped without an artifact when the loss goes non-finite."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import train_gpt
from conftest import TINY, clock_of, run_patched, tiny_args


def test_clock_warmdown_follows_the_current_phase():
    args = tiny_args(ITERATIONS="1000", WARMDOWN_ITERS="100", MAX_WALLCLOCK_SECONDS="0")
    clock = clock_of(args)
    assert [train_gpt.lr_multiplier(args, clock, s) for s in (0, 899, 900, 950, 1000)] == [1.0, 1.0, 1.0, 0.5, 0.0]
    capped_args = tiny_args(WARMDOWN_ITERS="100", MAX_WALLCLOCK_SECONDS="10")
    capped = clock_of(capped_args)
    lr = lambda step: train_gpt.lr_multiplier(capped_args, capped, step)
    assert lr(0) == 1.0  # no step time measured yet
    # 1000 steps took 4 s at depth 2; depth 6 begins and is first guessed 3x slower (12 ms/step).
    capped.elapsed_ms, capped.sync_step, capped.step_ms = 4000.0, 1000, 4.0
    capped.begin_stage(1000, 3.0)
    assert capped.step_ms == 12.0
    assert lr(1000) == 1.0
    # 6 s remain = 500 steps at 12 ms; warmdown covers the last 100 of them (1.2 s).
    assert lr(1450) == pytest.approx(50 * 12 / 1200)
    assert lr(1500) == 0.0
    capped.elapsed_ms, capped.sync_step = 9990.0, 1490
    assert capped.out_of_time()  # the next step would end past 10 s
    capped.elapsed_ms = 9900.0
    assert not capped.out_of_time() and capped.next_sync(1490) == 1494
    capped.elapsed_ms = 1000.0
    assert capped.next_sync(1490) == 1490 + train_gpt.MAX_SYNC_GAP


def test_a_new_run_moves_an_earlier_runs_log_and_artifacts_aside(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for k in (1, 2):
        Path("logs").mkdir(exist_ok=True)
        Path("logs/r.txt").write_text(f"run {k}\n")
        Path("artifacts/r").mkdir(parents=True)
        Path("artifacts/r/final_model.int8.ptz").write_text(f"artifact {k}")
        train_gpt.set_aside_earlier(tiny_args(RUN_ID="r"), keep_log=False)
        assert not Path("logs/r.txt").exists() and not Path("artifacts/r").exists()
    assert Path("logs/r.txt.~1~").read_text() == "run 1\n" and Path("logs/r.txt.~2~").read_text() == "run 2\n"
    assert Path("artifacts/r.~2~/final_model.int8.ptz").read_text() == "artifact 2"
    train_gpt.Logger("r", True)("one run")
    assert Path("logs/r.txt").read_text() == "one run\n"


@pytest.mark.slow
def test_a_nonfinite_training_loss_stops_the_run_without_an_artifact(tmp_path, dataset):
    patch = ("step = train_gpt.Trainer.forward_backward\n"
             "train_gpt.Trainer.forward_backward = lambda *a: (lambda loss, reports: (loss * float('nan'), reports))(*step(*a))")
    result = run_patched(tmp_path, {**dataset, **TINY, "ITERATIONS": "4", "RUN_ID": "n"}, patch)
    assert result.returncode == 1
    assert "training loss became NaN/inf by step 1" in result.stderr.strip().splitlines()[-1]
    assert not [l for l in result.stdout.splitlines() if l.startswith("final_")] and not (tmp_path / "artifacts").exists()


@pytest.mark.slow
def test_a_run_whose_steps_slow_down_stops_within_a_step_of_the_cap(tmp_path, dataset):
    # On a virtual clock the script reads, 40 steps of 0.05 s, then steps of 0.8 s: syncs planned
    # from the fast steps alone would overshoot the 6 s cap by several slow steps.
    patch = ("import types\n"
             "now, step = [0.0], train_gpt.Trainer.forward_backward\n"
             "train_gpt.time = types.SimpleNamespace(perf_counter=lambda: now[0])\n"
             "def timed(*a, **k):\n"
             "    now[0] += 0.05 if now[0] < 2.0 else 0.8\n"
             "    return step(*a, **k)\n"
             "train_gpt.Trainer.forward_backward = timed")
    env = {**dataset, **TINY, "MODEL_DIM": "16", "NUM_HEADS": "2", "NUM_KV_HEADS": "1", "ITERATIONS": "100000",
           "MAX_WALLCLOCK_SECONDS": "6", "VAL_LOSS_EVERY": "0", "TRAIN_LOG_EVERY": "0", "RUN_ID": "slow",
           "EVAL_STRIDE": "0", "TRAIN_BATCH_TOKENS": "256"}
    result = run_patched(tmp_path, env, patch)
    assert result.returncode == 0, result.stderr[-2000:]
    stop = re.search(r"^stopping_early: wallclock_cap train_time:(\d+)ms step:(\d+)/100000$", result.stdout, re.M)
    assert stop and 6000 - 800 < int(stop.group(1)) <= 6000 and int(stop.group(2)) == 40 + 5, result.stdout[-1500:]
