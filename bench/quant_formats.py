"""Size and quantization gap of export formats on trained models, without retraining.

    env <the runs' model env> python3 bench/quant_formats.py [--formats NAME ...] \\
        artifacts/<RUN_ID>/final_model.pt [artifacts/<RUN_ID2>/final_model.pt ...]

artifacts/<RUN_ID>/final_model.pt is the float state dict a run writes before export (EMA applied
when on). The model shape and the data come from the environment, as for train_gpt.py; the depth
from the last phase of NUM_LAYER_SCHEDULE. For each model and format it prints the artifact bytes,
what storing the fp16 steps and float tensors as byte planes saved (against plain tensors),
the compressed bytes per parameter, the pre-training size estimate for this shape, and the
roundtrip val_bpb minus the float model's (plain evaluation, the baseline's metric). GPTQ formats
calibrate once per model, as a run does (GPTQ_CALIB_SEQS sequences from the start of the
training shards at the final depth), and print the rounding's time per million rounded
parameters. With several models (the same shape trained with different seeds), a last table
gives each format's mean and standard deviation over them. One process, on the CPU.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt  # noqa: E402
from eval_artifact import scoring_setup  # noqa: E402

GPTQ = {"QUANT_METHOD": "gptq"}
CLIP_SEARCH = {"GPTQ_CLIP_FACTORS": "1,0.95,0.9,0.85,0.8"}
FORMATS = {
    "int8+zlib": {},
    "int8+zstd": {"COMPRESSOR": "zstd"},
    "int7+zstd": {"QUANT_BITS": "7", "COMPRESSOR": "zstd"},
    "int6+zstd": {"QUANT_BITS": "6", "COMPRESSOR": "zstd"},
    "int6+zstd gptq": {"QUANT_BITS": "6", "COMPRESSOR": "zstd", **GPTQ},
    "int6+zstd gptq clipsearch": {"QUANT_BITS": "6", "COMPRESSOR": "zstd", **GPTQ, **CLIP_SEARCH},
    "int6+lzma": {"QUANT_BITS": "6", "COMPRESSOR": "lzma"},
    "int5+zstd": {"QUANT_BITS": "5", "COMPRESSOR": "zstd"},
    "int5+zstd gptq": {"QUANT_BITS": "5", "COMPRESSOR": "zstd", **GPTQ},
    "int5+zstd gptq clipsearch": {"QUANT_BITS": "5", "COMPRESSOR": "zstd", **GPTQ, **CLIP_SEARCH},
    "int4+zstd gptq": {"QUANT_BITS": "4", "COMPRESSOR": "zstd", **GPTQ},
    "int6a5m+zstd": {"ATTN_BITS": "6", "MLP_BITS": "5", "COMPRESSOR": "zstd"},
    "int6a5m+zstd gptq": {"ATTN_BITS": "6", "MLP_BITS": "5", "COMPRESSOR": "zstd", **GPTQ},
    "int6a4m+zstd gptq": {"ATTN_BITS": "6", "MLP_BITS": "4", "COMPRESSOR": "zstd", **GPTQ},
    "int6+zstd sdclip12.85/20": {"QUANT_BITS": "6", "COMPRESSOR": "zstd", "MATRIX_CLIP_SIGMAS": "12.85",
                                 "EMBED_CLIP_SIGMAS": "20"},
    "int6+zstd sdclip12.85/20 gptq": {"QUANT_BITS": "6", "COMPRESSOR": "zstd", "MATRIX_CLIP_SIGMAS": "12.85",
                                      "EMBED_CLIP_SIGMAS": "20", **GPTQ},
    "int6+brotli sdclip12.85/20 gptq": {"QUANT_BITS": "6", "COMPRESSOR": "brotli", "MATRIX_CLIP_SIGMAS": "12.85",
                                        "EMBED_CLIP_SIGMAS": "20", **GPTQ},
    "int6+lzma sdclip12.85/20 gptq": {"QUANT_BITS": "6", "COMPRESSOR": "lzma", "MATRIX_CLIP_SIGMAS": "12.85",
                                      "EMBED_CLIP_SIGMAS": "20", **GPTQ},
    "int6+zstd embed16": {"QUANT_BITS": "6", "COMPRESSOR": "zstd", "EMBED_BITS": "16"},
    "int6+zstd embed7 head6 gptq": {"QUANT_BITS": "6", "COMPRESSOR": "zstd", "EMBED_BITS": "7", "HEAD_BITS": "6", **GPTQ},
}


def without_byte_planes(state: dict, args, rounded) -> int:
    """The artifact's bytes with steps and float tensors stored as plain tensors, not byte planes."""
    obj = train_gpt.quantize_state_dict(state, args, rounded)
    plain = lambda d: {k: train_gpt.from_byte_planes(t) if t.dtype == torch.uint8 and k in obj["dtypes"] else t
                       for k, t in d.items()}
    obj["passthrough"], obj["steps"] = plain(obj["passthrough"]), {k: train_gpt.from_byte_planes(t) for k, t in obj["steps"].items()}
    buf = io.BytesIO()
    torch.save(obj, buf)
    return len(train_gpt.COMPRESSORS[args.compressor].compress(buf.getvalue()))


def measure(path: str, formats: list[str]) -> dict[str, tuple[int, float]]:
    """(artifact bytes, quant gap) of each format on the model at `path`."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    _, model, _, _, stage, plain = scoring_setup(state, torch.device("cpu"), path)
    score = lambda: plain()[1]
    float_bpb = score()
    params = sum(t.numel() for t in state.values())
    print(f"model:{path} depth:{stage.depth} params:{params} float val_bpb:{float_bpb:.6f}", flush=True)
    hessians, results = None, {}
    for name in formats:
        args = train_gpt.Hyperparameters({**os.environ, **FORMATS[name]})
        rounded, note = None, ""
        if args.quant_method == "gptq":
            if hessians is None:  # the inputs do not depend on the format: calibrate once per model
                t0 = time.perf_counter()
                model.load_state_dict(state, strict=True)
                hessians = train_gpt.gptq_hessians(model, args, train_gpt.train_shard_files(args.train_files), stage.plan,
                                                   torch.device("cpu"))
                print(f"calibration: {args.gptq_calib_seqs} training sequences, {len(hessians)} matrices, "
                      f"{time.perf_counter() - t0:.1f}s", flush=True)
            t0 = time.perf_counter()
            rounded = train_gpt.gptq_round(state, hessians, args)
            rounded_params = sum(codes.numel() for codes, _ in rounded.values())
            note = f" gptq_s_per_Mparam:{(time.perf_counter() - t0) / rounded_params * 1e6:.2f}"
        blob = train_gpt.serialize_artifact(state, args, rounded)
        estimate = train_gpt.estimate_artifact_bytes(state, args)
        model.load_state_dict(train_gpt.load_artifact(name, blob), strict=True)
        gap = score() - float_bpb
        results[name] = len(blob), gap
        planes = without_byte_planes(state, args, rounded) - len(blob)
        print(f"{name:30s} bytes:{len(blob)} byte_planes_saved:{planes} bytes_per_param:{len(blob) / params:.3f} "
              f"estimate:{estimate} ({estimate / len(blob) - 1:+.1%}) quant_gap_bpb:{gap:+.5f}{note}", flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="final_model.pt files of runs of one shape")
    parser.add_argument("--formats", nargs="+", choices=list(FORMATS), default=list(FORMATS), metavar="NAME",
                        help=f"formats to measure (default all): {', '.join(FORMATS)}")
    args = parser.parse_args(argv)
    runs = [measure(path, args.formats) for path in args.models]
    if len(runs) > 1:
        sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0
        print(f"\nmean over {len(runs)} models:\n| format | bytes | quant gap (bpb) |\n|---|---|---|")
        for name in args.formats:
            sizes, gaps = [r[name][0] for r in runs], [r[name][1] for r in runs]
            print(f"| {name} | {statistics.mean(sizes):,.0f} | {statistics.mean(gaps):+.5f} ± {sd(gaps):.5f} |")


if __name__ == "__main__":
    try:
        main()
    except train_gpt.RunError as e:
        sys.exit(f"error: {e}")
