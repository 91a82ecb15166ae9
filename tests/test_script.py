"""The real script end to end, through its log lines: one process, two gloo ranks, bad input."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, TINY, run_script

RUN = {**TINY, "ITERATIONS": "12", "NUM_LAYER_SCHEDULE": "0:1,6:2", "VAL_LOSS_EVERY": "6",
       "TRAIN_LOG_EVERY": "1", "WARMUP_STEPS": "2", "MAX_WALLCLOCK_SECONDS": "0", "RUN_ID": "t",
       "WARMDOWN_ITERS": "4", "TTT_ENABLED": "1", "TTT_CHUNK_TOKENS": "64"}


def values(log: str, key: str) -> list[float]:
    return [float(v) for v in re.findall(rf"{key}:([-0-9.naif]+)", log)]


def test_end_to_end_run(tmp_path, dataset):
    result = run_script(tmp_path, {**dataset, **RUN})
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    log = (tmp_path / "logs" / "t.txt").read_text()
    assert out.strip().splitlines()[-1] in log
    assert "class Hyperparameters" in log and "num_layer_schedule:0:1,6:2" in log  # source and knobs
    assert re.search(r"^model_params:\d+$", out, re.M)
    assert "world_size:1 grad_accum_steps:8" in out
    assert "layer_schedule_advance:step:0 active_num_layers:1" in out
    assert "layer_schedule_advance:step:6 active_num_layers:2" in out
    assert len(re.findall(r"^step:\d+/12 train_loss:", out, re.M)) == 12
    assert len(re.findall(r"^step:(0|6|12)/12 val_loss:[\d.]+ val_bpb:[\d.]+ train_time:\d+ms step_avg:", out, re.M)) == 3
    losses = values(out, "train_loss")
    assert losses[-1] < losses[0] - 0.3  # it learns from real text
    assert "recompiles_after_warmup:0" in out
    artifact = tmp_path / "final_model.int8.ptz"
    code_bytes = len((REPO / "train_gpt.py").read_bytes())
    total = int(re.search(r"Total submission size int8\+zlib: (\d+) bytes", out).group(1))
    assert total == artifact.stat().st_size + code_bytes
    assert re.search(rf"^size_check: total:{total} cap:16000000 estimate:\d+ fits with {16_000_000 - total} bytes to spare$", out, re.M)
    pre_loss = values(out, "val_loss")[2]
    exact = re.search(r"final_int8_zlib_roundtrip_exact (val_loss:\S+ val_bpb:(\S+))", out)
    assert abs(values(exact.group(0), "val_loss")[0] - pre_loss) < 0.01 and 0 < float(exact.group(2)) < 10
    # The default stride is capped at the sequence length (32 here): sliding windows every 32 tokens
    # are the plain evaluation, to the last digit.
    assert f"final_sliding_window_exact stride:32 {exact.group(1)}" in out
    ttt = re.search(r"^final_ttt_exact val_loss:\S+ val_bpb:(\S+)$", out, re.M)
    compliance = re.search(r"^compliance train_time:(\d+)ms/600000ms:ok eval_time:(\d+)ms/600000ms:ok "
                           r"\(final_int8_zlib_roundtrip:(\d+)ms final_sliding_window:(\d+)ms final_ttt:(\d+)ms\) "
                           rf"artifact:{total}/16000000:ok val_tokens_trained_before_scoring:0 "
                           r"score:final_ttt_exact val_bpb:(\S+)$", out, re.M)
    assert ttt and compliance, out[-3000:]
    assert compliance.group(6) == ttt.group(1)
    assert int(compliance.group(2)) - sum(int(compliance.group(i)) for i in (3, 4, 5)) in (-2, -1, 0, 1, 2)


def test_two_gloo_ranks_match_one_process(tmp_path, dataset):
    env = {**dataset, **RUN, "ITERATIONS": "4", "WARMUP_STEPS": "0", "VAL_LOSS_EVERY": "0"}
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = run_script(tmp_path / "one", env)
    two = run_script(tmp_path / "two", env, nproc=2)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert "world_size:2 grad_accum_steps:4" in two.stdout
    a, b = values(one.stdout, "train_loss"), values(two.stdout, "train_loss")
    assert len(a) == len(b) == 4
    assert all(abs(x - y) <= 2e-4 for x, y in zip(a, b)), (a, b)
    va, vb = values(one.stdout, "val_bpb"), values(two.stdout, "val_bpb")
    assert abs(va[-1] - vb[-1]) < 1e-3


def corrupt_copy(tmp_path: Path, dataset: dict, how: str) -> dict:
    data = tmp_path / "data"
    shutil.copytree(dataset["DATA_PATH"], data)
    shard = sorted(data.glob("fineweb_train_*.bin"))[0]
    raw = bytearray(shard.read_bytes())
    if how == "magic":
        raw[:4] = np.int32(7).tobytes()
    else:
        raw = raw[:-2]
    shard.write_bytes(bytes(raw))
    return {"DATA_PATH": str(data)}


BAD = {
    "schedule without step 0": ({"NUM_LAYER_SCHEDULE": "5:2"}, "NUM_LAYER_SCHEDULE"),
    "non-increasing schedule": ({"NUM_LAYER_SCHEDULE": "0:2,10:3,10:4"}, "NUM_LAYER_SCHEDULE"),
    "depth below 1": ({"NUM_LAYER_SCHEDULE": "0:0"}, "NUM_LAYER_SCHEDULE"),
    "non-number depth": ({"NUM_LAYER_SCHEDULE": "0:six"}, "NUM_LAYER_SCHEDULE"),
    "non-number knob": ({"MODEL_DIM": "wide"}, "MODEL_DIM"),
    "no shards": ({"DATA_PATH": "/nonexistent/dir"}, "DATA_PATH"),
    "shard magic": ("magic", "fineweb_train_"),
    "shard size": ("size", "fineweb_train_"),
    "vocab mismatch": ({"VOCAB_SIZE": "1024"}, "VOCAB_SIZE=1024"),
    "dim vs heads": ({"MODEL_DIM": "30"}, "MODEL_DIM=30"),
    "odd head dim": ({"MODEL_DIM": "36"}, "MODEL_DIM/NUM_HEADS"),
    "kv heads": ({"NUM_KV_HEADS": "3"}, "NUM_KV_HEADS=3"),
    "batch split": ({"TRAIN_BATCH_TOKENS": "1000"}, "TRAIN_BATCH_TOKENS=1000"),
    "stride over window": ({"EVAL_STRIDE": "33"}, "EVAL_STRIDE=33"),
    "ttt mode": ({"TTT_MODE": "sgd"}, "TTT_MODE"),
    "full ttt per doc": ({"TTT_MODE": "full", "TTT_RESET": "doc"}, "TTT_RESET=none"),
    "short validation": ({"TRAIN_SEQ_LEN": "262144", "TRAIN_BATCH_TOKENS": "2097152"}, "validation split"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_fails_fast_with_one_line(tmp_path, dataset, case):
    override, needle = BAD[case]
    if isinstance(override, str):
        override = corrupt_copy(tmp_path, dataset, override)
    result = run_script(tmp_path, {**dataset, **RUN, **override})
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr[-2000:]
    assert "warmup_step" not in result.stdout and "model_params" not in result.stdout
    assert not list(tmp_path.glob("final_model*"))


def test_nonfinite_loss_stops_without_artifact(tmp_path, dataset):
    result = run_script(tmp_path, {**dataset, **RUN, "SCALAR_LR": "nan", "WARMUP_STEPS": "0"})
    assert result.returncode != 0
    assert "NaN/inf" in result.stderr.strip().splitlines()[-1]
    assert not list(tmp_path.glob("final_model*"))
    assert not [l for l in result.stdout.splitlines() if l.startswith("final_")]
