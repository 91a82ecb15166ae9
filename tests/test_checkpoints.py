"""checkpoints: a run resumed after a crash continues exactly (bitwise, one rank or two, with or
without a shared disk); checkpoints of another run, another version of the script or other
settings are refused up front; writes are atomic and pruned to CHECKPOINT_KEEP."""
from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_gpt
from conftest import REPO, RUN, SHIM, TINY, child_env, run_patched, run_script, tiny_args


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    directory = tmp_path / "checkpoints" / "run"
    train_gpt.save_checkpoint(directory, 2, {"w": torch.ones(3)}, keep=2)

    def killed(src, dst):  # the process dies after writing the temp file, before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(train_gpt.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        train_gpt.save_checkpoint(directory, 4, {"w": torch.zeros(3)}, keep=2)
    monkeypatch.undo()
    assert [p.name for p in directory.glob("step*.pt")] == ["step2.pt"]  # the temp file is not a checkpoint
    args = tiny_args(RESUME_FROM="latest", RUN_ID="run")
    monkeypatch.chdir(tmp_path)
    assert train_gpt.resolve_resume(args) == Path("checkpoints/run/step2.pt")
    assert torch.equal(torch.load(directory / "step2.pt", weights_only=True)["w"], torch.ones(3))
    for step in (4, 6, 8):
        train_gpt.save_checkpoint(directory, step, {"w": torch.full((3,), float(step))}, keep=2)
    assert sorted(p.name for p in directory.glob("step*.pt")) == ["step6.pt", "step8.pt"]
    assert train_gpt.resolve_resume(args) == Path("checkpoints/run/step8.pt")


@pytest.mark.parametrize("keep", [1, 2, 3, 5, 9])
def test_checkpoint_keep_keeps_the_newest_keep_and_never_more_than_written(tmp_path, keep):
    # CHECKPOINT_EVERY=5 ITERATIONS=20: four checkpoints written, the newest `keep` of them kept.
    directory = tmp_path / "checkpoints" / "run"
    written = []
    for step in (5, 10, 15, 20):
        train_gpt.save_checkpoint(directory, step, {"w": torch.full((1,), float(step))}, keep=keep)
        written.append(f"step{step}.pt")
        assert sorted(p.name for p in directory.glob("step*.pt")) == sorted(written[-keep:])


def fake_checkpoint(path: Path, args, code: str, step: int, log_bytes: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": train_gpt.CHECKPOINT_FORMAT, "config": train_gpt.checkpoint_config(args), "world_size": 1,
                "code_sha256": train_gpt.sha256(code), "step": step, "run_id": args.run_id, "log_bytes": log_bytes}, path)


def test_checkpoints_of_another_run_or_later_steps_are_refused_up_front(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = tiny_args(RUN_ID="r", CHECKPOINT_EVERY="2")
    for step in (2, 4, 6):
        fake_checkpoint(Path(f"checkpoints/r/step{step}.pt"), args, "code", step)
    Path("checkpoints/r/step10_best.pt").write_text("a user's copy")  # not a checkpoint name
    with pytest.raises(train_gpt.RunError, match=r"checkpoints/r holds checkpoints \(step2.pt, step4.pt, step6.pt\) of "
                                                 "another run: continue it with RESUME_FROM=latest"):
        train_gpt.resume_checkpoint(args, 1, "code")
    with pytest.raises(train_gpt.RunError, match=r"holds checkpoints \(step6.pt\) later than RESUME_FROM=checkpoints/r/"
                                                 r"step4.pt \(step 4\): move them away"):
        train_gpt.resume_checkpoint(tiny_args(RUN_ID="r", CHECKPOINT_EVERY="2", RESUME_FROM="checkpoints/r/step4.pt"), 1, "code")
    ckpt, _ = train_gpt.resume_checkpoint(tiny_args(RUN_ID="r", RESUME_FROM="latest"), 1, "code")
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
    assert train_gpt.resume_checkpoint(same, 1, "code")[0]["step"] == 4
    with pytest.raises(train_gpt.RunError, match="was written by another version of this script"):
        train_gpt.resume_checkpoint(same, 1, "code, edited")
    with pytest.raises(train_gpt.RunError, match=r"other settings: MATRIX_LR=0.04 \(now 0.05\)"):
        train_gpt.resume_checkpoint(tiny_args(RUN_ID="r", RESUME_FROM="latest", DATA_PATH=str(data), MATRIX_LR="0.05"), 1, "code")


def test_a_resumed_run_continues_its_own_log_from_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("logs").mkdir()
    Path("logs/r.txt").write_text("header\nstep:4\nstep:5 (lost in the crash)\n")
    args = tiny_args(RUN_ID="r")
    fake_checkpoint(Path("checkpoints/r/step4.pt"), args, "code", 4, log_bytes=len("header\nstep:4\n"))
    ckpt, keep = train_gpt.resume_checkpoint(tiny_args(RUN_ID="r", RESUME_FROM="latest"), 1, "code")
    train_gpt.Logger("r", True, keep)("resumed")
    assert Path("logs/r.txt").read_text() == "header\nstep:4\nresumed\n"


def final_weights(path: Path) -> dict:
    import torch
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_resume_after_a_crash_is_bitwise_the_uninterrupted_run(tmp_path, dataset):
    # Noise QAT on a wide MLP (RNG), EMA, a depth change after the checkpoint, a step-based warmdown
    # across it and shuffled training sequences: all of it must continue exactly.
    env = {**dataset, **RUN, "TTT_ENABLED": "0", "EVAL_STRIDE": "0", "ITERATIONS": "10", "VAL_LOSS_EVERY": "5",
           "NUM_LAYER_SCHEDULE": "0:1,6:2", "MODEL_DIM": "128", "MLP_MULT": "5", "MLP_LAYERS": "2", "EMA_DECAY": "0.8",
           "WARMDOWN_START_STEP": "3", "MIN_LR_FRAC": "0.1", "UNET_SKIPS": "1", "BIGRAM_TABLE_SIZE": "64", "TRAIN_SHUFFLE": "1", "RUN_ID": "r"}
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


def torch_equal(x, y) -> bool:
    import torch
    return torch.equal(x, y)


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
             "step = train_gpt.Trainer.train_step\n"
             "def dying(self):\n"
             "    if self.step == 6:  # both ranks, two steps after the step-4 checkpoint\n"
             "        os.kill(os.getpid(), signal.SIGKILL)\n"
             "    return step(self)\n"
             "train_gpt.Trainer.train_step = dying")
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
