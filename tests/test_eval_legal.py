"""Score-first evaluation: sliding windows and test-time training are causal, score every position
once, reduce to the plain evaluation where they should, and split across ranks exactly."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm
import torch

import train_gpt
from conftest import REPO, TINY, run_script, tiny_args, tiny_model

SEQ = 32  # TINY's TRAIN_SEQ_LEN


@pytest.fixture(scope="module")
def luts(tmp_path_factory) -> train_gpt.ByteLUTs:
    prefix = tmp_path_factory.mktemp("tok") / "t"
    text = ["a quick brown fox jumps over the lazy dog number %d" % i for i in range(300)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(prefix), vocab_size=512,
                                   model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2, unk_id=3, pad_id=0,
                                   minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(prefix.with_suffix(".model")))
    return train_gpt.build_byte_luts(sp, 512, torch.device("cpu"))


def stream(n: int, seed: int = 0, doc_every: int = 0) -> torch.Tensor:
    """n + 1 random non-BOS tokens; with doc_every, documents of varying length starting with BOS."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, 512, (n + 1,), generator=g)
    if doc_every:
        pos = 0
        while pos <= n:
            tokens[pos] = train_gpt.BOS_ID
            pos += doc_every + int(torch.randint(0, doc_every, (1,), generator=g))
    return tokens


def sliding(model, tokens, luts, stride: int, seq_len: int = SEQ, batch: int = 8):
    per_position = torch.full((tokens.numel() - 1,), float("nan"), dtype=torch.float64)
    loss, bpb = train_gpt.evaluate(model, tokens, luts, 3, seq_len, stride, batch, per_position=per_position)
    return loss, bpb, per_position


def ttt(model, tokens, luts, **env):
    args = tiny_args(**{"EVAL_STRIDE": "8", "TTT_CHUNK_TOKENS": "64", "TTT_LR": "0.05", **env})
    per_position = torch.full((tokens.numel() - 1,), float("nan"), dtype=torch.float64)
    loss, bpb, _ = train_gpt.eval_ttt(model, model, args, 3, tokens, luts, per_position=per_position)
    return loss, bpb, per_position


TTT_MODES = {"lora-doc": {}, "lora-stream": {"TTT_RESET": "none"},
             "full-stream": {"TTT_MODE": "full", "TTT_RESET": "none", "TTT_LR": "0.01"}}


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


@pytest.mark.parametrize("mode", list(TTT_MODES))
def test_ttt_is_causal_and_scores_every_position_once(luts, mode):
    model = tiny_model(randomize=True)
    tokens = stream(700, doc_every=90)
    loss, _, before = ttt(model, tokens, luts, **TTT_MODES[mode])
    assert not before.isnan().any()
    assert loss == pytest.approx(before.mean().item(), rel=1e-12)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for t in (50, 200, 450):
        changed = tokens.clone()
        replace = changed[t + 1:] != train_gpt.BOS_ID  # documents keep their boundaries
        changed[t + 1:][replace] = stream(700, seed=t)[t + 1:][replace]
        after = ttt(model, changed, luts, **TTT_MODES[mode])[2]
        assert torch.equal(before[:t], after[:t]), mode
        assert not torch.equal(before[t:], after[t:])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # the model is restored


@pytest.mark.parametrize("mode", ["lora-stream", "full-stream"])
def test_ttt_learns_from_scored_chunks(luts, mode):
    """Chunk c's tokens change chunk c+1's scores only through the update after chunk c: the
    changed tokens lie outside every window of chunk c+1, and with TTT_LR=0 nothing changes."""
    model = tiny_model(randomize=True)
    tokens = stream(640)
    changed = tokens.clone()
    changed[130:150] = stream(640, seed=9)[130:150]  # chunk 2 is positions 128..191; chunk 3 sees 160-32..
    for lr, learns in (("0", False), (TTT_MODES[mode].get("TTT_LR", "0.05"), True)):
        env = {**TTT_MODES[mode], "TTT_LR": lr}
        a, b = ttt(model, tokens, luts, **env)[2], ttt(model, changed, luts, **env)[2]
        assert torch.equal(a[:129], b[:129])
        assert torch.equal(a[192:256], b[192:256]) != learns, (mode, lr)


def test_ttt_without_learning_is_the_sliding_evaluation(luts):
    model = tiny_model(randomize=True)
    tokens = stream(700)
    loss, bpb, per_position = ttt(model, tokens, luts, TTT_RESET="none", TTT_LR="0")
    s_loss, s_bpb, s_per_position = sliding(model, tokens, luts, stride=8)
    assert torch.equal(per_position, s_per_position)  # LoRA B starts at 0 and LR 0 keeps it there
    assert loss == pytest.approx(s_loss, rel=1e-12) and bpb == pytest.approx(s_bpb, rel=1e-12)


def test_ttt_adapts_documents_shorter_than_a_window_after_their_first_chunk(luts):
    """FineWeb's documents are mostly shorter than a window. Each is scored chunk by chunk from its
    start: only its first chunk is predicted before an update; every later position is predicted
    after one (its score differs from TTT at LR 0), and the logged share counts exactly those."""
    model = tiny_model(randomize=True)
    tokens = stream(700, doc_every=30)  # documents of 30-59 tokens, under EVAL_SEQ_LEN=64
    env = {"EVAL_SEQ_LEN": "64", "TTT_CHUNK_TOKENS": "16", "TTT_BATCH_DOCS": "8"}
    loss, _, adapted_scores = ttt(model, tokens, luts, **env)
    still = ttt(model, tokens, luts, **env, TTT_LR="0")[2]
    starts = torch.nonzero(tokens[:-1] == train_gpt.BOS_ID).flatten().tolist() + [700]
    first_chunk = torch.zeros(700, dtype=torch.bool)
    for s0, s1 in zip(starts, starts[1:]):
        assert s1 - s0 < 64
        first_chunk[s0 : s0 + 16] = True
    assert torch.equal(adapted_scores[first_chunk], still[first_chunk])  # scored before any update
    assert (adapted_scores[~first_chunk] != still[~first_chunk]).float().mean() > 0.99  # scored after one
    args = tiny_args(**{"EVAL_STRIDE": "8", "TTT_LR": "0.05", **env})
    share = train_gpt.eval_ttt(model, model, args, 3, tokens, luts).adapted
    assert share == pytest.approx((~first_chunk).sum().item() / 700, abs=1e-12) and share > 0.6


def test_ttt_documents_adapt_independently(luts):
    model = tiny_model(randomize=True)
    tokens = stream(700, doc_every=90)
    starts = torch.nonzero(tokens[:-1] == train_gpt.BOS_ID).flatten().tolist()
    first, second = starts[2], starts[3]  # change the inside of the third document only
    changed = tokens.clone()
    changed[first + 1 : second] = stream(700, seed=5)[first + 1 : second]
    a, b = ttt(model, tokens, luts, TTT_BATCH_DOCS="3")[2], ttt(model, changed, luts, TTT_BATCH_DOCS="3")[2]
    outside = torch.ones_like(a, dtype=torch.bool)
    outside[first:second] = False
    assert torch.equal(a[outside], b[outside]) and not torch.equal(a[~outside], b[~outside])


WORKER = """
import json, sys, torch, torch.distributed as dist
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
import train_gpt
from conftest import tiny_args, tiny_model
from test_eval_legal import stream
distributed = "RANK" in __import__("os").environ
if distributed:
    dist.init_process_group("gloo")
luts = train_gpt.ByteLUTs(torch.full((512,), 2, dtype=torch.int16), torch.zeros(512, dtype=torch.bool),
                          torch.zeros(512, dtype=torch.bool))
model = tiny_model(randomize=True)
tokens = stream(700, doc_every=90)
out = {{"sliding": train_gpt.evaluate(model, tokens, luts, 3, 32, 8, 4, *((dist.get_rank(), 2) if distributed else ()))}}
for name, env in {modes!r}.items():
    args = tiny_args(**{{"EVAL_STRIDE": "8", "TTT_CHUNK_TOKENS": "64", "TTT_LR": "0.05", **env}})
    out[name] = train_gpt.eval_ttt(model, model, args, 3, tokens, luts, *((dist.get_rank(), 2) if distributed else ()))
if not distributed or dist.get_rank() == 0:
    print(json.dumps(out))
if distributed:
    dist.barrier()  # no rank leaves while another may still be talking to it
    dist.destroy_process_group()
"""


def test_two_gloo_ranks_give_the_same_totals(tmp_path):
    # Per-document TTT gives each rank whole groups of documents (two groups of three here); one
    # stream splits every chunk's windows over the ranks.
    modes = {**TTT_MODES, "lora-doc-groups": {"TTT_BATCH_DOCS": "3"}}
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(repo=str(REPO), tests=str(REPO / "tests"), modes=modes))
    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")},
           "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    a, b = json.loads(one.stdout.strip().splitlines()[-1]), json.loads(two.stdout.strip().splitlines()[-1])
    assert a.keys() == b.keys() == {"sliding", *modes}
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-6), key
    assert a["lora-doc"][0] != a["sliding"][0]  # TTT changed the scores


@pytest.mark.parametrize("mode", ["lora-doc", "full-stream"])
def test_sliding_and_ttt_capture_in_one_graph_each(luts, mode):
    """The compiled evaluation paths (CUDA's) capture without graph breaks and give the eager scores."""
    torch._dynamo.reset()
    model = tiny_model(randomize=True)
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)  # as main() compiles
    tokens = stream(400, doc_every=90)
    args = tiny_args(**{"EVAL_STRIDE": "8", "TTT_CHUNK_TOKENS": "64", "TTT_LR": "0.05", **TTT_MODES[mode]})
    for run in (lambda m: train_gpt.evaluate(m, tokens, luts, 3, SEQ, 8, 8),
                lambda m: train_gpt.eval_ttt(m, model, args, 3, tokens, luts)):
        assert run(compiled) == pytest.approx(run(model), rel=1e-6)


def test_ttt_compiles_before_the_clock_and_its_evaluation_never_recompiles(tmp_path, dataset):
    """With Inductor (C++ code generation on the CPU), TTT's scoring and adapting graphs are
    compiled during the warmup, on synthetic tokens, at TTT's one batch shape: compile_stats,
    logged after TTT's evaluation, counts no recompile."""
    env = {**dataset, **TINY, "TORCH_COMPILE": "1", "NUM_LAYER_SCHEDULE": "0:1", "ITERATIONS": "2", "WARMUP_STEPS": "1",
           "VAL_LOSS_EVERY": "0", "MAX_WALLCLOCK_SECONDS": "0", "EVAL_STRIDE": "8", "TTT_ENABLED": "1",
           "TTT_CHUNK_TOKENS": "16", "TTT_BATCH_DOCS": "5", "RUN_ID": "ttt"}
    result = run_script(tmp_path, env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "device:cpu compile:True" in out
    stats = re.search(r"^compile_stats unique_graphs:(\d+) recompiles_after_warmup:(\d+)$", out, re.M)
    assert stats and out.index("final_ttt_exact") < stats.start(), out[-2000:]
    assert int(stats.group(1)) > 0 and stats.group(2) == "0", stats.group(0)
    assert re.search(r"^compliance .* sliding_window:skipped_for_ttt .* score:final_ttt_exact ", out, re.M)
