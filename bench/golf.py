"""Golf benchmark: several configurations x seeds of train_gpt.py in turn, one table of medians.

    python3 bench/golf.py --config "default" --config "mod25 MOD_CAPACITY=0.25" --seeds 1337,42 \
        --base "DATA_PATH=data/datasets/local_sp1024 TOKENIZER_PATH=data/tokenizers/local_1024_bpe.model ..." \
        --out bench_runs/golf

Each --config is a name and env overrides on top of --base (the quickstart settings by default:
the local dataset, 300 s per run). Every run gets its own folder under --out and is read back
through its own log lines, so an interrupted benchmark continues where it stopped (finished
runs are kept). The table gives, per configuration, the median and spread (min..max) over seeds
of the roundtrip val_bpb, its quantization gap (roundtrip minus pre-quant) and the sliding-window
val_bpb, and medians of artifact bytes, the startup size estimate, steps, tokens/s and peak GPU
memory; with TTT (TTT_ENABLED=1 TTT_SLIDING_SCORE=1), also TTT's val_bpb, its gain over the sliding
score of the same run, and the share of the scored tokens predicted after their first update.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from train_gpt import setting_warnings  # noqa: E402
QUICKSTART = (f"DATA_PATH={REPO}/data/datasets/local_sp1024 TOKENIZER_PATH={REPO}/data/tokenizers/local_1024_bpe.model "
              "VOCAB_SIZE=1024 MODEL_DIM=256 NUM_HEADS=4 NUM_KV_HEADS=2 MLP_MULT=2 TRAIN_SEQ_LEN=256 "
              "TRAIN_BATCH_TOKENS=16384 VAL_BATCH_SIZE=65536 NUM_LAYER_SCHEDULE=0:2,60:4 WARMDOWN_ITERS=40 "
              "MAX_WALLCLOCK_SECONDS=300 VAL_LOSS_EVERY=0 TRAIN_LOG_EVERY=50 WARMUP_STEPS=0 TORCH_COMPILE=0")
METRICS = {  # name: (pattern, cast); each taken from the last matching line of a finished log
    "roundtrip": (r"^final_int\d_\w+_roundtrip_exact val_loss:\S+ val_bpb:(\S+)$", float),
    "sliding": (r"^final_sliding_window_exact stride:\d+ val_loss:\S+ val_bpb:(\S+)$", float),
    "ttt": (r"^final_ttt_exact val_loss:\S+ val_bpb:(\S+)$", float),
    "adapted": (r"^ttt_adapted share:(\S+) ", float),
    "gap": (r"^quant_gap \S+ val_bpb:(\S+) ", float),
    "estimate": (r"^size_check: total:\d+ cap:\d+ estimate:(\d+) ", int),
    "bytes": (r"^Total submission size \S+: (\d+) bytes$", int),
    "steps": (r"^train_summary steps:(\d+) ", int),
    "tokens_per_s": (r"^train_summary .* tokens_per_s:(\d+)$", int),
    "peak_mib": (r"^peak memory allocated: (\d+) MiB", int),
}


def env_pairs(text: str) -> dict[str, str]:
    pairs = {}
    for item in shlex.split(text):
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Z][A-Z0-9_]*", key):
            raise SystemExit(f"error: {item!r} is not NAME=value")
        pairs[key] = value
    return pairs


def read_metrics(log: Path) -> dict[str, float] | None:
    """The run's metrics, or None when its log has no compliance line (not finished)."""
    text = log.read_text(encoding="utf-8") if log.is_file() else ""
    if not re.search(r"^compliance ", text, re.M):
        return None
    out = {}
    for name, (pattern, cast) in METRICS.items():
        found = re.findall(pattern, text, re.M)
        if found:
            out[name] = cast(found[-1])
    if "ttt" in out and "sliding" in out:
        out["ttt_gain"] = out["ttt"] - out["sliding"]
    return out


def run(name: str, overrides: dict[str, str], seed: int, base: dict[str, str], out: Path, script: Path) -> dict[str, float]:
    folder = out / f"{name}_seed{seed}"
    log = folder / "logs" / "golf.txt"
    done = read_metrics(log)
    if done is not None:
        print(f"{folder.name}: finished earlier", flush=True)
        return done
    folder.mkdir(parents=True, exist_ok=True)
    if log.exists():
        log.unlink()  # an unfinished earlier attempt
    env = {**os.environ, **base, **overrides, "SEED": str(seed), "RUN_ID": "golf"}
    print(f"{folder.name}: running", flush=True)
    result = subprocess.run([sys.executable, str(script)], cwd=folder, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = read_metrics(log)
    if metrics is None:
        raise SystemExit(f"error: {folder.name} did not finish (exit {result.returncode}): "
                         f"{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'no message'}")
    return metrics


def table(results: dict[str, list[dict[str, float]]]) -> str:
    head = ("| config | seeds | roundtrip val_bpb (min..max) | quant gap (min..max) | sliding val_bpb (min..max) | bytes "
            "| estimate | steps | tokens/s | peak MiB |")
    rows = [head, "|---|---:|---|---|---|---:|---:|---:|---:|---:|"]
    ttt = any("ttt" in r for runs in results.values() for r in runs)
    if ttt:
        rows = [rows[0] + " ttt val_bpb (min..max) | ttt - sliding (min..max) | adapted |", rows[1] + "---|---|---:|"]
    for name, runs in results.items():
        def med(key: str, fmt: str) -> str:
            values = [r[key] for r in runs if key in r]
            return format(statistics.median(values), fmt) if values else "-"

        def spread(key: str, fmt: str = ".4f") -> str:
            values = [r[key] for r in runs if key in r]
            return (f"{statistics.median(values):{fmt}} ({min(values):{fmt}}..{max(values):{fmt}})" if values else "-")

        rows.append(f"| {name} | {len(runs)} | {spread('roundtrip')} | {spread('gap', '+.5f')} | {spread('sliding')} | "
                    f"{med('bytes', ',.0f')} | {med('estimate', ',.0f')} | {med('steps', '.0f')} | "
                    f"{med('tokens_per_s', ',.0f')} | {med('peak_mib', '.0f')} |"
                    + (f" {spread('ttt')} | {spread('ttt_gain', '+.4f')} | {med('adapted', '.3f')} |" if ttt else ""))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", required=True, help='"name NAME=value ..."')
    parser.add_argument("--seeds", default="1337", help="comma-separated")
    parser.add_argument("--base", default=QUICKSTART, help="env shared by every run")
    parser.add_argument("--out", default="bench_runs/golf")
    parser.add_argument("--script", default=str(REPO / "train_gpt.py"), help="a copy keeps edits out of a running benchmark")
    args = parser.parse_args(argv)
    base, seeds, out = env_pairs(args.base), [int(s) for s in args.seeds.split(",")], Path(args.out)
    configs = {}
    for spec in args.config:
        name, _, rest = spec.strip().partition(" ")
        if not re.fullmatch(r"[\w.-]+", name) or name in configs:
            raise SystemExit(f"error: config name {name!r} must be a unique word")
        configs[name] = env_pairs(rest)
        for warning in setting_warnings({**os.environ, **base, **configs[name]}):  # the check each run makes
            print(f"{name}: {warning}", flush=True)
    results = {name: [run(name, overrides, seed, base, out, Path(args.script).resolve()) for seed in seeds] for name, overrides in configs.items()}
    print(table(results))


if __name__ == "__main__":
    main()
