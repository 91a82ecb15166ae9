"""Score a finished run's artifact again with other evaluation settings, without retraining.

    env <the run's model env> EVAL_STRIDE=256 TTT_ENABLED=1 python3 bench/eval_artifact.py artifacts/<RUN_ID>/final_model.int8.ptz

The model shape comes from the environment (as for train_gpt.py), the depth from the last phase
of NUM_LAYER_SCHEDULE. Prints, for the plain, sliding-window and (with TTT_ENABLED=1) TTT
evaluations, val_loss, val_bpb, the wall time and the scored tokens per second. One process.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import sentencepiece as spm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt  # noqa: E402


def scoring_setup(state: dict, device: torch.device, source: str):
    """The model of the environment's shape holding `state`, the validation tokens, the byte
    tables, the last stage (its depth and layer plan), and the plain (baseline) evaluation of them."""
    args = train_gpt.Hyperparameters()
    args.validate()
    model = train_gpt.GPT(args).to(device)
    train_gpt.load_weights(model, state, source)
    val_tokens = train_gpt.load_validation_tokens(args.val_files, args.train_seq_len)
    luts = train_gpt.build_byte_luts(spm.SentencePieceProcessor(model_file=args.tokenizer_path), args.vocab_size, device)
    stage = train_gpt.run_stages(args)[-1]
    plain = lambda: train_gpt.evaluate(model, stage.plan, val_tokens, luts, seq_len=args.train_seq_len,
                                       stride=args.train_seq_len, batch=train_gpt.plain_eval_batch(args, 1))[:2]
    return args, model, val_tokens, luts, stage, plain


def main(path: str) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args, model, val_tokens, luts, stage, plain = scoring_setup(train_gpt.load_artifact(path), device, path)
    n = val_tokens.numel() - 1
    runs = {"plain": plain}
    if args.eval_stride:
        runs[f"sliding stride:{args.eval_stride}"] = lambda: train_gpt.evaluate(
            model, stage.plan, val_tokens, luts, seq_len=args.eval_seq_len, stride=args.eval_stride,
            batch=args.eval_batch_seqs)[:2]
    if args.ttt_enabled:
        runs[f"ttt {args.ttt_mode}/{args.ttt_reset}"] = lambda: train_gpt.eval_ttt(
            model, model, args, stage.plan, val_tokens, luts)[:2]
    print(f"artifact:{path} depth:{stage.depth} val_tokens:{n} device:{device.type}")
    for name, run in runs.items():
        t0 = time.perf_counter()
        loss, bpb = run()[:2]
        seconds = time.perf_counter() - t0
        print(f"{name:24s} val_loss:{loss:.8f} val_bpb:{bpb:.8f} eval_time:{seconds * 1000:.0f}ms "
              f"tokens_per_s:{n / seconds:.0f}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    try:
        main(sys.argv[1])
    except train_gpt.RunError as e:
        sys.exit(f"error: {e}")
