"""DATA: shards read back or refused, every world size sees the same global batch, and the byte
tables count the bytes of the decoded text."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

import train_gpt
from conftest import DOCS, SHARED_TOKENIZER


def tokenizers(trained: Path) -> list[Path]:
    return [trained] + ([SHARED_TOKENIZER] if SHARED_TOKENIZER.exists() else [])


def test_byte_count_matches_utf8_of_decoded_text(trained_tokenizer):
    for path in tokenizers(trained_tokenizer):
        sp = spm.SentencePieceProcessor(model_file=str(path))
        luts = train_gpt.build_byte_luts(sp, int(sp.vocab_size()), torch.device("cpu"))
        docs = [d for d in DOCS if sp.unk_id() not in sp.encode(d)]  # the sp1024 vocab lacks some CJK
        assert len(docs) >= 4
        stream = []
        for doc in docs:  # documents back to back, each BOS-prefixed, as in the shards
            ids = sp.encode(doc)
            doc_ids = torch.tensor([1] + ids)
            counted = int(luts.token_bytes(doc_ids[:-1], doc_ids[1:]).sum())
            assert counted == len(sp.decode(ids).encode("utf-8")), (path.name, doc)
            stream += [1] + ids
        stream = torch.tensor(stream)
        total = int(luts.token_bytes(stream[:-1], stream[1:]).sum())
        assert total == sum(len(sp.decode(sp.encode(d)).encode("utf-8")) for d in docs)
        # Boundary tokens (BOS, unknown) count zero bytes.
        assert luts.base_bytes[sp.unk_id()] == 0 and luts.is_boundary[sp.unk_id()] and luts.is_boundary[1]


def write_shard(path: Path, tokens, magic=20240520, version=1, count=None, extra=b"") -> Path:
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, version, len(tokens) if count is None else count
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes() + extra)
    return path


def test_shards_read_back_and_corrupt_ones_are_refused(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16) % 700
    good = write_shard(tmp_path / "fineweb_train_000000.bin", tokens)
    assert torch.equal(train_gpt.load_data_shard(good), torch.from_numpy(tokens))
    bad = {"magic": dict(magic=1234), "version": dict(version=2), "short": dict(count=1001),
           "long": dict(extra=b"\0\0")}
    for name, kw in bad.items():
        path = write_shard(tmp_path / f"{name}.bin", tokens, **kw)
        with pytest.raises(train_gpt.RunError, match=f"{name}.bin"):
            train_gpt.load_data_shard(path)
    with pytest.raises(train_gpt.RunError, match="training shards"):
        train_gpt.train_shard_files(str(tmp_path / "nothing_*.bin"))


def test_loader_gives_every_world_size_the_same_global_batch(tmp_path):
    tokens = np.arange(5000, dtype=np.uint16)
    files = [write_shard(tmp_path / f"fineweb_train_00000{i}.bin", tokens[i * 2500 : (i + 1) * 2500]) for i in (0, 1)]
    cpu = torch.device("cpu")
    single = train_gpt.DistributedTokenLoader(files, 0, 1, cpu)
    ranks = [train_gpt.DistributedTokenLoader(files, r, 2, cpu) for r in (0, 1)]
    for _ in range(6):  # crosses the shard boundary
        one = [single.next_batch(64, 16) for _ in range(2)]  # 2 micro-steps on one rank ...
        two = [loader.next_batch(64, 16) for loader in ranks]  # ... or 1 micro-step on each of 2 ranks
        for (x1, y1), (x2, y2) in zip(one, two):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
            assert torch.equal(x1[:, 1:], y1[:, :-1])
