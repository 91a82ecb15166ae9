"""Nothing lost, nothing run that should not run, no silent nonsense: settings, files, artifacts,
checkpoints, the wallclock cap and ranks that share no disk."""
from __future__ import annotations

import copy
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt
from conftest import REPO, SHIM, TINY, child_env, run_patched, run_script, tiny_args, tiny_model

# ---- settings -------------------------------------------------------------------------------

BAD_SETTINGS = {
    "NUM_HEADS": ["0", "-4"], "NUM_KV_HEADS": ["0"], "MLP_MULT": ["inf", "nan", "0"], "SEED": ["-1", "4294967296"],
    "BETA1": ["1", "-0.1"], "BETA2": ["1.5"], "ADAM_EPS": ["-1e-8"], "TIED_EMBED_INIT_STD": ["-0.1"],
    "LOGIT_SOFTCAP": ["nan", "0"], "MAX_WALLCLOCK_SECONDS": ["nan", "-1", "inf"], "ROPE_BASE": ["0", "-5"],
    "MATRIX_LR": ["-0.04"], "EMBED_LR": ["-1"], "HEAD_LR": ["-1"], "SCALAR_LR": ["nan"], "TTT_LR": ["-0.01"],
    "MUON_BACKEND_STEPS": ["0"], "MUON_MOMENTUM": ["1"], "VAL_BATCH_SIZE": ["0", "-8"], "TIE_EMBEDDINGS": ["2", "true"],
    "TORCH_COMPILE": ["-1"], "ITERATIONS": ["-1"], "WARMDOWN_ITERS": ["-1"], "VAL_LOSS_EVERY": ["-5"],
    "GRAD_CLIP_NORM": ["-1"], "VOCAB_SIZE": ["70000", "1"], "TRAIN_BATCH_TOKENS": ["0"], "ANDERSON_BETA": ["0", "1.5"],
    "MOD_CAPACITY": ["-0.5"], "EMA_DECAY": ["1"], "CHECKPOINT_KEEP": ["0"], "UNET_WEIGHTS": ["3"],
    "RUN_ID": ["../../x", "a/b", ".hidden", "", "x" * 129],
}


@pytest.mark.parametrize("name,value", [(n, v) for n, vs in BAD_SETTINGS.items() for v in vs])
def test_every_bad_setting_is_one_error_naming_it(name, value):
    with pytest.raises(train_gpt.RunError) as error:
        tiny_args(**{name: value}).validate()
    assert str(error.value).startswith(f"{name}=") and "\n" not in str(error.value)


def test_one_stream_of_ttt_takes_record_chunks_by_default_and_refuses_a_chunk_under_a_window():
    # One set of weights adapting over the stream (TTT_RESET=none, TTT_MODE=full's default) steps
    # after each chunk, with an all-reduce: PR #549's 32,768-token chunks by default; 256 tokens (the
    # per-document default) would mean ~242K steps on FineWeb.
    for overrides in ({"TTT_MODE": "full"}, {"TTT_RESET": "none"}):
        args = tiny_args(**overrides)
        assert (args.ttt_chunk_tokens, args.ttt_reset) == (32_768, "none")
        with pytest.raises(train_gpt.RunError) as error:
            tiny_args(**overrides, TTT_CHUNK_TOKENS="256", EVAL_SEQ_LEN="1024")
        message = str(error.value)
        assert message.startswith("TTT_CHUNK_TOKENS=256 is under EVAL_SEQ_LEN=1024") and "~242,272 on FineWeb" in message
        assert "\n" not in message
    assert (tiny_args().ttt_chunk_tokens, tiny_args().ttt_reset) == (256, "doc")


def test_off_values_and_edges_are_accepted():
    args = tiny_args(MAX_WALLCLOCK_SECONDS="0", WARMDOWN_ITERS="0", GRAD_CLIP_NORM="0", VAL_LOSS_EVERY="0",
                     ITERATIONS="0", SEED="4294967295", BETA2="0", ANDERSON_BETA="1", TIE_EMBEDDINGS="1", RUN_ID="a.b-c_1")
    assert (args.max_wallclock_seconds, args.seed, args.tie_embeddings, args.iterations) == (0.0, 2**32 - 1, True, 0)


def test_lookalike_variables_are_warned_about_with_the_closest_name():
    env = {"NUM_LAYERS_SCHEDULE": "0:9", "TTT_ENABLE": "1", "DEQ_ITER": "3", "EVAL_FOO": "1", "ITERATION": "5",
           # the environment torchrun, CUDA and the shell set is not ours and not warned about
           "PATH": "/bin", "HOME": "/root", "CUDA_VISIBLE_DEVICES": "0", "OMP_NUM_THREADS": "1", "RANK": "0",
           "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "x", "MASTER_PORT": "1",
           "TORCHELASTIC_RUN_ID": "x", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_DEBUG": "INFO", "MAX_JOBS": "4",
           "PYTHONHASHSEED": "0", "TORCHINDUCTOR_CACHE_DIR": "/tmp", "HF_HOME": "/tmp", "MODEL_DIM": "64"}
    warnings = train_gpt.setting_warnings(env)
    closest = dict(re.fullmatch(r"WARNING: (\w+) is not a setting of this script and is ignored \(closest: (\w+)\)", w).groups()
                   for w in warnings)
    assert closest == {"NUM_LAYERS_SCHEDULE": "NUM_LAYER_SCHEDULE", "TTT_ENABLE": "TTT_ENABLED", "DEQ_ITER": "DEQ_ITERS",
                       "EVAL_FOO": closest.get("EVAL_FOO"), "ITERATION": "ITERATIONS"}
    assert closest["EVAL_FOO"] in train_gpt.known_settings()


def test_golf_warns_about_a_lookalike_before_running(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "bench"))
    import golf
    script = tmp_path / "noop.py"
    script.write_text("")
    with pytest.raises(SystemExit, match="did not finish"):
        golf.main(["--config", "typo NUM_LAYERS_SCHEDULE=0:9", "--out", str(tmp_path / "out"), "--script", str(script)])
    assert "typo: WARNING: NUM_LAYERS_SCHEDULE is not a setting of this script and is ignored " \
           "(closest: NUM_LAYER_SCHEDULE)" in capsys.readouterr().out


# ---- files written atomically -----------------------------------------------------------------

def test_write_atomic_syncs_before_the_rename_and_cleans_up_after_a_failure(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(train_gpt.os, "fsync", lambda fd: events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(train_gpt.os, "replace", lambda a, b: events.append(("replace", None)) or real_replace(a, b))
    train_gpt.write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert events == [("fsync", False), ("replace", None), ("fsync", True)]  # the file, the rename, the folder

    def full_disk(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(train_gpt.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        train_gpt.write_atomic(target, b"newer")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


# ---- artifacts --------------------------------------------------------------------------------

def saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize("compressor", train_gpt.COMPRESSORS)
def test_decompression_is_bounded_and_complete(tmp_path, compressor):
    bomb = train_gpt.compress(bytes(64 << 20), compressor)  # 64 MiB of zeros in a few KB
    with pytest.raises(train_gpt.RunError, match="more than 1048576 bytes"):
        train_gpt.decompress(bomb, limit=1 << 20)
    data = os.urandom(4096)
    packed = train_gpt.compress(data, compressor)
    assert train_gpt.decompress(packed) == data
    with pytest.raises(train_gpt.RunError, match="truncated"):
        train_gpt.decompress(packed[: len(packed) // 2])


def test_an_artifact_bomb_is_refused_without_inflating_it(tmp_path, monkeypatch):
    monkeypatch.setattr(train_gpt, "MAX_DECOMPRESSED_BYTES", 1 << 20)
    path = tmp_path / "bomb.ptz"
    path.write_bytes(zlib.compress(bytes(256 << 20), 9))
    with pytest.raises(train_gpt.RunError, match="bomb.ptz is not a loadable artifact: RunError: decompresses to more"):
        train_gpt.load_artifact(path)


def test_crafted_artifacts_are_refused_by_the_schema(tmp_path):
    args = tiny_args(MLP_MULT="64")  # an MLP large enough to be quantized
    good = train_gpt.quantize_state_dict(train_gpt.GPT(args).state_dict(), args)
    name = next(iter(good["quantized"]))
    crafted = {
        "no_dtype": lambda o: o["dtypes"].pop(name),
        "bits_tensor": lambda o: o["bits"].__setitem__(name, torch.tensor(8)),
        "bits_float": lambda o: o["bits"].__setitem__(name, 8.0),
        "extra_step": lambda o: o["steps"].__setitem__("ghost", torch.ones(2, 1, dtype=torch.uint8)),
        "float_step": lambda o: o["steps"].__setitem__(name, train_gpt.from_byte_planes(o["steps"][name])),
        "raw_passthrough": lambda o: o["passthrough"].__setitem__("controls.mlp_scale", torch.ones(2, 32)),
        "missing_bits": lambda o: o["bits"].pop(name),
    }
    assert train_gpt.check_schema(good) is None
    for label, edit in crafted.items():
        obj = copy.deepcopy(good)
        edit(obj)
        assert train_gpt.check_schema(obj) is not None, label
        path = tmp_path / f"{label}.ptz"
        path.write_bytes(zlib.compress(saved(obj)))
        with pytest.raises(train_gpt.RunError, match=f"{label}.ptz: "):
            train_gpt.load_artifact(path)


def test_weights_of_other_settings_are_refused_naming_the_source(tmp_path):
    state = tiny_model(MODEL_DIM="64").state_dict()
    with pytest.raises(train_gpt.RunError, match=r"^x.ptz does not fit the model of these settings: size mismatch"):
        train_gpt.load_weights(tiny_model(), state, "x.ptz")


def test_seed_lora_of_another_width_is_a_shape_error_not_a_checksum_error():
    lora = dict(SEED_LORA_RANK="4", SEED_LORA_TARGETS="all")
    state = tiny_model(MODEL_DIM="64", **lora).state_dict()
    with pytest.raises(train_gpt.RunError) as error:
        train_gpt.load_weights(tiny_model(**lora), state, "a.ptz")
    assert "size mismatch" in str(error.value) and "checksum" not in str(error.value)


# ---- shards -----------------------------------------------------------------------------------

def shard(path: Path, tokens) -> Path:
    header = np.zeros(256, dtype="<i4")
    header[:3] = 20240520, 1, len(tokens)
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())
    return path


def test_empty_and_out_of_vocab_shards_are_refused_naming_the_file(tmp_path):
    shard(tmp_path / "fineweb_train_000000.bin", np.arange(100) % 50)
    shard(tmp_path / "fineweb_train_000001.bin", [])
    with pytest.raises(train_gpt.RunError, match="fineweb_train_000001.bin holds no tokens"):
        train_gpt.train_shard_files(str(tmp_path / "fineweb_train_*.bin"))
    (tmp_path / "fineweb_train_000001.bin").unlink()
    shard(tmp_path / "fineweb_train_000002.bin", [3, 4, 512, 5])
    files = train_gpt.train_shard_files(str(tmp_path / "fineweb_train_*.bin"))
    train_gpt.check_token_ids(files, 513)()
    with pytest.raises(train_gpt.RunError, match="fineweb_train_000002.bin holds token id 512, not below VOCAB_SIZE=512"):
        train_gpt.check_token_ids(files, 512)()
    shard(tmp_path / "fineweb_val_000000.bin", [1, 2, 3, 700, 4])
    with pytest.raises(train_gpt.RunError, match="fineweb_val_000000.bin holds token id 700"):
        train_gpt.load_validation_tokens(str(tmp_path / "fineweb_val_*.bin"), 2, 512)


def out_of_vocab_copy(tmp_path: Path, dataset: dict) -> tuple[Path, Path]:
    """A copy of the dataset whose last training shard ends with token id 600 (VOCAB_SIZE is 512)."""
    data = tmp_path / "data"
    data.mkdir()
    for f in Path(dataset["DATA_PATH"]).glob("fineweb_*.bin"):
        (data / f.name).write_bytes(f.read_bytes())
    bad = sorted(data.glob("fineweb_train_*.bin"))[-1]
    tokens = np.fromfile(bad, dtype="<u2", offset=1024)
    tokens[-1] = 600
    shard(bad, tokens)
    return data, bad


def test_out_of_vocab_training_shard_stops_the_run_before_training(tmp_path, dataset):
    data, bad = out_of_vocab_copy(tmp_path, dataset)
    result = run_script(tmp_path, {**dataset, **TINY, "DATA_PATH": str(data), "ITERATIONS": "2", "RUN_ID": "v"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: {bad} holds token id 600, not below VOCAB_SIZE=512: the shards "
                                                  "and the tokenizer do not match"]
    assert "train_loss" not in result.stdout and not (tmp_path / "artifacts").exists()


def test_only_each_nodes_local_rank_0_reads_the_training_shards_and_every_rank_hears_the_verdict(tmp_path, dataset):
    data, bad = out_of_vocab_copy(tmp_path, dataset)
    patch = ("import os\n"
             "scan = train_gpt.check_shard_ids\n"
             "def counted(file, vocab_size):\n"
             "    if 'train' in file.name:\n"
             "        with open(f'scans{os.environ[\"LOCAL_RANK\"]}.txt', 'a') as f:\n"
             "            f.write(file.name + '\\n')\n"
             "    scan(file, vocab_size)\n"
             "train_gpt.check_shard_ids = counted")
    result = run_patched(tmp_path, {**dataset, **TINY, "DATA_PATH": str(data), "ITERATIONS": "2", "RUN_ID": "v"}, patch,
                         nproc=2)
    assert result.returncode != 0
    error = f"error: {bad} holds token id 600, not below VOCAB_SIZE=512: the shards and the tokenizer do not match"
    assert result.stderr.count(error) == 2, result.stderr[-3000:]  # both ranks stop with rank 0's verdict
    assert sorted((tmp_path / "scans0.txt").read_text().split()) == sorted(p.name for p in data.glob("fineweb_train_*.bin"))
    assert not (tmp_path / "scans1.txt").exists()
    assert "train_loss" not in result.stdout and not (tmp_path / "artifacts").exists()


# ---- scores -----------------------------------------------------------------------------------

def test_a_nonfinite_training_loss_stops_the_run_without_an_artifact(tmp_path, dataset):
    patch = ("step = train_gpt.train_step\n"
             "train_gpt.train_step = lambda *a, **k: (lambda loss, reports: (loss * float('nan'), reports))(*step(*a, **k))")
    result = run_patched(tmp_path, {**dataset, **TINY, "ITERATIONS": "4", "RUN_ID": "n"}, patch)
    assert result.returncode == 1
    assert "training loss became NaN/inf by step 1" in result.stderr.strip().splitlines()[-1]
    assert not [l for l in result.stdout.splitlines() if l.startswith("final_")] and not (tmp_path / "artifacts").exists()


def test_a_nan_validation_score_stops_the_run_without_an_artifact(tmp_path, dataset):
    patch = ("windows = train_gpt.eval_windows\n"
             "train_gpt.eval_windows = lambda *a, **k: windows(*a, **k) * float('nan')")
    result = run_patched(tmp_path, {**dataset, **TINY, "ITERATIONS": "2", "VAL_LOSS_EVERY": "0", "RUN_ID": "n"}, patch)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: the validation loss is nan")
    assert "compliance" not in result.stdout and not (tmp_path / "artifacts").exists()


def test_a_run_whose_steps_slow_down_stops_within_a_step_of_the_cap(tmp_path, dataset):
    # On a virtual clock the script reads, 40 steps of 0.05 s, then steps of 0.8 s: syncs planned
    # from the fast steps alone would overshoot the 6 s cap by several slow steps.
    patch = ("import types\n"
             "now, step = [0.0], train_gpt.train_step\n"
             "train_gpt.time = types.SimpleNamespace(perf_counter=lambda: now[0])\n"
             "def timed(*a, **k):\n"
             "    now[0] += 0.05 if now[0] < 2.0 else 0.8\n"
             "    return step(*a, **k)\n"
             "train_gpt.train_step = timed")
    env = {**dataset, **TINY, "MODEL_DIM": "16", "NUM_HEADS": "2", "NUM_KV_HEADS": "1", "ITERATIONS": "100000",
           "MAX_WALLCLOCK_SECONDS": "6", "VAL_LOSS_EVERY": "0", "TRAIN_LOG_EVERY": "0", "RUN_ID": "slow",
           "EVAL_STRIDE": "0", "TRAIN_BATCH_TOKENS": "256"}
    result = run_patched(tmp_path, env, patch)
    assert result.returncode == 0, result.stderr[-2000:]
    stop = re.search(r"^stopping_early: wallclock_cap train_time:(\d+)ms step:(\d+)/100000$", result.stdout, re.M)
    assert stop and 6000 - 800 < int(stop.group(1)) <= 6000 and int(stop.group(2)) == 40 + 5, result.stdout[-1500:]


# ---- run outputs and checkpoints --------------------------------------------------------------

def fake_checkpoint(path: Path, args, code: str, step: int, log_bytes: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": train_gpt.CHECKPOINT_FORMAT, "config": train_gpt.checkpoint_config(args), "world_size": 1,
                "code_sha256": train_gpt.sha256(code), "step": step, "run_id": args.run_id, "log_bytes": log_bytes}, path)


def test_a_new_run_moves_an_earlier_runs_log_and_artifacts_aside(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for k in (1, 2):
        Path("logs").mkdir(exist_ok=True)
        Path("logs/r.txt").write_text(f"run {k}\n")
        Path("artifacts/r").mkdir(parents=True)
        Path("artifacts/r/final_model.int8.ptz").write_text(f"artifact {k}")
        assert train_gpt.start_run(tiny_args(RUN_ID="r"), 1, "code") == (None, None)
        assert not Path("logs/r.txt").exists() and not Path("artifacts/r").exists()
    assert Path("logs/r.txt.~1~").read_text() == "run 1\n" and Path("logs/r.txt.~2~").read_text() == "run 2\n"
    assert Path("artifacts/r.~2~/final_model.int8.ptz").read_text() == "artifact 2"
    train_gpt.Logger("r", True)("one run")
    assert Path("logs/r.txt").read_text() == "one run\n"


def test_checkpoints_of_another_run_or_later_steps_are_refused_up_front(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = tiny_args(RUN_ID="r", CHECKPOINT_EVERY="2")
    for step in (2, 4, 6):
        fake_checkpoint(Path(f"checkpoints/r/step{step}.pt"), args, "code", step)
    Path("checkpoints/r/step10_best.pt").write_text("a user's copy")  # not a checkpoint name
    with pytest.raises(train_gpt.RunError, match=r"checkpoints/r holds checkpoints \(step2.pt, step4.pt, step6.pt\) of "
                                                 "another run: continue it with RESUME_FROM=latest"):
        train_gpt.start_run(args, 1, "code")
    with pytest.raises(train_gpt.RunError, match=r"holds checkpoints \(step6.pt\) later than RESUME_FROM=checkpoints/r/"
                                                 r"step4.pt \(step 4\): move them away"):
        train_gpt.start_run(tiny_args(RUN_ID="r", CHECKPOINT_EVERY="2", RESUME_FROM="checkpoints/r/step4.pt"), 1, "code")
    ckpt, _ = train_gpt.start_run(tiny_args(RUN_ID="r", RESUME_FROM="latest"), 1, "code")
    assert ckpt["step"] == 6 and ckpt["path"] == "checkpoints/r/step6.pt"
    # Pruning skips the stray name and never deletes the checkpoint just written.
    train_gpt.save_checkpoint(Path("checkpoints/r"), 8, {"w": torch.ones(1)}, keep=1)
    assert sorted(p.name for p in Path("checkpoints/r").iterdir()) == ["step10_best.pt", "step8.pt"]


def test_resume_notices_a_changed_script_and_ignores_eval_settings_and_path_spelling(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    args = tiny_args(RUN_ID="r", DATA_PATH=str(data))
    fake_checkpoint(Path("checkpoints/r/step4.pt"), args, "code", 4)
    same = tiny_args(RUN_ID="r", RESUME_FROM="latest", DATA_PATH="./data/../data", EVAL_STRIDE="16", TTT_ENABLED="1",
                     VAL_LOSS_EVERY="3", TRAIN_LOG_EVERY="1", EVAL_DEQ_ITERS="20")
    assert train_gpt.start_run(same, 1, "code")[0]["step"] == 4
    with pytest.raises(train_gpt.RunError, match="was written by another version of this script"):
        train_gpt.start_run(same, 1, "code, edited")
    with pytest.raises(train_gpt.RunError, match=r"other settings: MATRIX_LR=0.04 \(now 0.05\)"):
        train_gpt.start_run(tiny_args(RUN_ID="r", RESUME_FROM="latest", DATA_PATH=str(data), MATRIX_LR="0.05"), 1, "code")


def test_a_resumed_run_continues_its_own_log_from_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("logs").mkdir()
    Path("logs/r.txt").write_text("header\nstep:4\nstep:5 (lost in the crash)\n")
    args = tiny_args(RUN_ID="r")
    fake_checkpoint(Path("checkpoints/r/step4.pt"), args, "code", 4, log_bytes=len("header\nstep:4\n"))
    ckpt, keep = train_gpt.start_run(tiny_args(RUN_ID="r", RESUME_FROM="latest"), 1, "code")
    train_gpt.Logger("r", True, keep)("resumed")
    assert Path("logs/r.txt").read_text() == "header\nstep:4\nresumed\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_nodes(tmp_path: Path, env: dict, rank0_patch: str = "", patch: str = "",
                 folders: tuple[str, str] = ("node0", "node1")) -> list[subprocess.CompletedProcess]:
    """Two ranks as two single-process "nodes", each in its own folder (no shared disk but the data),
    or both in one (`folders` naming the same one: a shared disk). `patch` runs on both ranks."""
    base = child_env({"OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                      "WORLD_SIZE": "2", "LOCAL_RANK": "0", **env})
    procs = []
    for rank in (0, 1):
        folder = tmp_path / folders[rank]
        folder.mkdir(exist_ok=True)
        code = SHIM.format(repo=str(REPO), patch=patch + "\n" + (rank0_patch if rank == 0 else ""))
        procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=folder, text=True, env={**base, "RANK": str(rank)},
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


def test_two_nodes_without_a_shared_disk_train_export_and_resume(tmp_path, dataset):
    env = {**dataset, **TINY, "ITERATIONS": "4", "CHECKPOINT_EVERY": "2", "VAL_LOSS_EVERY": "0", "EVAL_STRIDE": "0",
           "RUN_ID": "nodes"}
    first = launch_nodes(tmp_path, env)
    assert [r.returncode for r in first] == [0, 0], (first[0].stderr[-1500:], first[1].stderr[-1500:])
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    assert (node0 / "artifacts" / "nodes" / "final_model.int8.ptz").is_file()
    assert sorted(p.name for p in (node0 / "checkpoints" / "nodes").iterdir()) == ["step2.pt", "step4.pt"]
    assert list(node1.iterdir()) == []  # rank 1 wrote nothing and read nothing rank 0 wrote
    assert "final_int8_zlib_roundtrip_exact" in first[0].stdout
    # Resumed: only node 0 has the checkpoint. Its export then fails; rank 1 hears of it and exits too.
    patch = ("def full_disk(*a, **k):\n"
             "    raise OSError(28, 'No space left on device')\n"
             "train_gpt.serialize_artifact = full_disk")
    second = launch_nodes(tmp_path, {**env, "RESUME_FROM": "latest"}, patch)
    assert [r.returncode for r in second] == [1, 1], (second[0].stderr[-1500:], second[1].stderr[-1500:])
    assert "resumed_from:checkpoints/nodes/step4.pt step:4" in second[0].stdout
    assert re.search(r"^resumed_from:\S+ step:4 train_time:\d+ms read:broadcast$", second[0].stdout, re.M)
    assert second[1].stderr.strip().splitlines()[-1] == "error: rank 0 failed: OSError: [Errno 28] No space left on device"
    assert list(node1.iterdir()) == []


def test_two_ranks_killed_after_a_checkpoint_resume_bitwise_as_the_uninterrupted_run(tmp_path, dataset):
    """Every rank's optimizer state survives: Muon orthogonalizes each matrix on one rank only, and
    a resumed rank that had lost its momentum would take other steps. The checkpoint reaches rank 1
    from its file on a shared disk and, without one, by broadcast; both end where the straight run
    does, bitwise, across the depth change at step 4."""
    env = {**dataset, **TINY, "ITERATIONS": "8", "VAL_LOSS_EVERY": "0", "EVAL_STRIDE": "0", "MAX_WALLCLOCK_SECONDS": "0",
           "RUN_ID": "r"}
    straight = launch_nodes(tmp_path, env, folders=("straight", "straight"))
    assert [r.returncode for r in straight] == [0, 0], straight[0].stderr[-1500:] + straight[1].stderr[-1500:]
    dying = ("import os, signal\n"
             "step = train_gpt.Trainer.train_one_step\n"
             "def dying(self):\n"
             "    if self.step == 6:  # both ranks, two steps after the step-4 checkpoint\n"
             "        os.kill(os.getpid(), signal.SIGKILL)\n"
             "    return step(self)\n"
             "train_gpt.Trainer.train_one_step = dying")
    crashed = launch_nodes(tmp_path, {**env, "CHECKPOINT_EVERY": "4"}, patch=dying)
    assert [r.returncode for r in crashed] == [-9, -9], crashed[0].stderr[-1500:]
    shutil.copytree(tmp_path / "node0", tmp_path / "shared")
    expected = torch.load(tmp_path / "straight" / "artifacts" / "r" / "final_model.pt", weights_only=True)
    for folders, read in ((("node0", "node1"), "broadcast"), (("shared", "shared"), "file")):
        resumed = launch_nodes(tmp_path, {**env, "CHECKPOINT_EVERY": "4", "RESUME_FROM": "latest"}, folders=folders)
        assert [r.returncode for r in resumed] == [0, 0], resumed[0].stderr[-1500:] + resumed[1].stderr[-1500:]
        assert re.search(rf"^resumed_from:checkpoints/r/step4.pt step:4 train_time:\d+ms read:{read}$", resumed[0].stdout, re.M)
        got = torch.load(tmp_path / folders[0] / "artifacts" / "r" / "final_model.pt", weights_only=True)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in got), [k for k in got if not torch.equal(got[k], expected[k])]
