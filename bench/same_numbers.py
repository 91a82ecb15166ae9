"""Do two versions of train_gpt.py compute the same numbers? For changes of structure, not of
behaviour: a fixed set of tiny configurations (every system of the script, CPU, no compilation,
no wallclock cap, a few steps each) is run and each run's numeric log lines are kept, with
timings and code bytes removed, plus a digest of the exported weights' values; a later version
must reproduce them bitwise.

    python3 bench/same_numbers.py record -o bench_runs/numbers_before.json      # before the change
    python3 bench/same_numbers.py compare bench_runs/numbers_before.json        # after: exit 1 on a difference

`--script` runs another copy (a stripped one, say), `--only NAME ...` a subset of the configurations.
The data is a small local dataset built once under --work (Python's documentation, vocab 512).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE = {"VOCAB_SIZE": "512", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "MLP_MULT": "17",
        "MLP_LAYERS": "2", "TRAIN_SEQ_LEN": "32", "TRAIN_BATCH_TOKENS": "2048", "VAL_BATCH_SIZE": "4096",
        "NUM_LAYER_SCHEDULE": "0:1,3:2", "ITERATIONS": "6", "VAL_LOSS_EVERY": "3", "TRAIN_LOG_EVERY": "1",
        "WARMUP_STEPS": "0", "TORCH_COMPILE": "0", "MAX_WALLCLOCK_SECONDS": "0", "EVAL_STRIDE": "16", "SEED": "7"}
CONFIGS = {  # every system, each on top of BASE (MLP_MULT=17 makes the MLP big enough to be quantized)
    "default": {},
    "int6_ste_ema": {"QUANT_BITS": "6", "COMPRESSOR": "zstd", "QAT_MODE": "ste", "QAT_START_FRAC": "0.5",
                     "EMA_DECAY": "0.5", "MATRIX_CLIP_SIGMAS": "12.85", "EMBED_BITS": "16"},
    "grid_noise_warmdown": {"QAT_MODE": "grid_noise", "WARMDOWN_FRAC": "0.5", "MIN_LR_FRAC": "0.1", "GRAD_CLIP_NORM": "1"},
    "mod": {"MOD_CAPACITY": "0.5", "NUM_LAYER_SCHEDULE": "0:2,3:4"},
    "deq": {"DEQ": "1", "DEQ_WARMUP_STEPS": "3", "NUM_LAYER_SCHEDULE": "0:2", "DEQ_ITERS": "4", "EVAL_DEQ_ITERS": "6"},
    "seed_lora": {"SEED_LORA_RANK": "4", "SEED_LORA_TARGETS": "all"},
    "unet2": {"UNET_SKIPS": "1", "UNET_WEIGHTS": "2", "NUM_LAYER_SCHEDULE": "0:2,3:4"},
    "hash": {"BIGRAM_TABLE_SIZE": "64", "TRIGRAM_TABLE_SIZE": "64"},
    "stem_tail": {"NUM_STEM_BLOCKS": "1", "NUM_TAIL_BLOCKS": "1", "UNET_SKIPS": "1", "TIE_EMBEDDINGS": "1",
                  "NORM_BIAS": "0", "ATTN_PER_BLOCK": "1"},
    "ttt_lora": {"TTT_ENABLED": "1", "TTT_CHUNK_TOKENS": "64"},
    "ttt_full": {"TTT_ENABLED": "1", "TTT_MODE": "full", "TTT_RESET": "none", "TTT_CHUNK_TOKENS": "256"},
}
# Lines that carry numbers a change of structure must not move, and the fields of them that it may.
KEPT = re.compile(r"^(step:\d+/\d+ |model_params:|final_|quant_gap |ema |deq_residual |mod_routing |seed_lora |"
                  r"Serialized model |train_summary steps:|qat_start |layer_schedule_advance:|stopping_early)")
VARIABLE = re.compile(r" (?:train_time|step_avg|eval_time|tokens_per_s):\S+| \(code:\d+ bytes\)")


def numbers(log: str) -> list[str]:
    return [VARIABLE.sub("", line) for line in log.splitlines() if KEPT.match(line)]


def weights_digest(path: Path) -> str:
    """SHA-256 over the sorted digests of the exported float tensors: names may change, values not."""
    import torch
    state = torch.load(path, map_location="cpu", weights_only=True)
    digests = sorted(hashlib.sha256(t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()).hexdigest() + str(tuple(t.shape))
                     for t in state.values())
    return "final_weights sha256:" + hashlib.sha256("".join(digests).encode()).hexdigest()


def dataset(work: Path) -> dict[str, str]:
    out, model = work / "data", work / "tokenizer_512.model"
    if not (out / "build_local_dataset.json").is_file():
        subprocess.run([sys.executable, str(REPO / "data" / "build_local_dataset.py"), "--vocab-size", "512",
                        "--output-dir", str(out), "--tokenizer-out", str(model), "--max-docs", "300"],
                       check=True, capture_output=True, text=True)
    return {"DATA_PATH": str(out), "TOKENIZER_PATH": str(model)}


def run_all(script: Path, names: list[str], work: Path) -> dict[str, list[str]]:
    data, results = dataset(work), {}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    for name in names:
        folder = work / name
        shutil.rmtree(folder, ignore_errors=True)  # each run starts from an empty folder
        folder.mkdir(parents=True)
        run_env = {**env, "OMP_NUM_THREADS": "2", **data, **BASE, **CONFIGS[name], "RUN_ID": name}
        done = subprocess.run([sys.executable, str(script)], cwd=folder, env=run_env, capture_output=True, text=True)
        log = folder / "logs" / f"{name}.txt"
        if done.returncode != 0 or not log.is_file():
            raise SystemExit(f"error: {name} failed: {(done.stderr.strip().splitlines() or ['no log'])[-1]}")
        results[name] = numbers(log.read_text(encoding="utf-8")) + [
            weights_digest(folder / "artifacts" / name / "final_model.pt")]
        print(f"{name}: {len(results[name])} lines", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("record", "compare"))
    parser.add_argument("reference", nargs="?", help="compare: the file `record` wrote")
    parser.add_argument("-o", "--out", help="record: where the numbers go (JSON)")
    parser.add_argument("--script", default=str(REPO / "train_gpt.py"))
    parser.add_argument("--only", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--work", default="bench_runs/same_numbers", help="run folders and the dataset")
    args = parser.parse_args(argv)
    if (args.command == "record") != bool(args.out) or (args.command == "compare") != bool(args.reference):
        parser.error("record needs -o OUT; compare needs the reference file")
    reference = json.loads(Path(args.reference).read_text()) if args.reference else None
    results = run_all(Path(args.script).resolve(), args.only, Path(args.work).resolve())
    if reference is None:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"{out}: {sum(map(len, results.values()))} lines of {len(results)} configurations")
        return 0
    differ = 0
    for name, lines in results.items():
        want = reference.get(name)
        if want == lines:
            continue
        differ += 1
        first = next((i for i, (a, b) in enumerate(zip(want or [], lines)) if a != b), min(len(want or []), len(lines)))
        print(f"{name}: differs at line {first + 1}:\n  before: {(want or ['(missing)'] + [''])[first:first + 1]}\n"
              f"  after:  {lines[first:first + 1]}")
    print(f"{len(results) - differ}/{len(results)} configurations identical")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
