"""The real script end to end, through its log lines: one process, two gloo ranks, bad input."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, TINY, run_patched, run_script

RUN = {**TINY, "ITERATIONS": "12", "NUM_LAYER_SCHEDULE": "0:1,6:2", "VAL_LOSS_EVERY": "6",
       "TRAIN_LOG_EVERY": "1", "WARMUP_STEPS": "2", "MAX_WALLCLOCK_SECONDS": "0", "RUN_ID": "t",
       "WARMDOWN_ITERS": "4", "TTT_ENABLED": "1", "TTT_CHUNK_TOKENS": "64", "TTT_SLIDING_SCORE": "1"}


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
    # Step 6 switches depth: its validation scores the depth trained up to it, before the switch.
    assert out.index("step:6/12 val_loss:") < out.index("layer_schedule_advance:step:6 ")
    losses = values(out, "train_loss")
    assert losses[-1] < losses[0] - 0.3  # it learns from real text
    assert "recompiles_after_warmup:0" in out
    artifact = tmp_path / "artifacts" / "t" / "final_model.int8.ptz"
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
                           rf"sliding_window:scored export_calibration:none artifact:{total}/16000000:ok val_tokens_trained_before_scoring:0 "
                           r"score:final_ttt_exact val_bpb:(\S+)$", out, re.M)
    assert ttt and compliance, out[-3000:]
    assert compliance.group(6) == ttt.group(1)
    assert 0.5 < float(re.search(r"^ttt_adapted share:(\S+) ", out, re.M).group(1)) < 1  # the documents are several chunks long
    assert int(compliance.group(2)) - sum(int(compliance.group(i)) for i in (3, 4, 5)) in (-2, -1, 0, 1, 2)


def test_int6_zstd_run_with_late_ste_qat_and_ema(tmp_path, dataset):
    # MLP matrices of 128 x 640 are quantized, so QAT and the int6 grid act on them. (Two MLP
    # layers: a 640 x 640 one would triple the step's cost in Muon's bf16 on a CPU.)
    env = {**dataset, **RUN, "TTT_ENABLED": "0", "MODEL_DIM": "128", "MLP_MULT": "5", "MLP_LAYERS": "2", "QUANT_BITS": "6",
           "COMPRESSOR": "zstd", "QAT_MODE": "ste", "QAT_START_FRAC": "0.5", "EMA_DECAY": "0.5", "EVAL_STRIDE": "0"}
    result = run_script(tmp_path, env)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert re.search(r"^size_estimate int6\+zstd: total:~\d+ cap:16000000 likely fits$", out, re.M)
    assert "export:int6+zstd embed_bits:8 head_bits:8 clip_sigmas:0.0,0.0 noisy_qat:True qat_mode:ste qat_start_frac:0.5" in out
    assert re.findall(r"^qat_start .*$", out, re.M) == ["qat_start step:6 mode:ste grid:int6"]
    last_val = values(re.findall(r"^step:12/12 val_loss:.*$", out, re.M)[0], "val_bpb")[0]
    ema = re.search(r"^ema decay:0.5 val_loss:\S+ val_bpb:(\S+) raw_val_bpb:(\S+) delta_bpb:(\S+)$", out, re.M)
    assert float(ema.group(2)) == last_val and float(ema.group(1)) != last_val
    assert float(ema.group(3)) == pytest.approx(float(ema.group(1)) - last_val, abs=2e-4)
    pre = float(re.search(r"^final_prequant_exact val_loss:\S+ val_bpb:(\S+)$", out, re.M).group(1))
    assert abs(pre - float(ema.group(1))) < 1e-4
    post = float(re.search(r"^final_int6_zstd_roundtrip_exact val_loss:\S+ val_bpb:(\S+)$", out, re.M).group(1))
    gap = float(re.search(r"^quant_gap int6\+zstd val_bpb:(\S+) \(roundtrip minus pre-quant\)$", out, re.M).group(1))
    assert gap == pytest.approx(post - pre, abs=1e-7) and gap != 0
    artifact = tmp_path / "artifacts" / "t" / "final_model.int6.ptz"
    assert artifact.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"  # a zstd frame
    total = int(re.search(r"Total submission size int6\+zstd: (\d+) bytes", out).group(1))
    assert total == artifact.stat().st_size + len((REPO / "train_gpt.py").read_bytes())
    assert (tmp_path / "artifacts" / "t" / "final_model.pt").exists()
    assert re.search(r"^compliance .* score:final_int6_zstd_roundtrip_exact val_bpb:", out, re.M)


# A 4352-wide hidden layer of untrained weights, SDClip-quantized at 4 std: ~16 MB of codes,
# estimated (as trained rows) at ~20 MB, 25% over the cap.
OVER_CAP = {"MODEL_DIM": "256", "MLP_MULT": "17", "NUM_LAYER_SCHEDULE": "0:1", "MATRIX_CLIP_SIGMAS": "4"}


def test_over_cap_artifact_is_written_then_fails(tmp_path, dataset):
    # SIZE_CHECK=warn trains it anyway; a short validation split keeps its evaluation cheap.
    data = tmp_path / "data"
    data.mkdir()
    for shard in Path(dataset["DATA_PATH"]).glob("fineweb_train_*.bin"):
        shutil.copy(shard, data / shard.name)
    val = next(Path(dataset["DATA_PATH"]).glob("fineweb_val_*.bin")).read_bytes()
    header = np.frombuffer(val[:1024], dtype="<i4").copy()
    header[2] = 1025
    (data / "fineweb_val_000000.bin").write_bytes(header.tobytes() + val[1024:1024 + 2 * 1025])
    env = {**dataset, **RUN, "DATA_PATH": str(data), "ITERATIONS": "0", "WARMUP_STEPS": "0", "TTT_ENABLED": "0",
           "EVAL_STRIDE": "0", **OVER_CAP, "SIZE_CHECK": "warn"}
    result = run_script(tmp_path, env)
    assert result.returncode == 1
    out = result.stdout
    warning = re.search(r"^size_estimate int8\+zlib: total:~(\d+) cap:16000000 WARNING: over the cap by more than the "
                        r"estimate's 6% error \(SIZE_CHECK=warn\)$", out, re.M)
    assert warning and out.index(warning.group(0)) < out.index("step:0/0 val_loss")  # before training
    total = int(re.search(r"Total submission size int8\+zlib: (\d+) bytes", out).group(1))
    assert total > 16_000_000
    assert f"size_check: total:{total} cap:16000000 estimate:{warning.group(1)} OVER the cap by {total - 16_000_000} bytes" in out
    assert re.search(rf"^compliance .* artifact:{total}/16000000:OVER .* score:final_int8_zlib_roundtrip_exact", out, re.M)
    assert {p.name for p in (tmp_path / "artifacts" / "t").iterdir()} == {"final_model.int8.ptz", "final_model.pt"}
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and f"over the 16000000-byte cap by {total - 16_000_000} bytes" in error


def final_weights(path: Path) -> dict:
    import torch
    return torch.load(path, map_location="cpu", weights_only=True)


def test_resume_after_a_crash_is_bitwise_the_uninterrupted_run(tmp_path, dataset):
    # Noise QAT on a wide MLP (RNG), EMA, a depth change after the checkpoint and a step-based
    # warmdown across it: all of it must continue exactly.
    env = {**dataset, **RUN, "TTT_ENABLED": "0", "EVAL_STRIDE": "0", "ITERATIONS": "10", "VAL_LOSS_EVERY": "5",
           "NUM_LAYER_SCHEDULE": "0:1,6:2", "MODEL_DIM": "128", "MLP_MULT": "5", "MLP_LAYERS": "2", "EMA_DECAY": "0.8",
           "WARMDOWN_START_STEP": "3", "MIN_LR_FRAC": "0.1", "UNET_SKIPS": "1", "BIGRAM_TABLE_SIZE": "64", "RUN_ID": "r"}
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    straight.mkdir()
    crashed.mkdir()
    first = run_script(straight, env)
    assert first.returncode == 0, first.stderr[-2000:]
    # The same run with checkpoints, killed (SIGKILL: no handler runs) while writing the step-6
    # checkpoint, between its temporary file and the rename.
    patch = ("import os, signal\n"
             "replace = os.replace\n"
             "def dying(src, dst):\n"
             "    if str(dst).endswith('step6.pt'):\n"
             "        os.kill(os.getpid(), signal.SIGKILL)\n"
             "    replace(src, dst)\n"
             "train_gpt.os.replace = dying")
    assert run_patched(crashed, {**env, "CHECKPOINT_EVERY": "2"}, patch).returncode == -9
    assert not (crashed / "artifacts").exists()
    names = sorted(p.name for p in (crashed / "checkpoints" / "r").iterdir())
    assert names[1:] == ["step2.pt", "step4.pt"] and names[0].startswith(".step6.pt.tmp")
    resumed = run_script(crashed, {**env, "CHECKPOINT_EVERY": "2", "RESUME_FROM": "latest"})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    out = resumed.stdout
    assert re.search(r"^resumed_from:checkpoints/r/step4.pt step:4 train_time:\d+ms read:file$", out, re.M)
    assert "lr_schedule:steps warmdown:3->10 min_lr_frac:0.1" in out
    a, b = (final_weights(d / "artifacts" / "r" / "final_model.pt") for d in (straight, crashed))
    assert a.keys() == b.keys() and all(torch_equal(a[k], b[k]) for k in a)
    tail = lambda text: [l for l in text.splitlines() if re.match(r"step:([5-9]|10)/10 (train|val)_loss", l)]
    strip_time = lambda lines: [re.sub(r" train_time.*", "", l) for l in lines]
    assert strip_time(tail(first.stdout)) == strip_time(tail(out)) and len(tail(out)) == 8
    assert sorted(p.name for p in (crashed / "checkpoints" / "r").iterdir()) == ["step10.pt", "step8.pt"]  # no temp file
    # One log, as the uninterrupted run's: the lines the killed run wrote after step 4 are cut off.
    log = (crashed / "logs" / "r.txt").read_text()
    steps = lambda text: strip_time([l for l in text.splitlines() if re.match(r"step:\d+/10 (train|val)_loss", l)])
    assert steps(log) == steps((straight / "logs" / "r.txt").read_text()) and len(steps(log)) == 13
    assert log.count("class Hyperparameters") == 1 and len(re.findall("^resumed_from:", log, re.M)) == 1


def test_rows_first_used_after_a_depth_change_take_fresh_adams_first_step(tmp_path, dataset):
    """PR #1088's rule at the switch: the control rows depth 3 adds were never used at depth 1, so
    they keep their init and no Adam state until then, and their first update is lr in every
    coordinate (lr * g / |g|), as a fresh parameter's; a step count that ran on gave 0.45 lr."""
    env = {**dataset, **RUN, "TTT_ENABLED": "0", "EVAL_STRIDE": "0", "ITERATIONS": "5", "NUM_LAYER_SCHEDULE": "0:1,4:3",
           "VAL_LOSS_EVERY": "0", "WARMDOWN_ITERS": "0", "CHECKPOINT_EVERY": "1", "RUN_ID": "rows"}
    result = run_script(tmp_path, env)
    assert result.returncode == 0, result.stderr[-2000:]
    import torch
    before, after = (torch.load(tmp_path / "checkpoints" / "rows" / f"step{s}.pt", weights_only=True)["model"] for s in (4, 5))
    lr = float(TINY.get("SCALAR_LR", 0.04))
    for name in ("resid_mix", "attn_scale", "mlp_scale", "attn_norm_bias", "mlp_norm_bias"):
        fresh = before[f"controls.{name}"][1:]
        init = torch.ones_like(fresh) if "scale" in name else torch.zeros_like(fresh)
        if name == "resid_mix":
            init[:, 0] = 1.0
        assert torch.equal(fresh, init), name  # untouched by the four steps at depth 1
        step = (after[f"controls.{name}"][1:] - fresh).abs()
        # lr * g / (|g| + ADAM_EPS): lr where |g| >> 1e-8, a little less for the smallest gradients
        assert step.max() <= lr * (1 + 1e-5) and step.median() == pytest.approx(lr, rel=1e-3), (name, step.flatten()[:8])


def torch_equal(x, y) -> bool:
    import torch
    return torch.equal(x, y)


def test_checkpoint_of_another_config_is_refused(tmp_path, dataset):
    env = {**dataset, **RUN, "TTT_ENABLED": "0", "EVAL_STRIDE": "0", "ITERATIONS": "2", "CHECKPOINT_EVERY": "2",
           "VAL_LOSS_EVERY": "0", "WARMUP_STEPS": "0", "RUN_ID": "c"}
    assert run_script(tmp_path, env).returncode == 0
    ckpt = tmp_path / "checkpoints" / "c" / "step2.pt"
    other = run_script(tmp_path, {**env, "RESUME_FROM": str(ckpt), "MODEL_DIM": "64", "MLP_LAYERS": "2"})
    assert other.returncode == 1
    error = other.stderr.strip().splitlines()
    assert len(error) == 1 and f"RESUME_FROM={ckpt} was written with other settings: MLP_LAYERS=3 (now 2), MODEL_DIM=32 (now 64)" in error[0]
    assert "warmup_step" not in other.stdout and "model_params" not in other.stdout
    missing = run_script(tmp_path, {**env, "RESUME_FROM": "latest", "RUN_ID": "nothing"})
    assert missing.returncode == 1 and "RESUME_FROM=latest: no checkpoints/nothing/step*.pt" in missing.stderr


@pytest.mark.parametrize("system", ["deq", "mod_seed_lora"])
def test_pr1783_systems_run_end_to_end(tmp_path, dataset, system):
    env = {**dataset, **RUN, "TTT_ENABLED": "0", "EVAL_STRIDE": "16", "ITERATIONS": "6", "VAL_LOSS_EVERY": "0"}
    if system == "deq":
        env.update(DEQ="1", DEQ_WARMUP_STEPS="3", NUM_LAYER_SCHEDULE="0:2", DEQ_ITERS="4", EVAL_DEQ_ITERS="6",
                   NUM_STEM_BLOCKS="1", NUM_TAIL_BLOCKS="1", AUTOCAST="bf16",  # CUDA's numerics on the CPU
                   EVAL_STRIDE="32")  # bf16 is slow on a CPU: one window per sequence
    else:
        env.update(MOD_CAPACITY="0.5", SEED_LORA_RANK="4", SEED_LORA_TARGETS="all", NUM_LAYER_SCHEDULE="0:2,3:4",
                   NUM_TAIL_BLOCKS="1")
    result = run_script(tmp_path, env)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "recompiles_after_warmup:0" in out
    assert f"autocast_bf16:{system == 'deq'}" in out
    if system == "deq":
        assert "layer_schedule_advance:step:3 active_num_layers:0" in out
        assert "deq_solve_start step:3 deq_iters:4 eval_deq_iters:6 anderson_m:5 phantom_steps:4" in out
        assert len(re.findall(r"^step:[4-6]/6 train_loss:\S+ .* deq_residual:\d+\.\d+$", out, re.M)) == 3
        assert re.search(r"^deq_residual eval_deq_iters:6 residual:\d+\.\d+$", out, re.M)
    else:
        assert re.search(r"^seed_lora targets:all rank:4 matrices:22 regenerated_params:\d+ \(not stored\) adapter_params:\d+$", out, re.M)
        assert re.search(r"^mod_routing causal_val_bpb:\S+ topk_val_bpb:\S+ gap:\S+ ", out, re.M)
    assert re.search(r"^compliance .*:ok val_tokens_trained_before_scoring:0 score:final_sliding_window_exact", out, re.M)


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
    elif how == "empty":  # a header promising 0 tokens, beside the real shards
        (data / "fineweb_train_999999.bin").write_bytes(bytes(raw[:8]) + bytes(1016))
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
    "empty shard": ("empty", "fineweb_train_999999.bin holds no tokens"),
    "zero heads": ({"NUM_HEADS": "0"}, "NUM_HEADS=0 must be at least 1"),
    "run id as a path": ({"RUN_ID": "../../x"}, "RUN_ID='../../x'"),
    "vocab mismatch": ({"VOCAB_SIZE": "1024"}, "VOCAB_SIZE=1024"),
    "dim vs heads": ({"MODEL_DIM": "30"}, "MODEL_DIM=30"),
    "odd head dim": ({"MODEL_DIM": "36"}, "MODEL_DIM/NUM_HEADS"),
    "kv heads": ({"NUM_KV_HEADS": "3"}, "NUM_KV_HEADS=3"),
    "batch split": ({"TRAIN_BATCH_TOKENS": "1000"}, "TRAIN_BATCH_TOKENS=1000"),
    "stride over window": ({"EVAL_STRIDE": "33"}, "EVAL_STRIDE=33"),
    "ttt mode": ({"TTT_MODE": "sgd"}, "TTT_MODE"),
    "full ttt per doc": ({"TTT_MODE": "full", "TTT_RESET": "doc"}, "TTT_RESET=none"),
    "quant bits": ({"QUANT_BITS": "3"}, "QUANT_BITS"),
    "embed bits": ({"EMBED_BITS": "12"}, "EMBED_BITS"),
    "compressor": ({"COMPRESSOR": "gzip"}, "COMPRESSOR"),
    "qat mode": ({"QAT_MODE": "lsq"}, "QAT_MODE"),
    "qat start": ({"QAT_START_FRAC": "1.5"}, "QAT_START_FRAC"),
    "ema decay": ({"EMA_DECAY": "1"}, "EMA_DECAY"),
    "clip sigmas": ({"MATRIX_CLIP_SIGMAS": "-1"}, "MATRIX_CLIP_SIGMAS"),
    "warmdown start": ({"WARMDOWN_START_STEP": "12"}, "WARMDOWN_START_STEP=12"),
    "two warmdowns": ({"WARMDOWN_START_STEP": "4", "WARMDOWN_FRAC": "0.5"}, "WARMDOWN_FRAC"),
    "unet weights": ({"UNET_WEIGHTS": "3", "UNET_SKIPS": "1"}, "UNET_WEIGHTS=3"),
    "one bucket": ({"BIGRAM_TABLE_SIZE": "1"}, "BIGRAM_TABLE_SIZE=1"),
    "missing checkpoint": ({"RESUME_FROM": "/nonexistent/step4.pt"}, "RESUME_FROM=/nonexistent/step4.pt"),
    "deq with unet": ({"DEQ": "1", "UNET_SKIPS": "1"}, "DEQ=1"),
    "mod capacity": ({"MOD_CAPACITY": "1.5"}, "MOD_CAPACITY=1.5"),
    "phantom lambda": ({"PHANTOM_LAMBDA": "0"}, "PHANTOM_LAMBDA=0"),
    "seed lora targets": ({"SEED_LORA_RANK": "4", "SEED_LORA_TARGETS": "emb"}, "SEED_LORA_TARGETS"),
    "short validation": ({"TRAIN_SEQ_LEN": "262144", "TRAIN_BATCH_TOKENS": "2097152"}, "validation split"),
    "estimated over the cap": (OVER_CAP, "more than the estimate's 6% error"),
    "size check": ({"SIZE_CHECK": "ignore"}, "SIZE_CHECK"),
    "autocast": ({"AUTOCAST": "fp16"}, "AUTOCAST"),
    "compiled early exit": ({"DEQ": "1", "DEQ_TOL": "0.01", "TORCH_COMPILE": "1"}, "DEQ_TOL=0.01"),
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
    assert not list(tmp_path.rglob("final_model*"))


def test_old_torch_is_refused_in_one_line_before_any_work(tmp_path, dataset):
    # The script run as __main__ under a torch that reports 2.4.1.
    import os, subprocess, sys
    shim = ("import runpy, sys, torch; torch.__version__ = '2.4.1'; sys.argv = [sys.argv[1]]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", shim, str(REPO / "train_gpt.py")], cwd=tmp_path, text=True,
                            capture_output=True, env={**os.environ, **dataset, **RUN}, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["error: torch 2.4.1 is older than 2.5, the oldest this script supports: "
                                                  "pip install 'torch>=2.5'"]
    assert not (tmp_path / "logs").exists()
