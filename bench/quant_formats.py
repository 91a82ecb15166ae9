"""Size and quantization gap of every export format on one trained model, without retraining.

    env <the run's model env> python3 bench/quant_formats.py artifacts/<RUN_ID>/final_model.pt

artifacts/<RUN_ID>/final_model.pt is the float state dict a run writes before export (EMA applied when on). The
model shape comes from the environment, as for train_gpt.py; the depth from the last phase of
NUM_LAYER_SCHEDULE. For each format it prints the artifact bytes, the compressed bytes per
parameter, the pre-training size estimate for this shape, and the roundtrip val_bpb
minus the float model's (plain evaluation, the baseline's metric). One process.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt  # noqa: E402
from eval_artifact import scoring_setup  # noqa: E402

FORMATS = {
    "int8+zlib": {},
    "int8+zstd": {"COMPRESSOR": "zstd"},
    "int7+zstd": {"QUANT_BITS": "7", "COMPRESSOR": "zstd"},
    "int6+zstd": {"QUANT_BITS": "6", "COMPRESSOR": "zstd"},
    "int6+lzma": {"QUANT_BITS": "6", "COMPRESSOR": "lzma"},
    "int5+zstd": {"QUANT_BITS": "5", "COMPRESSOR": "zstd"},
    "int6+zstd sdclip12.85/20": {"QUANT_BITS": "6", "COMPRESSOR": "zstd", "MATRIX_CLIP_SIGMAS": "12.85",
                                 "EMBED_CLIP_SIGMAS": "20"},
    "int6+zstd embed16": {"QUANT_BITS": "6", "COMPRESSOR": "zstd", "EMBED_BITS": "16"},
}


def main(path: str) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    _, model, _, _, depth, plain = scoring_setup(state, torch.device("cpu"), path)
    score = lambda: plain()[1]
    float_bpb = score()
    params = sum(t.numel() for t in state.values())
    print(f"model:{path} depth:{depth} params:{params} float val_bpb:{float_bpb:.6f}")
    for name, env in FORMATS.items():
        args = train_gpt.Hyperparameters({**os.environ, **env})
        blob = train_gpt.serialize_artifact(state, args)
        estimate = train_gpt.estimate_artifact_bytes(state, args)
        model.load_state_dict(train_gpt.load_artifact(name, blob), strict=True)
        gap = score() - float_bpb
        print(f"{name:26s} bytes:{len(blob)} bytes_per_param:{len(blob) / params:.3f} "
              f"estimate:{estimate} ({estimate / len(blob) - 1:+.1%}) quant_gap_bpb:{gap:+.5f}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    try:
        main(sys.argv[1])
    except train_gpt.RunError as e:
        sys.exit(f"error: {e}")
