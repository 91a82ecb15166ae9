"""Shared fixtures: tiny configurations of train_gpt.py and a small real-text dataset.

Run the suite with `python3 -m pytest -q tests` from the repository root (CPU only).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train_gpt  # noqa: E402

# The challenge's real sp1024 tokenizer, when the workspace provides it beside the repository.
SHARED_TOKENIZER = REPO.parent / "shared" / "tokenizers" / "fineweb_1024_bpe.model"

# A model small enough to train in seconds on two CPU cores, with a two-phase depth schedule.
TINY = {
    "MODEL_DIM": "32", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "MLP_MULT": "2", "VOCAB_SIZE": "512",
    "NUM_LAYER_SCHEDULE": "0:1,4:3", "TRAIN_SEQ_LEN": "32", "TRAIN_BATCH_TOKENS": "2048",
    "VAL_BATCH_SIZE": "4096", "TORCH_COMPILE": "0", "WARMUP_STEPS": "0",
}


def tiny_args(**overrides: str) -> train_gpt.Hyperparameters:
    args = train_gpt.Hyperparameters({**TINY, **overrides})
    args.validate()
    return args


def tiny_model(seed: int = 0, randomize: bool = False, **overrides: str) -> train_gpt.GPT:
    """A tiny GPT; `randomize` replaces the zero/one inits so every parameter affects the output."""
    torch.manual_seed(seed)
    model = train_gpt.GPT(tiny_args(**overrides))
    if randomize:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> dict[str, str]:
    """A real-text dataset (Python's own documentation) built by data/build_local_dataset.py,
    with its own tokenizer (vocab 512). Returns the env that points train_gpt.py at it."""
    root = tmp_path_factory.mktemp("dataset")
    out, tok = root / "local_sp512", root / "local_512_bpe.model"
    cmd = [sys.executable, str(REPO / "data" / "build_local_dataset.py"), "--vocab-size", "512",
           "--output-dir", str(out), "--tokenizer-out", str(tok), "--max-docs", "400"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    return {"DATA_PATH": str(out), "TOKENIZER_PATH": str(tok), "VOCAB_SIZE": "512"}


def child_env(env: dict[str, str]) -> dict[str, str]:
    """This environment without torchrun's rank variables, plus `env`."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK"))}, **env}


def run_script(tmp_path: Path, env: dict[str, str], nproc: int = 0, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run train_gpt.py in tmp_path (plain python, or torchrun with `nproc` CPU processes)."""
    full_env = child_env({"OMP_NUM_THREADS": "1" if nproc else "2", **env})
    launcher = [sys.executable]
    if nproc:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run(launcher + [str(REPO / "train_gpt.py")], cwd=tmp_path, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


# train_gpt.main() in a fresh interpreter after `patch` (Python source) has replaced parts of the
# module: to inject slow steps, failures or a kill at a chosen point.
SHIM = """
import sys
sys.path.insert(0, {repo!r})
import train_gpt
{patch}
try:
    train_gpt.main()
except train_gpt.RunError as e:
    sys.exit(f"error: {{e}}")
"""


def run_patched(cwd: Path, env: dict, patch: str, timeout: int = 300, nproc: int = 0) -> subprocess.CompletedProcess:
    """The shim in `cwd`: one process, or `nproc` CPU processes under torchrun (which runs a file, shim.py)."""
    code = SHIM.format(repo=str(REPO), patch=patch)
    command = [sys.executable, "-c", code]
    if nproc:
        (cwd / "shim.py").write_text(code)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "shim.py"]
    return subprocess.run(command, cwd=cwd, text=True, capture_output=True,
                          env=child_env({"OMP_NUM_THREADS": "1" if nproc else "2", **env}), timeout=timeout)
