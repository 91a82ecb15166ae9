"""Read, write and verify the challenge's token shards (shared by the tools in data/).

A shard is a header of 256 little-endian int32 (magic 20240520, version 1, token count, then
zeros) followed by that many little-endian uint16 tokens; train_gpt.py reads the same layout.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_TOKEN_ID = np.iinfo(np.uint16).max


def temp_path(path: Path) -> Path:
    """A fresh hidden name beside `path`, for writing it under before renaming it into place."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def atomic_open(path: Path) -> Iterator[BinaryIO]:
    """Write through a temporary file in the same directory, flushed to disk and renamed over `path`
    only on success, so an interrupted or failed write (or a crash soon after) never leaves a
    partial file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, unlike mkstemp's 0600
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_shard(path: Path, tokens: np.ndarray) -> None:
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"{path}: tokens must be one-dimensional, got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() > MAX_TOKEN_ID):
        raise ValueError(f"{path}: token ids must fit in uint16 (0..{MAX_TOKEN_ID})")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = MAGIC, VERSION, tokens.size
    with atomic_open(path) as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2", copy=False).tobytes())


def verify_shard(path: Path) -> int:
    """Return the shard's token count; ValueError naming the file if its header or size is wrong."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ValueError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte shard header")
    magic, version, count = np.fromfile(path, dtype="<i4", count=3).tolist()
    if magic != MAGIC:
        raise ValueError(f"{path}: bad magic {magic} (expected {MAGIC}); not a challenge shard")
    if version != VERSION:
        raise ValueError(f"{path}: unsupported shard version {version} (expected {VERSION})")
    expected = HEADER_BYTES + 2 * count
    if count < 0 or size != expected:
        raise ValueError(f"{path}: header says {count} tokens ({expected} bytes) but the file has {size} bytes")
    return count


def read_shard(path: Path) -> np.ndarray:
    count = verify_shard(path)
    return np.fromfile(path, dtype="<u2", count=count, offset=HEADER_BYTES).astype(np.uint16, copy=False)
