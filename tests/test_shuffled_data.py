"""shuffled_data: TRAIN_SHUFFLE=1 draws every window of a pass once, at the pass's offset, gives any
world size the same global batch, and continues exactly from its position."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train_gpt
from conftest import tiny_args
from test_data import write_shard

CPU = torch.device("cpu")
SEQ = 16


def shards(tmp_path, sizes=(700, 1300)) -> tuple[list, np.ndarray]:
    """Shards whose tokens are all different (a window's first token says where it was cut)."""
    tokens = np.arange(sum(sizes), dtype=np.uint16)
    bounds = np.cumsum((0,) + sizes)
    files = [write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", tokens[a:b]) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    return files, bounds


def sampler(files, rank=0, world_size=1, seed=7) -> train_gpt.ShuffledSequences:
    return train_gpt.ShuffledSequences(files, rank, world_size, CPU, seq_len=SEQ, seed=seed)


def test_a_pass_draws_every_window_of_its_offset_once_then_a_new_pass_begins(tmp_path):
    files, bounds = shards(tmp_path)
    loader, passes = sampler(files), {}
    for _ in range(600):  # about five passes, a window at a time
        x, y = loader.next_batch(SEQ, SEQ)
        assert x.shape == y.shape == (1, SEQ) and x.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y[:, -1], x[:, -1] + 1)  # consecutive tokens
        passes.setdefault(loader.position()[0], []).append(int(x[0, 0]))
    offsets = set()
    for starts in list(passes.values())[:-1]:  # the complete passes
        shard = np.searchsorted(bounds, starts, side="right") - 1
        offset = int((starts[0] - bounds[shard[0]]) % SEQ)
        expected = sorted(int(bounds[s]) + offset + k * SEQ for s in range(len(files))
                          for k in range((bounds[s + 1] - bounds[s] - 1 - offset) // SEQ))
        assert sorted(starts) == expected  # every window once, none crossing a shard's end
        assert starts != expected  # in a random order
        offsets.add(offset)
    assert len(passes) >= 5 and len(offsets) > 1


def test_every_world_size_draws_the_same_global_batch(tmp_path):
    files, _ = shards(tmp_path)
    single = sampler(files)
    ranks = [sampler(files, r, 2) for r in (0, 1)]
    for _ in range(40):  # crosses passes
        x1, y1 = single.next_batch(6 * SEQ, SEQ)
        two = [loader.next_batch(3 * SEQ, SEQ) for loader in ranks]
        assert torch.equal(x1, torch.cat([x for x, _ in two])) and torch.equal(y1, torch.cat([y for _, y in two]))
    other = sampler(files, seed=8)
    assert not torch.equal(sampler(files).next_batch(6 * SEQ, SEQ)[0], other.next_batch(6 * SEQ, SEQ)[0])


@pytest.mark.parametrize("shuffle", ["0", "1"])
def test_the_loader_continues_exactly_from_the_position_a_trainer_saves(tmp_path, shuffle):
    files, _ = shards(tmp_path)
    args = tiny_args(TRAIN_SHUFFLE=shuffle, TRAIN_SEQ_LEN=str(SEQ))
    make = train_gpt.shuffled_loader(args, train_gpt.DistributedTokenLoader)
    get, set_ = train_gpt.TRAINER_STATE["loader"]
    first = SimpleNamespace(loader=make(files, 0, 1, CPU))
    assert isinstance(first.loader, train_gpt.ShuffledSequences if shuffle == "1" else train_gpt.DistributedTokenLoader)
    for _ in range(23):
        first.loader.next_batch(4 * SEQ, SEQ)
    second = SimpleNamespace(loader=make(files, 0, 1, CPU))
    set_(second, get(first))
    for _ in range(60):  # across a pass (a shard boundary in order)
        assert all(torch.equal(a, b) for a, b in zip(first.loader.next_batch(4 * SEQ, SEQ), second.loader.next_batch(4 * SEQ, SEQ)))


def test_shards_too_short_for_a_window_at_every_offset_are_refused(tmp_path):
    files, _ = shards(tmp_path, sizes=(2 * SEQ - 1, 20))
    with pytest.raises(train_gpt.RunError, match=r"TRAIN_SHUFFLE=1 needs a training shard of at least 2 \* TRAIN_SEQ_LEN = 32"):
        sampler(files)
    (tmp_path / "long").mkdir()
    x, _ = sampler(shards(tmp_path / "long", sizes=(2 * SEQ, 5))[0]).next_batch(SEQ, SEQ)  # one shard is enough
    assert x.shape == (1, SEQ)
