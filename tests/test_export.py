"""QUANTIZATION AND EXPORT: rows quantized within half a step, small tensors stored as PR #1088
stored them, per-class code widths, artifacts that keep the loss through a roundtrip, bounded
decompression, atomic writes."""
from __future__ import annotations

import io
import math
import os
import zlib

import pytest
import torch

import train_gpt
from conftest import plan, tiny_args, tiny_model

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


def test_each_class_of_matrix_gets_its_own_width(monkeypatch):
    monkeypatch.setattr(train_gpt, "KEEP_FLOAT_MAX_NUMEL", 0)
    env = {"ATTN_BITS": "6", "MLP_BITS": "5", "EMBED_BITS": "8", "HEAD_BITS": "7"}
    model = tiny_model(randomize=True, **env)
    obj = train_gpt.quantize_state_dict(model.state_dict(), model.args)
    assert train_gpt.check_schema(obj) is None
    expected = lambda name: 7 if name.startswith("lm_head") else 8 if name.startswith("tok_emb") else \
        6 if ".attns." in name else 5
    assert obj["bits"] and all(bits == expected(name) for name, bits in obj["bits"].items())
    assert {".attns.", ".mlp."} <= {k for name in obj["bits"] for k in (".attns.", ".mlp.") if k in name}
    for name, codes in obj["quantized"].items():
        assert codes.abs().max() <= train_gpt.qmax(obj["bits"][name])
    assert train_gpt.format_name(model.args) == "int6a5m+zlib"
    assert train_gpt.format_name(tiny_args(QUANT_BITS="6")) == "int6+zlib"
    state = model.state_dict()
    assert train_gpt.estimate_artifact_bytes(state, model.args) < train_gpt.estimate_artifact_bytes(state, tiny_args())
    obj["bits"][next(iter(obj["bits"]))] = 3
    assert "codes, bits and steps" in train_gpt.check_schema(obj)
    with pytest.raises(train_gpt.RunError, match="ATTN_BITS=3"):
        tiny_args(ATTN_BITS="3")


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
        model(x, y, plan(model, 2), mode)[0].mean().backward()
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
        pre = float(model(x, y, plan(model, 2))[0].mean())
        path = str(tmp_path / "m.ptz")
        train_gpt.write_atomic(path, train_gpt.serialize_artifact(state, args))
        copy = tiny_model(MODEL_DIM="128", MLP_MULT="5", NUM_LAYER_SCHEDULE="0:2")
        copy.load_state_dict(train_gpt.load_artifact(path), strict=True)
        copy.eval()
        post = float(copy(x, y, plan(model, 2))[0].mean())
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


@pytest.mark.parametrize("compressor", sorted(train_gpt.COMPRESSORS))
def test_compress_and_decompress_are_inverse_for_every_compressor(compressor):
    data = os.urandom(4096) + bytes(4096)
    assert train_gpt.decompress(train_gpt.COMPRESSORS[compressor].compress(data)) == data


def test_weights_of_other_settings_are_refused_naming_the_source(tmp_path):
    state = tiny_model(MODEL_DIM="64").state_dict()
    with pytest.raises(train_gpt.RunError, match=r"^x.ptz does not fit the model of these settings: size mismatch"):
        train_gpt.load_weights(tiny_model(), state, "x.ptz")
