"""hash_embed: hash n-gram embeddings read only the current document up to each position and
start neutral."""
from __future__ import annotations

import torch

import train_gpt
from conftest import batch, tiny_model


def test_ngram_buckets_use_only_the_current_document_up_to_each_position():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 500, (3, 40), generator=g)
    ids[:, 0] = 1
    ids[0, 17] = 1  # a second document starts at 17 in row 0
    for n, size in ((2, 97), (3, 61)):
        buckets = train_gpt.ngram_buckets(ids, n, size)
        assert buckets.min() >= 0 and buckets.max() <= size - 1
        for t in range(40):  # changing later tokens never moves the bucket of t
            changed = ids.clone()
            changed[:, t + 1:] = torch.randint(2, 500, changed[:, t + 1:].shape, generator=g)
            assert torch.equal(train_gpt.ngram_buckets(changed, n, size)[:, : t + 1], buckets[:, : t + 1])
        # nothing crosses the BOS at 17: the first document's tokens do not reach the second's buckets
        changed = ids.clone()
        changed[0, 1:17] = torch.randint(2, 500, (16,), generator=g)
        assert torch.equal(train_gpt.ngram_buckets(changed, n, size)[0, 17:], buckets[0, 17:])
        # the first n-1 positions of each document have no full context: the reserved last bucket
        for start in (0, 17):
            assert (buckets[0, start:start + n - 1] == size - 1).all()
        assert (buckets[0, 19:] < size - 1).all() and len(set(buckets[0, 19:].tolist())) > 5


def test_hash_embeddings_are_causal_and_start_neutral():
    model = tiny_model(randomize=True, BIGRAM_TABLE_SIZE="256", TRIGRAM_TABLE_SIZE="128", HASH_EMBED_DIM="16")
    fresh = tiny_model(BIGRAM_TABLE_SIZE="256", TRIGRAM_TABLE_SIZE="128", HASH_EMBED_DIM="16")
    x, y = batch(model.args)
    assert torch.equal(fresh.hash_emb(x), torch.zeros(*x.shape, 32))  # zero-initialized projection
    with torch.no_grad():
        base = model(x, y, 3)[0]
        for t in (5, 20):
            x2, y2 = x.clone(), y.clone()
            x2[:, t + 1:] = (x2[:, t + 1:] + 7) % 500 + 2  # inputs after t
            y2[:, t:] = (y2[:, t:] + 7) % 500 + 2
            # losses at positions < t use inputs and targets up to t only
            assert torch.equal(model(x2, y2, 3)[0][:, :t], base[:, :t])
