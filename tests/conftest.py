"""Shared fixtures and helpers: tiny configurations of train_gpt.py, a small real-text dataset, the
end-to-end runs' settings, a trained tokenizer and its byte tables, records/submission.py.

Run the suite with `python3 -m pytest -q tests` from the repository root (CPU only).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
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


# records/submission.py, loaded once: its tools' tests and the size guard's use it.
_spec = importlib.util.spec_from_file_location("submission", REPO / "records" / "submission.py")
submission = importlib.util.module_from_spec(_spec)
sys.modules["submission"] = submission  # dataclasses look their module up by name
_spec.loader.exec_module(submission)


def tiny_args(**overrides: str) -> train_gpt.Hyperparameters:
    args = train_gpt.Hyperparameters({**TINY, **overrides})
    args.validate()
    return args


def settings_read(module) -> set[str]:
    """The environment variables a train_gpt module's Hyperparameters reads (a stripped one's too)."""
    names: set[str] = set()

    class Recorder(dict):
        def get(self, key, default=None):
            names.add(key)
            return default

    module.Hyperparameters(Recorder())
    return names


def clock_of(args: train_gpt.Hyperparameters) -> train_gpt.TrainClock:
    """A training clock with the run's cap, on the CPU, not started."""
    return train_gpt.TrainClock(train_gpt.training_cap_ms(args), torch.device("cpu"))


def plan(model, depth: int) -> tuple:
    """The layer plan at `depth` of a model (or of its Hyperparameters): what the forward takes."""
    return train_gpt.layer_plan(getattr(model, "args", model), depth)


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


def batch(args, seqs: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, args.vocab_size, (seqs * args.train_seq_len + 1,), generator=g)
    return train_gpt.inputs_and_targets(tokens, args.train_seq_len)


# A stem, a core that changes depth, a tail, and U-Net skips of both kinds across them.
UNET_STACK = dict(NUM_STEM_BLOCKS="1", NUM_TAIL_BLOCKS="1", UNET_SKIPS="1", UNET_WEIGHTS="2", NUM_LAYER_SCHEDULE="0:2,3:4")


# The end-to-end runs' settings: train_gpt.py in a subprocess on `dataset`, a few steps.
RUN = {**TINY, "ITERATIONS": "12", "NUM_LAYER_SCHEDULE": "0:1,6:2", "VAL_LOSS_EVERY": "6",
       "TRAIN_LOG_EVERY": "1", "WARMUP_STEPS": "2", "MAX_WALLCLOCK_SECONDS": "0", "RUN_ID": "t",
       "WARMDOWN_ITERS": "4", "TTT_ENABLED": "1", "TTT_CHUNK_TOKENS": "64", "TTT_SLIDING_SCORE": "1"}


# A 4352-wide hidden layer of untrained weights, SDClip-quantized at 4 std: ~16 MB of codes,
# estimated (as trained rows) at ~20 MB, 25% over the cap.
OVER_CAP = {"MODEL_DIM": "256", "MLP_MULT": "17", "NUM_LAYER_SCHEDULE": "0:1", "MATRIX_CLIP_SIGMAS": "4"}


# ---- a tokenizer trained on a few documents, its byte tables, token streams ---------------------

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Numbers like 3.14159 and 2026 are split into digits; prices cost 5 dollars (or less).",
    "  Leading spaces,\ttabs and    repeated   spaces are normalised by the tokenizer.",
    "def main():\n    return key(1, 2) + 3 * 4",
    "Em dashes — and “curly quotes” appear in web text.",
    "naïve café {braces} [brackets] # and 中文",  # unknown pieces for the sp1024 vocab
]


@pytest.fixture(scope="module")
def trained_tokenizer(tmp_path_factory) -> Path:
    prefix = tmp_path_factory.mktemp("tok") / "tiny"
    text = [line for doc in DOCS for line in doc.splitlines()] * 20 + [
        "Python is a programming language that lets you work quickly and integrate systems effectively."] * 20
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_prefix=str(prefix), vocab_size=512, model_type="bpe",
        byte_fallback=True, pad_id=0, bos_id=1, eos_id=2, unk_id=3, character_coverage=1.0,
        minloglevel=2)
    return prefix.with_suffix(".model")


SEQ = 32  # TINY's TRAIN_SEQ_LEN


@pytest.fixture(scope="module")
def luts(tmp_path_factory) -> train_gpt.ByteLUTs:
    prefix = tmp_path_factory.mktemp("tok") / "t"
    text = ["a quick brown fox jumps over the lazy dog number %d" % i for i in range(300)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(prefix), vocab_size=512,
                                   model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2, unk_id=3, pad_id=0,
                                   minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(prefix.with_suffix(".model")))
    return train_gpt.build_byte_luts(sp, 512, torch.device("cpu"))


def stream(n: int, seed: int = 0, doc_every: int = 0) -> torch.Tensor:
    """n + 1 random non-BOS tokens; with doc_every, documents of varying length starting with BOS."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, 512, (n + 1,), generator=g)
    if doc_every:
        pos = 0
        while pos <= n:
            tokens[pos] = train_gpt.BOS_ID
            pos += doc_every + int(torch.randint(0, doc_every, (1,), generator=g))
    return tokens


def sliding(model, tokens, luts, stride: int, seq_len: int = SEQ, batch: int = 8):
    score = train_gpt.evaluate(model, plan(model, 3), tokens, luts, seq_len=seq_len, stride=stride, batch=batch,
                               per_position=True)
    return score.loss, score.bpb, score.per_position
