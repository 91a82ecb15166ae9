"""Vocabularies beyond the challenge's 1024 (sp4096, sp8192), end to end on CPU.

Run with `python3 -m pytest -q tests/test_vocab.py` (15-25 s on 2 cores, idle or busy).
data/build_local_dataset.py trains a SentencePiece tokenizer at each vocabulary on Python's
documentation, then: the byte tables must count the bytes that the tokenizer itself decodes,
train_gpt.py must train, export and score a tiny model at each vocabulary, and its size estimate
must grow by the embedding's and head's bytes.
"""
from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

import train_gpt
from conftest import REPO, TINY, run_script

sys.path.insert(0, str(REPO / "data"))
from shards import read_shard  # noqa: E402

VOCABS = (4096, 8192)
MAX_DOCS = 250  # the pydoc topics and ~170 modules: enough text for 8192 pieces, ~19k validation tokens
DIM = int(TINY["MODEL_DIM"])
# One thread: a model this small gains nothing from two, and two threads on a box that something
# else keeps busy spin in OpenMP's barriers (a run took 52 s instead of 10 s at load 4 on 2 cores).
RUN = {**TINY, "NUM_LAYER_SCHEDULE": "0:1", "ITERATIONS": "4", "MAX_WALLCLOCK_SECONDS": "0", "RUN_ID": "v",
       "EVAL_STRIDE": "0", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def datasets(tmp_path_factory) -> dict[int, dict[str, str]]:
    """Each vocabulary's dataset and tokenizer, built by the CLI; the env it prints to train on it."""
    root = tmp_path_factory.mktemp("vocab")
    envs = {}
    for vocab in VOCABS:
        cmd = [sys.executable, str(REPO / "data" / "build_local_dataset.py"), "--vocab-size", str(vocab),
               "--max-docs", str(MAX_DOCS), "--output-dir", str(root / f"local_sp{vocab}"),
               "--tokenizer-out", str(root / f"local_{vocab}_bpe.model")]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        envs[vocab] = dict(item.split("=", 1) for item in result.stdout.strip().splitlines()[-1].split())
    return envs


@pytest.fixture(scope="session")
def runs(datasets, tmp_path_factory) -> dict[int, tuple[str, Path]]:
    """train_gpt.py's stdout and folder for a tiny run at each vocabulary."""
    out = {}
    for vocab in VOCABS:
        cwd = tmp_path_factory.mktemp(f"run{vocab}")
        result = run_script(cwd, {**RUN, **datasets[vocab]})
        assert result.returncode == 0, result.stderr[-2000:]
        out[vocab] = result.stdout, cwd
    return out


def tokenizer(env: dict[str, str]) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=env["TOKENIZER_PATH"])


def val_tokens(env: dict[str, str]) -> np.ndarray:
    return read_shard(Path(env["DATA_PATH"]) / "fineweb_val_000000.bin").astype(np.int64)


def decoded_bytes(sp: spm.SentencePieceProcessor, tokens: np.ndarray) -> int:
    """The UTF-8 bytes of the text that the tokens after tokens[0] decode to, by the tokenizer alone.
    Boundary tokens (BOS, unknown) stand for no text; the text between two of them is decoded as one
    piece of text, so a leading "▁" right after a boundary prints no space, as at a document's start."""
    boundary = [i for i in range(1, len(tokens)) if sp.is_control(int(tokens[i])) or sp.is_unknown(int(tokens[i]))]
    cuts = [0, *boundary, len(tokens)]
    runs = [tokens[a + 1:b].tolist() for a, b in zip(cuts[:-1], cuts[1:]) if b > a + 1]
    return sum(len(text.encode("utf-8")) for text in sp.decode(runs))


def line(out: str, pattern: str) -> re.Match:
    match = re.search(pattern, out, re.M)
    assert match, f"no line matching {pattern!r} in:\n{out[-3000:]}"
    return match


def test_tokenizers_are_trained_to_their_full_vocabulary(datasets):
    counts = {}
    for vocab, env in datasets.items():
        sp = tokenizer(env)
        assert env["VOCAB_SIZE"] == str(vocab) and sp.vocab_size() == vocab
        assert [sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()] == [0, 1, 2, 3]
        train = read_shard(Path(env["DATA_PATH"]) / "fineweb_train_000000.bin")
        assert vocab // 2 <= train.max() < vocab  # the upper half of the vocabulary is in use
        val = val_tokens(env)
        counts[vocab] = len(val), int((val == 1).sum())
    # The same validation documents (the split hashes their text) in fewer tokens at 8192.
    assert counts[8192][1] == counts[4096][1] and counts[8192][0] < counts[4096][0]


@pytest.mark.parametrize("vocab", VOCABS)
def test_byte_tables_count_the_bytes_the_tokenizer_decodes(datasets, vocab):
    sp = tokenizer(datasets[vocab])
    luts = train_gpt.build_byte_luts(sp, vocab, torch.device("cpu"))
    # Each piece, printed after an ordinary token: its bytes and its space, from decoding alone.
    anchor = sp.piece_to_id("a")
    ids = [i for i in range(vocab) if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i))]
    after = [len(text.encode("utf-8")) - 1 for text in sp.decode([[anchor, i] for i in ids])]
    alone = [len(text.encode("utf-8")) for text in sp.decode([[i] for i in ids])]
    table = (luts.base_bytes + luts.has_leading_space.to(torch.int16))[ids].tolist()
    assert after == table and alone == luts.base_bytes[ids].tolist()
    # The whole validation split: every target's bytes, as the evaluation sums them.
    tokens = val_tokens(datasets[vocab])
    t = torch.from_numpy(tokens)
    assert int(luts.token_bytes(t[:-1], t[1:]).sum()) == decoded_bytes(sp, tokens)


@pytest.mark.slow
@pytest.mark.parametrize("vocab", VOCABS)
def test_training_exports_and_scores_at_the_vocabulary(runs, datasets, vocab):
    out, cwd = runs[vocab]
    # An untrained head predicts every token alike: the first loss is ln(vocab).
    first = float(line(out, r"^step:0/4 val_loss:(\S+) val_bpb:").group(1))
    assert first == pytest.approx(math.log(vocab), abs=0.05)
    exact = line(out, r"^final_int8_zlib_roundtrip_exact val_loss:(\S+) val_bpb:(\S+)$")
    loss, bpb = float(exact.group(1)), float(exact.group(2))
    line(out, r"^compliance train_time:\d+ms/600000ms:ok eval_time:\d+ms/600000ms:ok .* "
              rf"score:final_int8_zlib_roundtrip_exact val_bpb:{re.escape(exact.group(2))}$")
    # val_bpb = nats / (ln 2 * bytes) and val_loss = nats / tokens: their ratio is the bytes per
    # scored token, which the tokenizer's decoding of the scored span gives independently.
    seq_len = int(RUN["TRAIN_SEQ_LEN"])
    tokens = val_tokens(datasets[vocab])
    scored = (len(tokens) - 1) // seq_len * seq_len
    line(out, rf"^val_loader:shards pattern=\S+ tokens:{scored}$")
    per_token = decoded_bytes(tokenizer(datasets[vocab]), tokens[:scored + 1]) / scored
    assert loss / (math.log(2) * bpb) == pytest.approx(per_token, rel=1e-6)
    # The artifact holds the embedding and the head at the full vocabulary.
    artifact = cwd / line(out, r"^artifact:(\S+)$").group(1)
    assert artifact.stat().st_size == int(line(out, r"^Serialized model int8\+zlib: (\d+) bytes").group(1))
    shapes = sorted(name for name, t in train_gpt.load_artifact(artifact).items() if t.shape == (vocab, DIM))
    assert shapes == ["lm_head.weight", "tok_emb.weight"]


@pytest.mark.slow
def test_size_estimate_grows_by_the_embedding_and_head(runs):
    def numbers(vocab: int) -> tuple[int, int, int]:
        out = runs[vocab][0]
        return (int(line(out, r"^model_params:(\d+)$").group(1)),
                int(line(out, r"^size_estimate int8\+zlib: total:~(\d+) ").group(1)),
                int(line(out, r"^Serialized model int8\+zlib: (\d+) bytes").group(1)))

    (params_a, estimate_a, artifact_a), (params_b, estimate_b, artifact_b) = numbers(4096), numbers(8192)
    added = params_b - params_a
    assert added == 2 * (8192 - 4096) * DIM  # an embedding row and a head row per token, nothing else
    # Each added weight is an int8 code (Gaussian codes compress to ~7 bits) plus its row's fp16 step.
    per_weight = (estimate_b - estimate_a) / added
    assert 0.8 < per_weight <= 1 + 2 / DIM, per_weight
    # The real artifact grows too, by less: weights 4 steps from their init compress better.
    assert 0 < artifact_b - artifact_a < estimate_b - estimate_a
