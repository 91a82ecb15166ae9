"""val_bpb byte accounting, validation, the int8+zlib artifact and shard loading."""
from __future__ import annotations

import io
import math
import os
import zlib
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

import train_gpt
from conftest import SHARED_TOKENIZER, tiny_args, tiny_model

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


def test_eval_val_matches_a_direct_computation(trained_tokenizer):
    sp = spm.SentencePieceProcessor(model_file=str(trained_tokenizer))
    args = tiny_args(VAL_BATCH_SIZE="8192")  # 2 sequences per batch: the tail is padded
    model = tiny_model(randomize=True)
    luts = train_gpt.build_byte_luts(sp, 512, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    val = torch.randint(0, 512, (5 * args.train_seq_len + 1,), generator=g)
    loss, bpb = train_gpt.evaluate(model, val, luts, 3, args.train_seq_len, args.train_seq_len,
                                   train_gpt.val_batch_seqs(args, 1))
    x, y = train_gpt.inputs_and_targets(val, args.train_seq_len)
    model.eval()
    with torch.no_grad():
        nats = model(x, y, 3).double()
    nbytes = luts.token_bytes(x, y).double().sum()
    assert loss == pytest.approx(float(nats.mean()), rel=1e-9)
    assert bpb == pytest.approx(float(nats.sum() / (math.log(2) * nbytes)), rel=1e-9)


def test_int8_roundtrip_within_one_step():
    torch.manual_seed(0)
    state = {"big": torch.randn(300, 400) * torch.linspace(0.01, 3, 300)[:, None],
             "controls.attn_scale": torch.rand(6, 2, 32), "small": torch.randn(10, 10), "ids": torch.arange(5)}
    state["big"][0, 0] = 50.0  # an outlier the percentile clip cuts
    out = train_gpt.dequantize_state_dict(train_gpt.quantize_state_dict(state))
    clip = torch.quantile(state["big"].abs(), train_gpt.INT8_CLIP_Q, dim=1, keepdim=True)
    step = (clip / 127).clamp_min(train_gpt.INT8_MIN_SCALE)
    err = (out["big"] - state["big"].clamp(-clip, clip)).abs()
    assert (err <= step).all() and err.mean() < 0.3 * step.mean()
    assert torch.equal(out["controls.attn_scale"], state["controls.attn_scale"])  # control tensors stay fp32
    assert (out["small"] - state["small"]).abs().max() < 1e-2 and out["small"].dtype == torch.float32
    assert torch.equal(out["ids"], state["ids"])


def test_roundtrip_loss_close_to_prequant(tmp_path):
    overrides = dict(MODEL_DIM="128", MLP_MULT="5", NOISY_QAT="1")
    model = tiny_model(**overrides)
    args = model.args
    g = torch.Generator().manual_seed(0)
    pattern = torch.randint(2, args.vocab_size, (97,), generator=g)
    data = pattern.repeat(60)  # a learnable, periodic stream
    x, y = train_gpt.inputs_and_targets(data[: 16 * args.train_seq_len + 1], args.train_seq_len)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        opt.zero_grad()
        model(x, y, 3).mean().backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        pre = float(model(x, y, 3).mean())
        path = str(tmp_path / "m.ptz")
        train_gpt.write_atomic(path, train_gpt.serialize_artifact(model.state_dict()))
        obj = torch.load(io.BytesIO(zlib.decompress(Path(path).read_bytes())), weights_only=True)
        assert obj["quantized"]["block.mlp.mids.0.weight"].dtype == torch.int8  # the int8 path was exercised
        model.load_state_dict(train_gpt.load_artifact(path), strict=True)
        post = float(model(x, y, 3).mean())
    assert pre < 0.7 * math.log(args.vocab_size)  # it learned something
    assert abs(post - pre) < 0.02 * pre


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_artifact_with_code_or_foreign_format_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, obj in (("evil.ptz", {"__quant_format__": train_gpt.QUANT_FORMAT, "x": Evil()}),
                      ("foreign.ptz", {"weights": torch.zeros(3)})):
        buf = io.BytesIO()
        torch.save(obj, buf)
        (tmp_path / name).write_bytes(zlib.compress(buf.getvalue()))
        with pytest.raises(train_gpt.RunError, match=name):
            train_gpt.load_artifact(str(tmp_path / name))
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "junk.ptz").write_bytes(b"not zlib")
    with pytest.raises(train_gpt.RunError, match="junk.ptz"):
        train_gpt.load_artifact(str(tmp_path / "junk.ptz"))


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


def test_clock_warmdown_follows_the_current_phase():
    args = tiny_args(ITERATIONS="1000", WARMDOWN_ITERS="100", MAX_WALLCLOCK_SECONDS="0")
    clock = train_gpt.TrainClock(args, torch.device("cpu"))
    assert [clock.lr_mul(s) for s in (0, 899, 900, 950, 1000)] == [1.0, 1.0, 1.0, 0.5, 0.0]
    capped = train_gpt.TrainClock(tiny_args(WARMDOWN_ITERS="100", MAX_WALLCLOCK_SECONDS="10"), torch.device("cpu"))
    assert capped.lr_mul(0) == 1.0  # no step time measured yet
    # 1000 steps took 4 s at depth 2; depth 6 begins and is first guessed 3x slower (12 ms/step).
    capped.elapsed_ms, capped.sync_step, capped.step_ms = 4000.0, 1000, 4.0
    capped.begin_phase(1000, 3.0)
    assert capped.step_ms == 12.0
    assert capped.lr_mul(1000) == 1.0
    # 6 s remain = 500 steps at 12 ms; warmdown covers the last 100 of them (1.2 s).
    assert capped.lr_mul(1450) == pytest.approx(50 * 12 / 1200)
    assert capped.lr_mul(1500) == 0.0
    capped.elapsed_ms, capped.sync_step = 9990.0, 1490
    assert capped.out_of_time()  # the next step would end past 10 s
    capped.elapsed_ms = 9900.0
    assert not capped.out_of_time() and capped.next_sync(1490) == 1494
    capped.elapsed_ms = 1000.0
    assert capped.next_sync(1490) == 1490 + train_gpt.MAX_SYNC_GAP
