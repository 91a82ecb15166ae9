"""Project the final evaluations' time on 8xH100 from FLOPs, for the configuration in the environment.

    python3 bench/eval_cost.py                      # record config, FineWeb-sized validation
    EVAL_STRIDE=256 TTT_RESET=none python3 bench/eval_cost.py

FLOPs per window are counted by torch's FlopCounterMode on one forward of EVAL_SEQ_LEN tokens
at the final depth of NUM_LAYER_SCHEDULE (matmuls and attention; elementwise work is not counted).
The number of windows each evaluation runs comes from train_gpt's own window planner, over the
documents of DATA_PATH's validation shards when they exist, else over VAL_TOKENS tokens cut into
VAL_DOCS equal documents (the FineWeb validation split: 62,021,632 tokens, 50,000 documents); a
batch always has EVAL_BATCH_SEQS windows (one compiled shape), so each call's windows, split over 8
ranks, are counted in whole batches on the busiest rank: for TTT, TTT's own plan, chunk by chunk.
Time is FLOPs divided by a rate calibrated on the PR #1088 record itself: 124 ms per
524,288-token training step at depth 6 on 8xH100, with a training step costing 3 forwards.
"""
from __future__ import annotations

import glob
import itertools
import math
import os
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt  # noqa: E402

RECORD_STEP_S, RECORD_STEP_TOKENS, RECORD_DEPTH = 0.124, 524_288, 6
VAL_TOKENS = int(os.environ.get("VAL_TOKENS", 62_021_632))
VAL_DOCS = int(os.environ.get("VAL_DOCS", 50_000))


def forward_flops(model: train_gpt.GPT, seqs: int, seq_len: int, plan: tuple) -> float:
    x = torch.zeros(seqs, seq_len, dtype=torch.int64)
    with FlopCounterMode(display=False) as counter:  # (its module tracker fails under no_grad)
        model(x, x, plan)
    return float(counter.get_total_flops())


def doc_lengths(args: train_gpt.Hyperparameters) -> tuple[list[int], str]:
    if glob.glob(args.val_files):
        tokens = train_gpt.load_validation_tokens(args.val_files, args.train_seq_len)
        return [s1 - s0 for s0, s1 in train_gpt.doc_segments(tokens)], f"the documents of {args.val_files}"
    size = VAL_TOKENS // VAL_DOCS
    return [size] * (VAL_DOCS - 1) + [VAL_TOKENS - size * (VAL_DOCS - 1)], f"{VAL_TOKENS:,} tokens in {VAL_DOCS:,} equal documents"


RANKS = 8


def padded(windows: int, batch: int) -> int:
    """Window forwards, over all ranks, of one call scoring `windows` split over RANKS ranks."""
    return RANKS * batch * math.ceil(math.ceil(windows / RANKS) / batch)


def ttt_forwards(lengths: list[int], args: train_gpt.Hyperparameters) -> int:
    """TTT's window forwards, RANKS times those of the busiest rank: each chunk's scoring call, and
    its training call (forward and backward, 3 forwards) TTT_STEPS times; per document, each rank
    runs whole groups of documents, every RANKS-th; one stream splits each call over the ranks."""
    ends = list(itertools.accumulate(lengths))
    busy, (score_batch, train_batch) = [0] * RANKS, train_gpt.ttt_batch_rows(args, RANKS)
    for g, group in enumerate(train_gpt.ttt_groups(list(zip([0] + ends[:-1], ends)), args)):
        for score, train in train_gpt.ttt_steps(group, args):
            calls = [(len(score), 1, score_batch)] + ([] if train is None else [(len(train), 3 * args.ttt_steps, train_batch)])
            for windows, cost, batch in calls:
                if args.ttt_reset == "doc":
                    busy[g % RANKS] += cost * batch * math.ceil(windows / batch)
                else:
                    busy = [b + cost * padded(windows, batch) // RANKS for b in busy]
    return RANKS * max(busy)


def main() -> None:
    args = train_gpt.Hyperparameters()
    args.validate(8)
    stage, seq_len = train_gpt.run_stages(args)[-1], args.eval_seq_len
    model = train_gpt.GPT(args).requires_grad_(False)
    per_window = forward_flops(model, 1, seq_len, stage.plan)
    rate = 3 * forward_flops(model, 1, args.train_seq_len, train_gpt.layer_plan(args, RECORD_DEPTH)) * RECORD_STEP_TOKENS / args.train_seq_len / RECORD_STEP_S
    lengths, source = doc_lengths(args)
    n = sum(lengths)
    stride, chunk = args.eval_stride or seq_len, args.ttt_chunk_tokens
    windows = lambda length, size, step: len(train_gpt.window_blocks(0, 0, length, size, step, size))
    modes = {
        "roundtrip": padded(windows(n, args.train_seq_len, args.train_seq_len), train_gpt.plain_eval_batch(args, RANKS))
                     * args.train_seq_len / seq_len,
        f"sliding stride:{stride}": padded(windows(n, seq_len, stride), args.eval_batch_seqs),
        f"ttt {args.ttt_mode}/{args.ttt_reset} chunk:{chunk} steps:{args.ttt_steps}": ttt_forwards(lengths, args),
    }
    print(f"config: model_params:{sum(p.numel() for p in model.parameters())} depth:{stage.depth} eval_seq_len:{seq_len} "
          f"forward_flops_per_token:{per_window / seq_len:.4g}")
    print(f"validation: {source} ({n:,} positions)")
    print(f"calibration: {rate / 8 / 1e12:.1f} TFLOP/s per GPU, from the record's {RECORD_STEP_S * 1000:.0f} ms "
          f"training step at depth {RECORD_DEPTH}")
    for name, window_equivalents in modes.items():
        seconds = window_equivalents * per_window / rate
        print(f"{name:48s} window_forwards:{window_equivalents:14,.0f} projected_8xH100:{seconds:7.1f}s")


if __name__ == "__main__":
    main()
