"""EVALUATION: val_bpb as a direct computation gives it; sliding windows score every position
once, causally, and reduce to the plain evaluation at a stride of one window; a NaN score stops
the run."""
from __future__ import annotations

import math

import numpy as np
import pytest
import sentencepiece as spm
import torch

import train_gpt
from conftest import SEQ, TINY, run_patched, sliding, stream, tiny_args, tiny_model


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


@pytest.mark.parametrize("n,seq_len,stride", [(1000, 32, 8), (1024, 32, 32), (33, 32, 5), (10, 32, 4), (999, 64, 64)])
def test_windows_score_every_position_once(n, seq_len, stride):
    for floor in (0, 3):
        w = train_gpt.window_blocks(floor, floor, n, seq_len, stride, seq_len, lane=5)
        start, lo, hi, lane = w.T
        assert (lane == 5).all()
        assert lo[0] == floor and hi[-1] == n and np.array_equal(lo[1:], hi[:-1]) and (lo < hi).all()
        assert (start >= floor).all() and (start <= lo).all() and (hi - start <= seq_len).all()
        # Every block after the first has the full context the window can give it.
        assert (lo[1:] - start[1:] >= np.minimum(seq_len - stride, lo[1:] - floor)).all()


def test_window_tables_are_uploaded_once_per_evaluation_not_per_batch(luts, monkeypatch):
    # On CUDA each upload from pageable host memory synchronizes the stream; evaluation's loop
    # should queue its batches without one.
    model = tiny_model(randomize=True)
    tokens = stream(1000)
    uploads = []
    from_numpy = torch.from_numpy
    monkeypatch.setattr(train_gpt.torch, "from_numpy", lambda a: uploads.append(len(a)) or from_numpy(a))
    train_gpt.evaluate(model, tokens, luts, 1, SEQ, 8, 8)  # 122 windows: 16 batches of 8
    assert uploads == [122]


def test_sliding_is_causal_and_covers_the_stream(luts):
    model = tiny_model(randomize=True)
    tokens = stream(1000)
    loss, bpb, before = sliding(model, tokens, luts, stride=8)
    assert not before.isnan().any()
    assert loss == pytest.approx(before.mean().item(), rel=1e-12)  # each position counted once
    for t in (0, 37, 500, 990):
        changed = tokens.clone()
        changed[t + 1:] = stream(1000, seed=t + 1)[t + 1:]
        after = sliding(model, changed, luts, stride=8)[2]
        assert torch.equal(before[:t], after[:t])  # targets up to token t keep their scores bitwise
        assert not torch.equal(before[t:], after[t:])


def test_stride_equal_to_seq_len_is_the_plain_evaluation(luts):
    model = tiny_model(randomize=True)
    tokens = stream(20 * SEQ)
    x, y = train_gpt.inputs_and_targets(tokens, SEQ)
    model.eval()
    with torch.no_grad():
        direct = model(x, y, 3)[0].double().flatten()
    loss, _, per_position = sliding(model, tokens, luts, stride=SEQ)
    assert torch.equal(per_position, direct) and loss == pytest.approx(direct.mean().item(), rel=1e-12)


@pytest.mark.slow
def test_smaller_stride_scores_better_on_a_trained_model(luts):
    model = tiny_model(MODEL_DIM="64", NOISY_QAT="0")
    g = torch.Generator().manual_seed(0)
    # A period-45 sequence over 6 symbols: the next token depends on several earlier ones, so
    # positions with little context (early in a window) are hard to predict.
    data = torch.randint(4, 10, (45,), generator=g).repeat(60)
    x, y = train_gpt.inputs_and_targets(data[: 64 * SEQ + 1], SEQ)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)  # 1e-2 spikes late on some torch versions
    for _ in range(150):
        opt.zero_grad()
        model(x, y, 3)[0].mean().backward()
        opt.step()
    val = data[7 : 7 + 20 * SEQ + 1]
    plain, s16, s4 = (sliding(model, val, luts, stride=s)[0] for s in (SEQ, 16, 4))
    assert plain < 0.2 * math.log(6)  # it learned the sequence ...
    assert max(s16, s4) < 0.5 * plain  # ... and scores far better when every position has context


@pytest.mark.slow
def test_a_nan_validation_score_stops_the_run_without_an_artifact(tmp_path, dataset):
    patch = ("windows = train_gpt.eval_windows\n"
             "train_gpt.eval_windows = lambda *a, **k: windows(*a, **k) * float('nan')")
    result = run_patched(tmp_path, {**dataset, **TINY, "ITERATIONS": "2", "VAL_LOSS_EVERY": "0", "RUN_ID": "n"}, patch)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: the validation loss is nan")
    assert "compliance" not in result.stdout and not (tmp_path / "artifacts").exists()
