"""How far is train_gpt.py's startup size estimate from real artifacts?

    python3 bench/size_estimate.py --published             # the published record artifacts it is checked on
    python3 bench/size_estimate.py logs/*.txt              # finished runs of this script

For each finished run, the configuration is read from its log (as text, never executed), the
estimate recomputed with the current estimator for that configuration and the code bytes the
run counted, and set against the run's real total. --published does the same for the
challenge's published int8+zlib artifacts whose models this script can express, by their
configuration here and their logged bytes (code bytes left out: the estimate of the weights
against the weights). One table: estimate, actual, error.
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "records"))

# The challenge's naive baseline as this script's plain point (stem 4, one core pass, tail 4).
PLAIN = dict(NUM_STEM_BLOCKS="4", NUM_LAYER_SCHEDULE="0:1", NUM_TAIL_BLOCKS="4", MODEL_DIM="512", NUM_HEADS="8",
             NUM_KV_HEADS="4", MLP_MULT="2", MLP_LAYERS="2", ATTN_PER_BLOCK="1", UNET_SKIPS="1", TIE_EMBEDDINGS="1",
             NORM_BIAS="0")
# (name, configuration, "Serialized model int8+zlib" bytes from the record's log), openai/parameter-golf.
PUBLISHED = (
    ("PR #1088 UT_DoubleAttn_3L-MLP (the calibration)", {}, 15_928_510),
    ("NaiveBaseline", PLAIN, 15_815_847),
    ("LowerLR", PLAIN, 15_803_327),
    ("SlidingWindowEval", PLAIN, 15_816_489),
    *((f"LongContextSeq2048 {log}", PLAIN, size) for log, size in
      (("train", 15_819_554), ("seed1338", 15_813_523), ("seed1339", 15_814_036))),
    *((f"TrainingOptSeq4096 {log}", PLAIN, size) for log, size in
      (("train", 15_820_684), ("seed1338", 15_835_395), ("seed1339", 15_839_491))),
    *((f"LoRA_TTT {log}", PLAIN, size) for log, size in (("v0", 15_814_468), ("v2", 15_807_986), ("v3", 15_823_937))),
    ("FP16Embed_WD3600", {**PLAIN, "MLP_MULT": "1.9375", "EMBED_BITS": "16"}, 15_848_097),
    # The looped record (int6 GPTQ matrices, int8 GPTQ embedding, brotli): configs/looped_record.env
    # with its compressor, "Serialized model quantized+brotli" of its three seeds' logs.
    *((f"2026-04-09 SP8192_3LayerRecur seed{seed} (int6+brotli)", "looped_record", size) for seed, size in
      ((42, 15_975_300), (314, 15_976_325), (999, 15_976_638))),
)


@functools.cache
def looped_record_estimate() -> int:
    return estimate(looped_record())


def looped_record() -> dict[str, str]:
    lines = (REPO / "configs" / "looped_record.env").read_text().splitlines()
    return {**dict(line.split("=", 1) for line in lines if line and not line.startswith("#")), "COMPRESSOR": "brotli"}


def estimate(env: dict[str, str] | str) -> int:
    if env == "looped_record":
        return looped_record_estimate()
    import train_gpt
    args = train_gpt.Hyperparameters(env)
    args.validate(8)
    return train_gpt.estimate_artifact_bytes(train_gpt.GPT(args).state_dict(), args)


def from_log(path: Path) -> tuple[str, int, int]:
    import submission
    run = submission.parse_log(path)
    env = {k.upper(): submission.env_value(v) for k, v in run.config.items()}
    return str(path), estimate(env) + run.bytes_code, run.bytes_total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", nargs="*", help="finished train_gpt.py logs")
    parser.add_argument("--published", action="store_true", help="the published record artifacts")
    args = parser.parse_args(argv)
    if not args.logs and not args.published:
        parser.error("give logs, --published or both")
    rows = [(name, estimate(env), actual) for name, env, actual in PUBLISHED] if args.published else []
    rows += [from_log(Path(p)) for p in args.logs]
    print("| artifact | estimate | actual | error |\n|---|---:|---:|---:|")
    for name, est, actual in rows:
        print(f"| {name} | {est:,} | {actual:,} | {100 * (est / actual - 1):+.1f}% |")


if __name__ == "__main__":
    main()
