"""ttt: score-first test-time training is causal, scores every position once, learns only from
chunks already scored, adapts documents independently, splits across ranks exactly, and
compiles before the clock."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch._dynamo

import train_gpt
from conftest import REPO, SEQ, TINY, UNET_STACK, run_script, sliding, stream, tiny_args, tiny_model, plan


def ttt(model, tokens, luts, **env):
    args = tiny_args(**{"EVAL_STRIDE": "8", "TTT_CHUNK_TOKENS": "64", "TTT_LR": "0.05", **env})
    score = train_gpt.eval_ttt(model, model, args, plan(model, 3), tokens, luts, per_position=True)
    return score.loss, score.bpb, score.per_position


TTT_MODES = {"lora-doc": {}, "lora-stream": {"TTT_RESET": "none"},
             "full-stream": {"TTT_MODE": "full", "TTT_RESET": "none", "TTT_LR": "0.01"},
             # the looped records' SGD TTT: 3 steps per chunk, the LR decayed by a cosine over the chunks
             "sgd-cosine": {"TTT_MODE": "full", "TTT_RESET": "none", "TTT_LR": "0.01", "TTT_STEPS": "3", "TTT_COSINE": "1"}}


def test_one_stream_of_ttt_takes_record_chunks_by_default_and_refuses_a_chunk_under_a_window():
    # One set of weights adapting over the stream (TTT_RESET=none, TTT_MODE=full's default) steps
    # after each chunk, with an all-reduce: PR #549's 32,768-token chunks by default; 256 tokens (the
    # per-document default) would mean ~242K steps on FineWeb.
    for overrides in ({"TTT_MODE": "full"}, {"TTT_RESET": "none"}):
        args = tiny_args(**overrides)
        assert (args.ttt_chunk_tokens, args.ttt_reset) == (32_768, "none")
        with pytest.raises(train_gpt.RunError) as error:
            tiny_args(**overrides, TTT_CHUNK_TOKENS="256", EVAL_SEQ_LEN="1024")
        message = str(error.value)
        assert message.startswith("TTT_CHUNK_TOKENS=256 is under EVAL_SEQ_LEN=1024") and "~242,272 on FineWeb" in message
        assert "\n" not in message
    assert (tiny_args().ttt_chunk_tokens, tiny_args().ttt_reset) == (256, "doc")


def test_ttt_adapts_every_block_of_the_plan_with_its_own_adapters():
    model = tiny_model(randomize=True, **UNET_STACK)
    layers = plan(model, 4)
    lora = train_gpt.LoRA(model, layers, lanes=2, rank=2, seed=0)
    rows = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 1]])  # window rows of lanes 0 and 1
    adapters = lora.mode(rows).adapters
    blocks = ["stem.0", "block", "decoder_block", "tail.0"]
    assert list(adapters) == ["head"] + [f"{b}.attns.{i}.{p}" for b in blocks for i in (0, 1) for p in ("c_q", "c_v")]
    x = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        base = model(x, x, layers)[0]
        assert torch.equal(model(x, x, layers, lora.mode(rows))[0], base)  # B = 0: the artifact's model
        for target in adapters:  # each adapter acts on its projection (the head's on the head) alone
            for k, key in lora.keys.items():
                lora.b[k].fill_(0.1 if key == target else 0.0)
            moved = model(x, x, layers, lora.mode(rows))[0]
            assert not torch.allclose(moved, base), target


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


def test_cosine_ttt_decays_the_lr_over_the_chunks_it_trains_on(luts, monkeypatch):
    lrs = []
    step = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda opt, *a: lrs.append(opt.param_groups[0]["lr"]) or step(opt, *a))
    ttt(tiny_model(randomize=True), stream(700), luts, **TTT_MODES["sgd-cosine"])
    chunks = (700 - 1) // 64 + 1  # the last chunk is scored, never trained on
    assert lrs == pytest.approx([0.01 * 0.5 * (1 + math.cos(math.pi * c / (chunks - 1))) for c in range(chunks - 1)
                                 for _ in range(3)])


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
    share = train_gpt.eval_ttt(model, model, args, plan(model, 3), tokens, luts).adapted
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
from conftest import stream, tiny_args, tiny_model
distributed = "RANK" in __import__("os").environ
if distributed:
    dist.init_process_group("gloo")
luts = train_gpt.ByteLUTs(torch.full((512,), 2, dtype=torch.int16), torch.zeros(512, dtype=torch.bool),
                          torch.zeros(512, dtype=torch.bool))
model = tiny_model(randomize=True)
tokens = stream(700, doc_every=90)
ranks = dict(rank=dist.get_rank(), world_size=2) if distributed else {{}}
layers = train_gpt.layer_plan(model.args, 3)
out = {{"sliding": train_gpt.evaluate(model, layers, tokens, luts, seq_len=32, stride=8, batch=4, **ranks)[:2]}}
for name, env in {modes!r}.items():
    args = tiny_args(**{{"EVAL_STRIDE": "8", "TTT_CHUNK_TOKENS": "64", "TTT_LR": "0.05", **env}})
    out[name] = train_gpt.eval_ttt(model, model, args, layers, tokens, luts, **ranks)[:3]
if not distributed or dist.get_rank() == 0:
    print(json.dumps(out))
if distributed:
    dist.barrier()  # no rank leaves while another may still be talking to it
    dist.destroy_process_group()
"""


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora-doc", "full-stream"])
def test_sliding_and_ttt_capture_in_one_graph_each(luts, mode):
    """The compiled evaluation paths (CUDA's) capture without graph breaks and give the eager scores."""
    torch._dynamo.reset()
    model = tiny_model(randomize=True)
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)  # as main() compiles
    tokens = stream(400, doc_every=90)
    args = tiny_args(**{"EVAL_STRIDE": "8", "TTT_CHUNK_TOKENS": "64", "TTT_LR": "0.05", **TTT_MODES[mode]})
    layers = plan(model, 3)
    for run in (lambda m: train_gpt.evaluate(m, layers, tokens, luts, seq_len=SEQ, stride=8, batch=8)[:2],
                lambda m: train_gpt.eval_ttt(m, model, args, layers, tokens, luts)[:3]):
        assert run(compiled) == pytest.approx(run(model), rel=1e-6)


@pytest.mark.slow
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
