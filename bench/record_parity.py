"""The looped record's design, run two ways on a CPU: train_gpt.py with configs/looped_record.env,
and the record's own script (a path you fetched; nothing of it is stored here), on the same local
data at the same tiny size, for a few seeds. One table: each side's median and spread of the
pre-quantization, roundtrip and sliding-window val_bpb.

    python3 bench/record_parity.py --record PATH/train_gpt.py --seeds 1337,42,2025 --out bench_runs/parity

The record's train_gpt.py (openai/parameter-golf, records/track_10min_16mb/
2026-04-09_SP8192_3LayerRecur_ParResid_QK525_LegalTTT) is an lzma+base85 self-extracting file that
needs Python 3.12 and FA3; it is decoded and run by --python (a 3.12 with torch) with a stand-in
for `flash_attn_interface` (SDPA on the same layout) and a few textual edits for a machine without
CUDA, each of which must match (see PATCHES): the device is the CPU, compilation is off, and the
model runs in fp32 (the record casts it to bf16, which a CPU runs far slower), as does ours here.
Both sides train ITERATIONS steps with no wallclock cap, so the loop starts and the warmdown runs
at the same fractions of the run on both (35%, the last 72%). Both draw their training sequences at
random from the local shards as built (stored by topic): the record with its per-rank sampler, ours
with TRAIN_SHUFFLE=1 (configs/looped_record.env). The record runs at its published QK_GAIN_INIT=5.25.
What still differs: the record's compressor (brotli here, ours zstd), the sequences each draws, and
GPTQ's calibration tokens (the record's are drawn at random, ours are the stream's first). Runs
are kept under --out and reused: an interrupted benchmark continues.
"""
from __future__ import annotations

import argparse
import base64
import json
import lzma
import os
import re
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECORD_ENV = REPO / "configs" / "looped_record.env"
# The tiny size both sides run at (each side's names): width 192 (the MLP's matrices are large
# enough to be quantized, attention's are kept float by both), head dim 64 (RoPE on 16 of 64 as in
# the record), sequences of 128, 8,192 tokens per step in 8 micro-batches.
SIZE = {"MODEL_DIM": "192", "NUM_HEADS": "3", "NUM_KV_HEADS": "1", "TRAIN_SEQ_LEN": "128", "EVAL_SEQ_LEN": "128",
        "TRAIN_BATCH_TOKENS": "8192", "MAX_WALLCLOCK_SECONDS": "0", "WARMUP_STEPS": "2", "TRAIN_LOG_EVERY": "50",
        "VAL_LOSS_EVERY": "0", "EVAL_STRIDE": "64", "EMA_DECAY": "0.9"}  # the record's 0.9965 is a 285-step horizon
OURS = {"TTT_ENABLED": "0", "VAL_BATCH_SIZE": "65536", "GPTQ_CALIB_SEQS": "16", "GPTQ_RESERVE_SECONDS": "0", "TORCH_COMPILE": "0"}
THEIRS = {"EMBEDDING_DIM": SIZE["MODEL_DIM"], "VAL_BATCH_TOKENS": "65536", "GPTQ_CALIBRATION_BATCHES": "2", "GPTQ_RESERVE_SECONDS": "0",
          "ROPE_TRAIN_SEQ_LEN": "128", "TTT_ENABLED": "0", "QK_GAIN_INIT": "5.25"}  # its run command's gain
# Textual edits of the decoded record script: (what, pattern, replacement); each must match.
PATCHES = [
    ("the CPU instead of CUDA", r"torch\.device\('cuda',\s*(?:h\.)?local_rank\)", "torch.device('cpu')"),
    ("main's CUDA check", r"if not torch\.cuda\.is_available\(\):", "if False:"),
    ("fp32 weights", r"\.bfloat16\(\)", ".float()"),
]
PRELUDE = '''import sys, types, torch, torch.nn.functional as _F
def _flash_attn_func(q, k, v, causal=True, **_):  # FA3's (batch, seq, heads, dim) layout, by SDPA
    y = _F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                                        enable_gqa=q.size(2) != k.size(2))
    return y.transpose(1, 2)
sys.modules["flash_attn_interface"] = types.SimpleNamespace(flash_attn_func=_flash_attn_func)
torch.compile = lambda fn=None, **_: fn if fn is not None else (lambda f: f)
for _name in ("synchronize", "set_device", "manual_seed_all", "empty_cache"):
    setattr(torch.cuda, _name, lambda *a, **k: None)
torch.cuda.max_memory_allocated = torch.cuda.max_memory_reserved = lambda *a, **k: 0
import subprocess as _subprocess
_run = _subprocess.run
_subprocess.run = lambda cmd, *a, **k: (_subprocess.CompletedProcess(cmd, 0, "", "") if cmd[:1] == ["nvidia-smi"]
                                        else _run(cmd, *a, **k))
'''
METRICS = {
    "ours": {"prequant": r"^final_prequant_exact val_loss:\S+ val_bpb:(\S+)$",
             "roundtrip": r"^final_int\d\w*_roundtrip_exact val_loss:\S+ val_bpb:(\S+)$",
             "sliding": r"^final_sliding_window_exact stride:\d+ val_loss:\S+ val_bpb:(\S+)$"},
    "record": {"prequant": r"^pre-quantization post-ema val_loss:\S+ val_bpb:(\S+) ",
               "roundtrip": r"^quantized val_loss:\S+ val_bpb:(\S+) ",
               "sliding": r"^quantized_sliding_window val_loss:\S+ val_bpb:(\S+) "},
}


def decode(path: Path) -> str:
    """The record's source: the file itself, or what its lzma+base85 wrapper executes."""
    text = path.read_text(encoding="utf-8")
    packed = re.search(r"b85decode\((['\"])(.+?)\1\)", text, re.S)
    if not packed:
        return text
    data = base64.b85decode(packed.group(2))
    try:
        return lzma.decompress(data).decode("utf-8")
    except lzma.LZMAError:
        return lzma.decompress(data, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}]).decode("utf-8")


def for_cpu(source: str) -> str:
    """The record's source with the stand-ins and edits a CPU run needs; an edit that finds nothing
    is an error (the script is not the one these edits were written for)."""
    for what, pattern, replacement in PATCHES:
        source, n = re.subn(pattern, replacement, source)
        if not n:
            raise SystemExit(f"error: the record script has no match for {what} ({pattern}): another version?")
    return PRELUDE + source


def local_data(out: Path, vocab: int) -> tuple[Path, Path]:
    """A local dataset in the layout both scripts read: DATA_DIR/datasets/fineweb10B_sp{vocab} and
    DATA_DIR/tokenizers/fineweb_{vocab}_bpe.model."""
    shards, model = out / "datasets" / f"fineweb10B_sp{vocab}", out / "tokenizers" / f"fineweb_{vocab}_bpe.model"
    if not (shards / "built").is_file():
        model.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(REPO / "data" / "build_local_dataset.py"), "--vocab-size", str(vocab),
                        "--output-dir", str(shards), "--tokenizer-out", str(model), "--force"], check=True)
        (shards / "built").write_text("the local corpus as data/build_local_dataset.py builds it\n")
    return shards, model


def record_env() -> dict[str, str]:
    return dict(line.split("=", 1) for line in RECORD_ENV.read_text().splitlines() if line and not line.startswith("#"))


def run(side: str, folder: Path, cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """One run in its folder (kept when it finished: its metrics are read back)."""
    log = folder / "run.log"
    if not (log.is_file() and all(re.search(p, log.read_text(), re.M) for p in METRICS[side].values())):
        folder.mkdir(parents=True, exist_ok=True)
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK"))}
        with open(log, "w") as f:
            done = subprocess.run(cmd, cwd=folder, env={**clean, **env}, stdout=f, stderr=subprocess.STDOUT)
        if done.returncode:
            raise SystemExit(f"error: {side} run in {folder} failed ({done.returncode}): see {log}")
    text = log.read_text()
    return {k: float(re.findall(p, text, re.M)[-1]) for k, p in METRICS[side].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", type=Path, required=True, help="the record's train_gpt.py, as fetched")
    parser.add_argument("--python", default="python3.12", help="a Python 3.12 with torch, numpy and sentencepiece")
    parser.add_argument("--seeds", default="1337,42,2025")
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--set", default="", help="more overrides for both sides, e.g. 'NUM_LOOPS=...' (shell words)")
    parser.add_argument("--out", type=Path, default=REPO / "bench_runs" / "record_parity")
    args = parser.parse_args()
    if not args.record.is_file():
        raise SystemExit(f"error: --record {args.record} does not exist")
    args.out = args.out.resolve()  # runs happen in their own folders
    args.out.mkdir(parents=True, exist_ok=True)
    script = args.out / "record_cpu.py"
    script.write_text(for_cpu(decode(args.record)))
    shards, model = local_data(args.out / "data", args.vocab)
    common = {**SIZE, "ITERATIONS": str(args.iterations), "VOCAB_SIZE": str(args.vocab),
              **dict(w.split("=", 1) for w in shlex.split(args.set))}
    results: dict[str, list[dict[str, float]]] = {"ours": [], "record": []}
    for seed in args.seeds.split(","):
        ours = {**record_env(), **OURS, **common, "SEED": seed, "RUN_ID": f"ours{seed}", "DATA_PATH": str(shards),
                "TOKENIZER_PATH": str(model)}
        results["ours"].append(run("ours", args.out / f"ours_{seed}", [sys.executable, str(REPO / "train_gpt.py")], ours))
        theirs = {**THEIRS, **common, "SEED": seed, "RUN_ID": f"record{seed}", "DATA_DIR": str(args.out / "data") + "/"}
        results["record"].append(run("record", args.out / f"record_{seed}", [args.python, str(script.resolve())], theirs))
        print(f"seed {seed}: ours {results['ours'][-1]}  record {results['record'][-1]}", flush=True)
    print("| side | runs | prequant val_bpb | roundtrip val_bpb | sliding val_bpb |\n|---|---|---|---|---|")
    for side, runs in results.items():
        cells = []
        for metric in ("prequant", "roundtrip", "sliding"):
            values = [r[metric] for r in runs]
            cells.append(f"{statistics.median(values):.4f} ({min(values):.4f}..{max(values):.4f})")
        print(f"| {side} | {len(runs)} | " + " | ".join(cells) + " |")
    (args.out / "parity.json").write_text(json.dumps({"settings": common, "results": results}, indent=1))


if __name__ == "__main__":
    main()
