"""compressors: zstd, lzma and brotli beside the core's zlib, each told by its stream's first bytes,
and a missing package named before any work."""
from __future__ import annotations

import os
import sys

import pytest

import train_gpt
from conftest import tiny_args


def test_every_compressor_is_told_by_its_magic_and_round_trips():
    data = os.urandom(3000) + bytes(5000)
    for name in train_gpt.COMPRESSORS:
        c = train_gpt.COMPRESSORS[name]
        packed = c.compress(data)
        assert packed.startswith(c.magic) and len(packed) < len(data), name
        assert train_gpt.compressor_of(packed) is c and train_gpt.decompress(packed) == data
    assert sorted(train_gpt.COMPRESSORS) == ["brotli", "lzma", "zlib", "zstd"]
    with pytest.raises(train_gpt.RunError, match="a stream of none of the compressors zlib, "):
        train_gpt.decompress(b"\x00\x01junk")


def test_brotli_streams_in_pieces_of_any_size():
    data = os.urandom(2000) * 3
    packed = train_gpt.COMPRESSORS["brotli"].compress(data)
    for piece in (1, 3, 1024):
        d = train_gpt.BrotliStream()
        out = b"".join(d.decompress(packed[i : i + piece]) for i in range(0, len(packed), piece))
        assert out == data and d.eof


def test_a_brotli_stream_inflates_in_bounded_pieces_and_stops_past_its_limit(monkeypatch):
    packed = train_gpt.COMPRESSORS["brotli"].compress(bytes(64 << 20))  # 64 MiB of zeros in a few hundred bytes
    assert len(packed) < 1024
    assert train_gpt.BrotliStream().decompress(packed) == bytes(64 << 20)
    monkeypatch.setattr(train_gpt.BrotliStream, "MAX_BYTES", 8 << 20)
    with pytest.raises(train_gpt.RunError, match="a brotli stream that inflates past 8388608 bytes"):
        train_gpt.BrotliStream().decompress(packed)


@pytest.mark.parametrize("compressor,package", [("zstd", "zstandard"), ("brotli", "brotli")])
def test_a_compressor_without_its_package_is_refused_by_name(monkeypatch, compressor, package):
    monkeypatch.setitem(sys.modules, package, None)  # import fails
    with pytest.raises(train_gpt.RunError, match=f"^COMPRESSOR={compressor} needs the {package} package"):
        tiny_args(COMPRESSOR=compressor)
