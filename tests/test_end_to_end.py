"""The real script end to end, through its log lines: one process and two gloo ranks, systems
together, bad input refused in one line; and the script stripped: each system alone builds its
model, and the core alone computes what the full script computes."""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt
from conftest import OVER_CAP, REPO, RUN, TINY, child_env, run_script, settings_read

pytestmark = pytest.mark.slow


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
        assert "layer_schedule_advance:step:3 active_num_layers:2\nlayer_plan depth:2 layers:3 stem.0@0 block@1:solve tail.0@2" in out
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


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SYSTEM_SETTINGS = {"hash_embed": {"BIGRAM_TABLE_SIZE": "64"}, "seed_lora": {"SEED_LORA_RANK": "2"},
                   "mod": {"MOD_CAPACITY": "0.5"}, "deq": {"DEQ": "1"}, "ttt": {"TTT_ENABLED": "1"},
                   "ema": {"EMA_DECAY": "0.5"}, "checkpoints": {"CHECKPOINT_EVERY": "2"},
                   "unet": {"UNET_SKIPS": "1"}, "warmdown_steps": {"WARMDOWN_FRAC": "0.5"}, "gptq": {"QUANT_METHOD": "gptq"},
                   "size_guard": {"SIZE_CHECK": "warn"}, "input_checks": {},
                   "record_block": {"XSA_LAST_N": "1", "LN_SCALE": "1", "MLP_NEGATIVE_SLOPE": "0.5"},
                   "record_optim": {"MUON_ROW_NORMALIZE": "1", "MUON_WD": "0.1"}, "compressors": {},
                   "shuffled_data": {"TRAIN_SHUFFLE": "1"}}


def test_every_system_strips_alone_to_a_script_that_builds_its_model(tmp_path):
    listed = subprocess.run([sys.executable, str(REPO / "records" / "submission.py"), "strip", str(REPO / "train_gpt.py"),
                             "--list"], capture_output=True, text=True, check=True).stdout
    assert set(re.findall(r"^(\w+): \d+ blocks?", listed, re.M)) == set(SYSTEM_SETTINGS)
    for system, settings in SYSTEM_SETTINGS.items():
        out = tmp_path / f"{system}.py"
        subprocess.run([sys.executable, str(REPO / "records" / "submission.py"), "strip", str(REPO / "train_gpt.py"),
                        "-o", str(out), "--keep", system], check=True, capture_output=True)
        stripped = load(out, f"stripped_{system}")
        args = stripped.Hyperparameters({**TINY, **settings})
        args.validate()
        read = settings_read(stripped)
        assert set(settings) <= read
        assert not (read - train_gpt.known_settings())
        others = {k for s, kv in SYSTEM_SETTINGS.items() if s != system for k in kv}
        assert not others & read, system  # the other systems' settings are gone
        model = stripped.GPT(args)
        stripped.param_roles(model)  # every parameter has its one role
        x = torch.randint(0, 512, (2, 32))
        for stage in stripped.run_stages(args):
            assert model(x, x, stage.plan)[0].shape == x.shape


def final_lines(stdout: str) -> list[str]:
    variable = re.compile(r" (?:train_time|step_avg|eval_time|tokens_per_s|write_time):\S+| \(code:\d+ bytes\)"
                          r"|\(final_\S+:\d+ms.*?\) |code bytes:.*|artifact:\d+/")
    kept = re.compile(r"^(step:\d+/\d+ |final_|quant_gap |layer_plan |compliance |Serialized model |train_summary )")
    return [variable.sub("", line) for line in stdout.splitlines() if kept.match(line)]


def test_the_stripped_core_computes_what_the_full_script_computes(tmp_path, dataset):
    core = tmp_path / "core.py"
    subprocess.run([sys.executable, str(REPO / "records" / "submission.py"), "strip", str(REPO / "train_gpt.py"),
                    "-o", str(core)], check=True, capture_output=True)
    assert len(core.read_text().splitlines()) < len((REPO / "train_gpt.py").read_text().splitlines()) - 500
    env = {**dataset, **TINY, "ITERATIONS": "4", "NUM_LAYER_SCHEDULE": "0:1,2:2", "VAL_LOSS_EVERY": "2",
           "TRAIN_LOG_EVERY": "1", "EVAL_STRIDE": "16", "SEED": "3", "RUN_ID": "same",
           "MAX_WALLCLOCK_SECONDS": "0"}  # the wallclock warmdown's LR depends on measured step times
    outs = []
    for script in (REPO / "train_gpt.py", core):
        run_dir = tmp_path / script.stem
        run_dir.mkdir()
        result = subprocess.run([sys.executable, str(script)], cwd=run_dir, env=child_env({"OMP_NUM_THREADS": "2", **env}),
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        outs.append(final_lines(result.stdout))
    full, stripped = outs
    assert any(line.startswith("final_sliding_window_exact") for line in full)
    assert [line for line in full if line.startswith("layer_plan")] == ["layer_plan depth:1 layers:1 block@0",
                                                                         "layer_plan depth:2 layers:2 block@0 block@1"]
    assert stripped == full
