"""Does the record path work on this GPU, and how fast is it? One command, one table, in about 15 minutes.

    python3 bench/gpu_check.py              # on a machine with one CUDA GPU
    python3 bench/gpu_check.py --smoke      # the same code at a tiny size on the CPU (CI runs it)

Every check is a run of train_gpt.py, packed as the README's record command packs it
(records/submission.py pack) and run as a record run runs it (torch.compile, flash attention only,
bf16 autocast), each in its own folder under --work, read back through its log lines:
- record: the default configuration (PR #1088) for a few steps at depth 2, then at depth 6, on
  one GPU accumulating 8 micro-batches (the 8-GPU global batch of 524,288 tokens). Its rows give
  ms/step, tokens/s, the model FLOPs of a step (PyTorch's FLOP counter on the meta device; the
  attention's S x S products counted whole, not halved for causality), MFU against the device's
  dense bf16 peak (which the table names; --peak-tflops for a device it does not know), the
  phase's peak memory, compiled graphs and recompiles after warmup (which must be 0), and the first
  training losses of the phase.
- looped: configs/looped_record.env, the 1.0810 looped record's design (11 blocks of 512, blocks 3-5
  looped), on the data's vocabulary, a few steps with one pass of its core group then with three
  (the switch at half of ITERATIONS), compiled; rows as the record check's.
- mod, deq, seed_lora: a few steps of each PR #1783 system at the record width.
- sliding_eval, ttt_eval: the score-first evaluations of a short run (TTT's graphs are compiled in
  the warmup too: compile_stats, logged after the last evaluation, must count no recompile).
- gptq: a few steps at the final depth, exported by GPTQ at int6 (QUANT_METHOD=gptq); the note gives
  its time (calibration and rounding) and the matrices it rounded.
Data: the challenge's sp1024 shards and tokenizer under ./data when present (the validation split
cut to --val-tokens, so the evaluations take seconds), else a dataset built from Python's own
documentation by data/build_local_dataset.py. A check fails on a non-zero exit, a missing or
non-finite log line, or a recompile after warmup; the script then exits with status 1.

--smoke runs the same checks at width 32 with depths 1 and 2 on the CPU: the record check still
compiles with the real Inductor backend (C++ code generation), so it also shows that Inductor lowers
every graph of a two-depth schedule, train and eval, without recompiling; the feature checks run
uncompiled to keep CI fast.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "data"))
sys.path.insert(0, str(REPO / "records"))

# Dense (not sparse) bf16 tensor-core peaks from NVIDIA's data sheets, by device-name fragment.
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
                    ("A100", 312.0), ("L40S", 362.1), ("A10G", 70.0))
RECORD_STEPS = 10  # per depth
FEATURE_STEPS = 4
LOOPED_ENV = REPO / "configs" / "looped_record.env"


@dataclass
class Check:
    name: str
    env: dict[str, str]
    expect: tuple[str, ...] = ()  # log lines (regexes) the check needs


def peak_tflops(device_name: str, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, f"{device_name} (--peak-tflops {override:g})"
    for fragment, tflops in BF16_PEAK_TFLOPS:
        if fragment in device_name:
            return tflops, f"{device_name}, dense bf16 peak {tflops:g} TFLOP/s"
    return None, f"{device_name} (bf16 peak unknown: MFU needs --peak-tflops)"


def prepare_data(work: Path, smoke: bool, data_path: Path, tokenizer: Path, val_tokens: int) -> dict[str, str]:
    """DATA_PATH, TOKENIZER_PATH and VOCAB_SIZE of the data the checks train on, as absolute paths
    (each run starts in its own folder)."""
    from shards import read_shard, write_shard

    data_path, tokenizer = data_path.resolve(), tokenizer.resolve()

    out = work / "data"
    if not smoke and tokenizer.is_file() and sorted(data_path.glob("fineweb_train_*.bin")):
        out.mkdir(parents=True)
        for shard in sorted(data_path.glob("fineweb_train_*.bin")):
            (out / shard.name).symlink_to(shard.resolve())
        val = read_shard(sorted(data_path.glob("fineweb_val_*.bin"))[0])
        write_shard(out / "fineweb_val_000000.bin", val[:val_tokens + 1])
        import sentencepiece as spm
        vocab = spm.SentencePieceProcessor(model_file=str(tokenizer)).vocab_size()
        return {"DATA_PATH": str(out), "TOKENIZER_PATH": str(tokenizer), "VOCAB_SIZE": str(vocab)}
    vocab, model = (512, work / "tokenizer_512.model") if smoke else (1024, work / "tokenizer_1024.model")
    cmd = [sys.executable, str(REPO / "data" / "build_local_dataset.py"), "--output-dir", str(out),
           "--tokenizer-out", str(model), "--vocab-size", str(vocab)] + (["--max-docs", "300"] if smoke else [])
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return {"DATA_PATH": str(out), "TOKENIZER_PATH": str(model), "VOCAB_SIZE": str(vocab)}


def plan(smoke: bool) -> list[Check]:
    """The checks: the record configuration and its features, or their tiny versions."""
    steps = 3 if smoke else RECORD_STEPS
    base = {"MAX_WALLCLOCK_SECONDS": "0", "VAL_LOSS_EVERY": "0", "TRAIN_LOG_EVERY": "1", "WARMUP_STEPS": "2",
            "EVAL_STRIDE": "0", "WARMDOWN_ITERS": "0", "SEED": "1337"}
    depths = (1, 2) if smoke else (2, 6)
    if smoke:
        base.update(MODEL_DIM="32", NUM_HEADS="4", NUM_KV_HEADS="2", MLP_MULT="2", TRAIN_SEQ_LEN="32",
                    TRAIN_BATCH_TOKENS="2048", VAL_BATCH_SIZE="4096", EVAL_SEQ_LEN="32")
    features = {**base, "NUM_LAYER_SCHEDULE": f"0:{depths[0]}", "ITERATIONS": str(FEATURE_STEPS),
                **({"TORCH_COMPILE": "0"} if smoke else {})}
    stride = "8" if smoke else "64"
    looped = {k: v for k, v in (line.split("=", 1) for line in LOOPED_ENV.read_text().splitlines()
                                 if line and not line.startswith("#")) if k not in ("DATA_PATH", "TOKENIZER_PATH", "VOCAB_SIZE")}
    looped.update(base, NUM_LAYER_SCHEDULE="0:1,0.5:3", ITERATIONS=str(2 * steps), EVAL_STRIDE=stride, TORCH_COMPILE="1",
                  GPTQ_RESERVE_SECONDS="0", TTT_ENABLED="0", **({"ROPE_DIMS": "4", "EVAL_SEQ_LEN": "32"} if smoke else {}))
    return [
        Check("record", {**base, "NUM_LAYER_SCHEDULE": f"0:{depths[0]},{steps}:{depths[1]}", "ITERATIONS": str(2 * steps),
                         "EVAL_STRIDE": stride, "TORCH_COMPILE": "1"},
              (r"^compile_stats unique_graphs:\d+ recompiles_after_warmup:0$", r"^final_sliding_window_exact ")),
        Check("looped", looped, (r"^compile_stats unique_graphs:\d+ recompiles_after_warmup:0$", r"^layer_plan depth:3 layers:17 ")),
        Check("mod", {**features, "MOD_CAPACITY": "0.125", "MOD_EVERY": "1"}, (r"^mod_routing causal_val_bpb:\S+ topk_val_bpb:\S+ ",)),
        Check("deq", {**features, "DEQ": "1", "DEQ_WARMUP_STEPS": "2", "DEQ_ITERS": "4", "EVAL_DEQ_ITERS": "6"},
              (r"^deq_residual eval_deq_iters:6 residual:[\d.]+$",)),
        Check("seed_lora", {**features, "SEED_LORA_RANK": "4" if smoke else "64"}, (r"^seed_lora targets:mlp ",)),
        Check("eval", {**features, "EVAL_STRIDE": stride, "TTT_ENABLED": "1", "TTT_CHUNK_TOKENS": "64" if smoke else "256",
                       "TTT_SLIDING_SCORE": "1"},
              (r"^final_sliding_window_exact ", r"^final_ttt_exact ", r"^ttt_adapted share:")),
        # GPTQ int6 at the final depth (at smoke width, an MLP wide enough to have matrices to round)
        Check("gptq", {**features, "NUM_LAYER_SCHEDULE": f"0:{depths[1]}", "QUANT_METHOD": "gptq", "QUANT_BITS": "6",
                       **({"MLP_MULT": "72", "MLP_LAYERS": "2", "GPTQ_CALIB_SEQS": "8"} if smoke else {})},
              (r"^gptq calibration:train_tokens .* matrices:[1-9]\d* .* time:\d+ms ",)),
    ]


def model_flops_per_token(env: dict[str, str], depth: int) -> float:
    """Forward + backward FLOPs per training token at `depth`, counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import train_gpt
    args = train_gpt.Hyperparameters(env)
    with torch.device("meta"):
        model = train_gpt.GPT(args)
        x = torch.zeros(1, args.train_seq_len, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        model(x, x, train_gpt.layer_plan(args, depth))[0].mean().backward()
    return counter.get_total_flops() / args.train_seq_len


def last(pattern: str, text: str) -> re.Match | None:
    found = list(re.finditer(pattern, text, re.M))
    return found[-1] if found else None


def read_rows(check: Check, log: str, peak: float | None) -> list[dict]:
    """The table rows of a finished run: one per depth phase for the record check, one per
    evaluation for the eval check, else one."""
    graphs = last(r"^compile_stats unique_graphs:(\d+) recompiles_after_warmup:(\d+)$", log)
    common = {"graphs": graphs.group(1) if graphs else "-", "recompiles": graphs.group(2) if graphs else "-"}
    losses = [(int(s), float(v)) for s, v in re.findall(r"^step:(\d+)/\d+ train_loss:(\S+) ", log, re.M)]
    batch_tokens = int(check.env.get("TRAIN_BATCH_TOKENS", 524_288))
    gptq = last(r"^gptq .* matrices:(\d+) .* time:(\d+)ms ", log)
    if gptq:
        common["note"] = f"GPTQ {gptq.group(2)}ms for {gptq.group(1)} matrices"
    if check.name == "eval":  # a row per evaluation; one that never logged its line has no "note"
        rows = []
        for label, key in (("sliding", "final_sliding_window"), ("ttt", "final_ttt")):
            m = last(rf"^{key} (?:stride:\d+ )?val_loss:\S+ val_bpb:(\S+) eval_time:(\d+)ms$", log)
            rows.append({**common, "check": f"{label}_eval", **({"note": f"eval {m.group(2)}ms val_bpb {m.group(1)}"} if m else {})})
        return rows
    rows, start, solve = [], 0, last(r"^deq_solve_start step:(\d+) ", log)
    for m in re.finditer(r"^phase_end depth:(\d+) steps:(\d+) phase_step_avg:(\S+)ms(?: peak_alloc:(\d+)MiB)?$", log, re.M):
        depth, steps, ms = int(m.group(1)), int(m.group(2)), float(m.group(3))
        first = [v for s, v in losses if start < s <= start + steps][:3]
        label = f"{depth} solve" if solve and start >= int(solve.group(1)) else str(depth)
        row = {**common, "check": check.name if check.name != "record" else f"record_d{depth}", "depth": label,
               "ms_step": f"{ms:.1f}", "tokens_s": f"{batch_tokens / ms * 1000:,.0f}", "peak_mib": m.group(4) or "-",
               "losses": ",".join(f"{v:.3f}" for v in first)}
        if check.name in ("record", "looped") and ms > 0:
            achieved = model_flops_per_token(check.env, depth) * batch_tokens / (ms / 1000)  # env has the data's vocab
            row["tflops"] = f"{achieved / 1e12:.3g}"
            row["mfu"] = f"{100 * achieved / (peak * 1e12):.1f}%" if peak else "-"
        rows.append(row)
        start += steps
    return rows


def run_check(check: Check, script: Path, data_env: dict[str, str], work: Path, peak: float | None,
              timeout: int) -> list[dict]:
    folder = work / check.name
    folder.mkdir(parents=True)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK"))},
           **data_env, **check.env, "RUN_ID": check.name}
    t0 = time.monotonic()
    try:
        result = subprocess.run([sys.executable, str(script)], cwd=folder, env=env,
                                capture_output=True, text=True, timeout=timeout)
        failure = None if result.returncode == 0 else \
            f"exit {result.returncode}: {(result.stderr.strip().splitlines() or ['no message'])[-1][:160]}"
    except subprocess.TimeoutExpired:
        failure = f"timed out after {timeout}s"
    log_path = folder / "logs" / f"{check.name}.txt"
    rows = judge(check, log_path.read_text(encoding="utf-8") if log_path.is_file() else "", failure, peak)
    rows[0]["wall_s"] = f"{time.monotonic() - t0:.0f}"  # the whole run: compile, training, export, evaluations
    return rows


def judge(check: Check, log: str, failure: str | None, peak: float | None) -> list[dict]:
    """The check's rows, each passed or failed: a run fails on `failure` (its exit), a missing
    expected line or a non-finite loss."""
    missing = [p for p in (*check.expect, r"^compliance ") if not re.search(p, log, re.M)]
    nonfinite = re.findall(r"^(\S+).*(?:loss|bpb):(nan|inf|-inf)\b", log, re.M)
    failure = failure or (f"no line {missing[0]!r}" if missing else f"non-finite {nonfinite[0][0]}" if nonfinite else None)
    rows = read_rows(check, log, peak) or [{"check": check.name}]
    for row in rows:
        # An evaluation that finished passes even when a later one fails (say, TTT timing out).
        finished = check.name == "eval" and "note" in row and not nonfinite
        row["result"] = "FAIL" if failure and not finished else "pass"
        row["note"] = row.get("note", "") if row["result"] == "pass" else failure
    return rows


COLUMNS = (("check", "check"), ("result", "result"), ("depth", "depth"), ("ms_step", "ms/step"), ("tokens_s", "tokens/s"),
           ("tflops", "TFLOP/s"), ("mfu", "MFU"), ("peak_mib", "peak MiB"), ("graphs", "graphs"),
           ("recompiles", "recompiles"), ("losses", "first losses"), ("wall_s", "run s"), ("note", "note"))


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row.get(key) or "-") for key, _ in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (for CI)")
    parser.add_argument("--data-path", type=Path, default=REPO / "data" / "datasets" / "fineweb10B_sp1024")
    parser.add_argument("--tokenizer-path", type=Path, default=REPO / "data" / "tokenizers" / "fineweb_1024_bpe.model")
    parser.add_argument("--val-tokens", type=int, default=1 << 19, help="validation tokens the evaluations score")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, when the table does not know it")
    parser.add_argument("--work", type=Path, help="keep the runs' folders here (default: a temporary folder)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per check")
    parser.add_argument("--only", nargs="+", metavar="CHECK", help="run only these checks (record looped mod deq seed_lora eval gptq)")
    args = parser.parse_args(argv)

    if args.smoke:
        import torch
        peak = (args.peak_tflops, f"CPU smoke run (torch {torch.__version__}), no bf16 peak: MFU -")
    else:  # asked in a child process, so this one never holds a CUDA context beside the runs
        probe = "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
        device = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip()
        if not device:
            print("error: no CUDA device; run with --smoke for the CPU version", file=sys.stderr)
            return 2
        peak = peak_tflops(device, args.peak_tflops)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    if args.work and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    checks = [c for c in plan(args.smoke) if not args.only or c.name in args.only]
    print(f"device: {peak[1]}", flush=True)
    from submission import pack
    script = work / "train_gpt.py"
    script.write_text(pack((REPO / "train_gpt.py").read_text(encoding="utf-8")), encoding="utf-8")
    print(f"script: {script} ({script.stat().st_size} bytes packed)", flush=True)
    data_env = prepare_data(work, args.smoke, args.data_path, args.tokenizer_path, args.val_tokens)
    print(f"data: {data_env['DATA_PATH']} (vocab {data_env['VOCAB_SIZE']})", flush=True)
    env = {"CUDA_VISIBLE_DEVICES": ""} if args.smoke else {}  # the smoke run stays on the CPU
    rows = []
    for check in checks:
        print(f"{check.name}: running", flush=True)
        check.env.update({**data_env, **env})
        rows += run_check(check, script, data_env, work, peak[0], args.timeout)
    print(table(rows))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    failed = sorted({row["check"] for row in rows if row["result"] == "FAIL"})
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
