"""val_bpb byte accounting, validation, the export formats and their artifacts, EMA and shard loading."""
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
        nats = model(x, y, 3)[0].double()
    nbytes = luts.token_bytes(x, y).double().sum()
    assert loss == pytest.approx(float(nats.mean()), rel=1e-9)
    assert bpb == pytest.approx(float(nats.sum() / (math.log(2) * nbytes)), rel=1e-9)


FORMATS = [(8, 0.0), (7, 0.0), (6, 0.0), (5, 0.0), (6, 3.0), (5, 12.85)]


@pytest.mark.parametrize("bits,sigmas", FORMATS)
def test_roundtrip_within_half_a_step(bits, sigmas):
    torch.manual_seed(0)
    state = {"big": torch.randn(300, 400) * torch.linspace(0.01, 3, 300)[:, None],
             "cube": torch.randn(40, 30, 60), "controls.attn_scale": torch.rand(6, 2, 32),
             "small": torch.randn(10, 10), "ids": torch.arange(5)}
    state["big"][0, 0] = 50.0  # an outlier the clip cuts
    args = tiny_args(QUANT_BITS=str(bits), MATRIX_CLIP_SIGMAS=str(sigmas))
    obj = train_gpt.quantize_state_dict(state, args)
    assert obj["quantized"]["big"].dtype == torch.int8 and obj["bits"]["big"] == bits
    codes = torch.cat([q.flatten() for q in obj["quantized"].values()]).int()
    assert codes.abs().max() == 2 ** (bits - 1) - 1  # the range is used, and never exceeded
    out = train_gpt.dequantize_state_dict(obj)
    for name in ("big", "cube"):
        rows = state[name].reshape(-1, state[name].size(-1))
        if sigmas:
            clip = sigmas * rows.std(dim=1)[:, None]
        else:
            clip = torch.quantile(rows.abs(), 0.9999984, dim=1).clamp(min=1.0)[:, None]
        step = clip / (2 ** (bits - 1) - 1)
        err = (out[name].reshape(rows.shape) - rows.clamp(-clip, clip)).abs()
        assert (err <= step / 2 * 1.001).all() and out[name].shape == state[name].shape
    # The std clip cuts the outlier; the percentile of a 400-wide row is within 0.5% of its max.
    assert ((out["big"][0, 0] - state["big"][0, 0]).abs() > 10) == bool(sigmas)
    assert torch.equal(out["controls.attn_scale"], state["controls.attn_scale"])  # control tensors stay fp32
    assert (out["small"] - state["small"]).abs().max() < 1e-2 and out["small"].dtype == torch.float32
    assert torch.equal(out["ids"], state["ids"])


def test_small_tensors_are_stored_as_pr1088_stored_them():
    # PR #1088 keeps the baseline's control patterns (scales, residual mixes, q gains) in fp32 and
    # stores every other small float, its per-depth norm biases included, as fp16.
    model = tiny_model(randomize=True, MOD_CAPACITY="0.5")
    state = model.state_dict()
    obj = train_gpt.quantize_state_dict(state, model.args)
    stored = {name: train_gpt.from_byte_planes(t).dtype for name, t in obj["passthrough"].items()}  # as byte planes
    assert stored["controls.attn_norm_bias"] == stored["controls.mlp_norm_bias"] == torch.float16
    for name in ("controls.attn_scale", "controls.mlp_scale", "controls.resid_mix", "block.attns.0.q_gain", "controls.router"):
        assert stored[name] == torch.float32 and obj["passthrough"][name].size(0) == 4, name
    out = train_gpt.dequantize_state_dict(obj)
    bias = state["controls.attn_norm_bias"]
    assert out["controls.attn_norm_bias"].dtype == torch.float32
    assert torch.equal(out["controls.attn_norm_bias"], bias.half().float()) and not torch.equal(bias.half().float(), bias)


def test_embedding_bits_are_separate_and_16_keeps_fp16():
    model = tiny_model(randomize=True, MODEL_DIM="160", MLP_MULT="3")  # 512 x 160 embedding, head
    for embed_bits in ("16", "5"):
        args = tiny_args(MODEL_DIM="160", MLP_MULT="3", QUANT_BITS="6", EMBED_BITS=embed_bits)
        obj = train_gpt.quantize_state_dict(model.state_dict(), args)
        assert obj["bits"]["block.mlp.fc.weight"] == 6
        for name in ("tok_emb.weight", "lm_head.weight"):
            if embed_bits == "16":
                assert obj["passthrough"][name].size(0) == 2 and name not in obj["bits"]  # fp16's two byte planes
            else:
                assert obj["bits"][name] == 5 and obj["quantized"][name].abs().max() <= 15


def trained_tiny_model() -> tuple[train_gpt.GPT, torch.Tensor, torch.Tensor]:
    overrides = dict(MODEL_DIM="128", MLP_MULT="5", NUM_LAYER_SCHEDULE="0:2")
    model = tiny_model(**overrides)
    args = model.args
    g = torch.Generator().manual_seed(0)
    pattern = torch.randint(2, args.vocab_size, (97,), generator=g)
    data = pattern.repeat(60)  # a learnable, periodic stream
    x, y = train_gpt.inputs_and_targets(data[: 16 * args.train_seq_len + 1], args.train_seq_len)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    mode = train_gpt.training_mode(args, torch.ones(()))
    for _ in range(40):
        opt.zero_grad()
        model(x, y, 2, mode)[0].mean().backward()
        opt.step()
    model.eval()
    return model, x, y


@pytest.fixture(scope="module")
def trained():
    return trained_tiny_model()


@pytest.mark.parametrize("fmt", [dict(QUANT_BITS="8", COMPRESSOR="zlib"), dict(QUANT_BITS="6", COMPRESSOR="zstd"),
                                 dict(QUANT_BITS="5", COMPRESSOR="lzma", EMBED_BITS="6", MATRIX_CLIP_SIGMAS="8")])
def test_artifact_roundtrip_keeps_the_loss(tmp_path, trained, fmt):
    model, x, y = trained
    args = tiny_args(MODEL_DIM="128", MLP_MULT="5", NUM_LAYER_SCHEDULE="0:2", **fmt)
    state = model.state_dict()
    with torch.no_grad():
        pre = float(model(x, y, 2)[0].mean())
        path = str(tmp_path / "m.ptz")
        train_gpt.write_atomic(path, train_gpt.serialize_artifact(state, args))
        copy = tiny_model(MODEL_DIM="128", MLP_MULT="5", NUM_LAYER_SCHEDULE="0:2")
        copy.load_state_dict(train_gpt.load_artifact(path), strict=True)
        copy.eval()
        post = float(copy(x, y, 2)[0].mean())
    assert pre < 0.7 * math.log(args.vocab_size)  # it learned something
    assert abs(post - pre) < 0.03 * pre
    assert not any(p.name.startswith("m.ptz.tmp") for p in tmp_path.iterdir())


def test_int6_zstd_is_a_fifth_smaller_than_int8_zlib(trained):
    model, _, _ = trained
    sizes = {}
    for bits, compressor in ((8, "zlib"), (6, "zstd"), (5, "zstd")):
        args = tiny_args(MODEL_DIM="128", MLP_MULT="5", QUANT_BITS=str(bits), COMPRESSOR=compressor)
        sizes[bits] = len(train_gpt.serialize_artifact(model.state_dict(), args))
    assert sizes[6] <= 0.8 * sizes[8] and sizes[5] < sizes[6]


def test_size_estimate_of_the_record_config_is_its_artifact():
    # The PR #1088 record's int8+zlib artifact is 15,928,510 bytes (code excluded).
    args = train_gpt.Hyperparameters({})
    estimate = train_gpt.estimate_artifact_bytes(train_gpt.GPT(args).state_dict(), args)
    assert abs(estimate / 15_928_510 - 1) < 0.03


@pytest.mark.parametrize("fmt", [dict(QUANT_BITS="6", COMPRESSOR="zstd"), dict(QUANT_BITS="5", COMPRESSOR="lzma"),
                                 dict(QUANT_BITS="6", COMPRESSOR="zstd", MATRIX_CLIP_SIGMAS="12.85")])
def test_size_estimate_matches_gaussian_matrices(fmt):
    # Other shapes than the estimate's sample, float tensors beside them: the accounting holds.
    g = torch.Generator().manual_seed(1)
    state = {"block.fc.weight": torch.randn(640, 1600, generator=g) * 0.25, "block.proj.weight":
             torch.randn(1600, 320, generator=g) * 0.25, "controls.mlp_scale": torch.ones(6, 640), "q_gain": torch.ones(16)}
    args = tiny_args(**fmt)
    actual = len(train_gpt.serialize_artifact(state, args))
    assert abs(train_gpt.estimate_artifact_bytes(state, args) / actual - 1) < 0.05


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


def test_ema_follows_its_formula():
    model = tiny_model(randomize=True)
    decay = 0.9
    ema = train_gpt.EMA(model, decay)
    params = list(model.parameters())
    expected = [p.detach().double().clone() for p in params]
    for i in range(5):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p) * (i + 1))
        ema.update()
        expected = [decay * e + (1 - decay) * p.detach().double() for e, p in zip(expected, params)]
    for e, s in zip(expected, ema.shadow):
        assert torch.allclose(s.double(), e, rtol=1e-5, atol=1e-6)
    ema.copy_to_model()
    assert all(torch.equal(p.detach(), s) for p, s in zip(params, ema.shadow))


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


@pytest.mark.parametrize("cap", ["0", "600"])
def test_step_based_warmdown_ignores_the_wallclock(cap):
    cpu = torch.device("cpu")
    by_step = train_gpt.TrainClock(tiny_args(ITERATIONS="1000", WARMDOWN_START_STEP="600", MIN_LR_FRAC="0.05",
                                             MAX_WALLCLOCK_SECONDS=cap), cpu)
    by_frac = train_gpt.TrainClock(tiny_args(ITERATIONS="1000", WARMDOWN_FRAC="0.4", MAX_WALLCLOCK_SECONDS=cap), cpu)
    by_step.elapsed_ms = by_frac.elapsed_ms = 599_000.0  # near the cap: no effect on a step-based schedule
    by_step.step_ms = by_frac.step_ms = 100.0
    for step, linear in ((0, 1.0), (600, 1.0), (700, 0.75), (900, 0.25), (990, 0.025), (1000, 0.0)):
        assert by_frac.lr_mul(step) == pytest.approx(linear)
        assert by_step.lr_mul(step) == pytest.approx(max(linear, 0.05))
    assert by_step.describe() == "lr_schedule:steps warmdown:600->1000 min_lr_frac:0.05"
    wallclock = train_gpt.TrainClock(tiny_args(MAX_WALLCLOCK_SECONDS="600", MIN_LR_FRAC="0.2"), cpu)
    assert wallclock.describe() == "lr_schedule:wallclock warmdown_iters:1200 min_lr_frac:0.2"
    wallclock.elapsed_ms, wallclock.step_ms = 600_000.0, 100.0
    assert wallclock.lr_mul(0) == 0.2  # the floor holds for the wallclock warmdown too


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


def test_byte_planes_roundtrip_and_compress_better():
    g = torch.Generator().manual_seed(0)
    for t in (torch.randn(64, 48, generator=g).half() * 0.02, torch.randn(3, 5, generator=g), torch.tensor(2.5)):
        planes = train_gpt.byte_planes(t)
        assert planes.dtype == torch.uint8 and planes.shape == (t.element_size(), *t.shape) and planes.is_contiguous()
        back = train_gpt.from_byte_planes(planes)
        assert back.dtype == t.dtype and torch.equal(back, t)
    # Stored as planes, the sign/exponent bytes of similar values sit together and compress better.
    weights = torch.randn(256, 256, generator=g).half() * 0.02
    def packed(x: torch.Tensor) -> int:
        buf = io.BytesIO()
        torch.save(x, buf)
        return len(zlib.compress(buf.getvalue(), 9))

    assert packed(train_gpt.byte_planes(weights)) < 0.95 * packed(weights)
