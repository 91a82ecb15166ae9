"""input_checks: deeper checks of what others made: setting look-alikes, token ids beyond the
vocabulary (read by one rank per node), the artifact's schema, an old torch."""
from __future__ import annotations

import copy
import difflib
import io
import os
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt
from conftest import REPO, RUN, TINY, run_patched, run_script, tiny_args


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
    # EVAL_FOO is close to no setting (it is warned for a prefix several share); the nearest is named all the same.
    nearness = lambda name: difflib.SequenceMatcher(None, "EVAL_FOO", name).ratio()
    assert nearness(closest.pop("EVAL_FOO")) == max(map(nearness, train_gpt.known_settings()))
    assert closest == {"NUM_LAYERS_SCHEDULE": "NUM_LAYER_SCHEDULE", "TTT_ENABLE": "TTT_ENABLED", "DEQ_ITER": "DEQ_ITERS",
                       "ITERATION": "ITERATIONS"}


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_artifact_with_code_or_foreign_format_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = train_gpt.quantize_state_dict({"w": torch.randn(300, 300), "b": torch.randn(4)}, tiny_args())
    bad_codes = {**good, "quantized": {"w": good["quantized"]["w"].clone()}}
    bad_codes["quantized"]["w"][0, 0] = -128  # outside [-127, 127]
    wrong_bits = {**good, "bits": {"w": 6}}  # int8 codes labelled int6
    short_steps = {**good, "steps": {"w": good["steps"]["w"][:, :10]}}
    cases = (("evil.ptz", {"__quant_format__": train_gpt.QUANT_FORMAT, "x": Evil()}, "not a loadable"),
             ("foreign.ptz", {"weights": torch.zeros(3)}, "not a per_row_v3 artifact"),
             ("old.ptz", {**good, "__quant_format__": "int8_per_row_v1"}, "not a per_row_v3 artifact"),
             ("extra.ptz", {**good, "extra": {}}, "exactly the entries"),
             ("codes.ptz", bad_codes, "exceed the int8 range"),
             ("bits.ptz", wrong_bits, "exceed the int6 range"),
             ("steps.ptz", short_steps, "do not fit together"))
    for name, obj, why in cases:
        buf = io.BytesIO()
        torch.save(obj, buf)
        (tmp_path / name).write_bytes(zlib.compress(buf.getvalue()))
        with pytest.raises(train_gpt.RunError, match=f"{name}.*{why}"):
            train_gpt.load_artifact(str(tmp_path / name))
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "junk.ptz").write_bytes(b"not zlib")
    with pytest.raises(train_gpt.RunError, match="junk.ptz"):
        train_gpt.load_artifact(str(tmp_path / "junk.ptz"))


def saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


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


def shard(path: Path, tokens) -> Path:
    header = np.zeros(256, dtype="<i4")
    header[:3] = 20240520, 1, len(tokens)
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())
    return path


def test_empty_and_out_of_vocab_shards_are_refused_naming_the_file(tmp_path, trained_tokenizer):
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
        train_gpt.load_inputs(tiny_args(DATA_PATH=str(tmp_path), TOKENIZER_PATH=str(trained_tokenizer)), torch.device("cpu"))


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


@pytest.mark.slow
def test_out_of_vocab_training_shard_stops_the_run_before_training(tmp_path, dataset):
    data, bad = out_of_vocab_copy(tmp_path, dataset)
    result = run_script(tmp_path, {**dataset, **TINY, "DATA_PATH": str(data), "ITERATIONS": "2", "RUN_ID": "v"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: {bad} holds token id 600, not below VOCAB_SIZE=512: the shards "
                                                  "and the tokenizer do not match"]
    assert "train_loss" not in result.stdout and not (tmp_path / "artifacts").exists()


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.parametrize("compressor", sorted(train_gpt.COMPRESSORS))
def test_a_stream_is_checked_bounded_and_complete_before_it_is_inflated(compressor):
    bomb = train_gpt.COMPRESSORS[compressor].compress(bytes(64 << 20))  # 64 MiB of zeros in a few KB
    with pytest.raises(train_gpt.RunError, match="more than 1048576 bytes"):
        train_gpt.check_stream("x", bomb, limit=1 << 20)
    packed = train_gpt.COMPRESSORS[compressor].compress(os.urandom(4096))
    train_gpt.check_stream("x", packed, 1 << 20)
    with pytest.raises(train_gpt.RunError, match="truncated"):
        train_gpt.check_stream("x", packed[: len(packed) // 2], 1 << 20)


def test_an_artifact_bomb_is_refused_without_inflating_it(tmp_path, monkeypatch):
    monkeypatch.setattr(train_gpt, "MAX_DECOMPRESSED_BYTES", 1 << 20)
    monkeypatch.setattr(train_gpt, "decompress", lambda data: pytest.fail("inflated before the check"))
    path = tmp_path / "bomb.ptz"
    path.write_bytes(zlib.compress(bytes(256 << 20), 9))
    with pytest.raises(train_gpt.RunError, match="bomb.ptz is not a loadable artifact: RunError: decompresses to more"):
        train_gpt.load_artifact(path)
