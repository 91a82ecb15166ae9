"""gptq: GPTQ export lowers the output error of a matrix below round-to-nearest's on the same
grid; the shared block's Hessian sums every pass; calibration reads training tokens only (an
artifact does not change with the validation split); a capped run reserves GPTQ's time."""
from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import pytest
import torch

import train_gpt
from conftest import REPO, run_patched, run_script, tiny_args, tiny_model

sys.path.insert(0, str(REPO / "data"))
from shards import read_shard, write_shard  # noqa: E402


def correlated_inputs(n: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
    return (torch.randn(n, cols, generator=g) * torch.linspace(0.2, 3.0, cols)) @ mix


@pytest.mark.parametrize("bits", [4, 6])
@pytest.mark.parametrize("act_order", ["0", "1"])
def test_gptq_rounds_with_less_output_error_than_nearest_on_the_same_grid(bits, act_order):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 256, generator=g) * torch.linspace(0.5, 2.0, 96)[:, None]
    x = correlated_inputs(4096, 256)
    clip = w.abs().amax(dim=1)
    args = tiny_args(GPTQ_CLIP_FACTORS="1", GPTQ_ACT_ORDER=act_order, GPTQ_BLOCK="32")
    codes, step = train_gpt.gptq_rows(w, bits, clip, x.T @ x, args)
    rtn_codes, rtn_step = train_gpt.quantize_rows(w, bits, clip)
    assert torch.equal(step, rtn_step)  # one grid: only the rounding differs
    assert torch.equal(codes, codes.round()) and codes.abs().max() <= train_gpt.qmax(bits)
    out_err = lambda c, s: (x @ (c * s.float()[:, None] - w).T).square().sum()
    assert out_err(codes, step) < 0.7 * out_err(rtn_codes, rtn_step)


def test_the_clip_search_keeps_each_rows_best_clip():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 128, generator=g)
    w[::2, 0] = 8.0  # an outlier in every other row: a narrower clip pays off there
    x = correlated_inputs(2048, 128, seed=3)
    h, clip = x.T @ x, w.abs().amax(dim=1)
    _, step = train_gpt.gptq_rows(w, 4, clip, h, tiny_args(GPTQ_CLIP_FACTORS="1,0.5"))
    wide, narrow = (train_gpt.quantize_rows(w, 4, clip * f)[1] for f in (1.0, 0.5))
    assert ((step == wide) | (step == narrow)).all()
    rtn_err = lambda s: ((torch.round(w / s.float()[:, None]).clamp(-7, 7) * s.float()[:, None] - w).square()
                         * h.diagonal()).sum(dim=1)
    assert (rtn_err(step) <= torch.minimum(rtn_err(wide), rtn_err(narrow)) + 1e-6).all()
    assert (step[1::2] == wide[1::2]).float().mean() > 0.5 and (step[::2] == narrow[::2]).all()


def test_the_shared_blocks_hessian_sums_the_inputs_of_every_pass(dataset, monkeypatch):
    monkeypatch.setattr(train_gpt, "KEEP_FLOAT_MAX_NUMEL", 0)  # every matrix is exported as codes
    model = tiny_model(randomize=True, NUM_STEM_BLOCKS="1", NUM_LAYER_SCHEDULE="0:3", GPTQ_CALIB_SEQS="6")
    seen: dict[str, list[torch.Tensor]] = {"block.mlp.fc": [], "stem.0.mlp.fc": [], "block.attns.0.c_q": []}
    for name, inputs in seen.items():
        model.get_submodule(name).register_forward_pre_hook(lambda m, a, inputs=inputs: inputs.append(a[0].detach()))
    files = sorted(Path(dataset["DATA_PATH"]).glob("fineweb_train_*.bin"))
    hessians = train_gpt.gptq_hessians(model, model.args, files, train_gpt.layer_plan(model.args, 3), torch.device("cpu"))
    batches = -(-6 // max(1, 2 ** 16 // model.args.train_seq_len))
    assert len(seen["block.mlp.fc"]) == 3 * batches and len(seen["stem.0.mlp.fc"]) == batches
    for name, inputs in seen.items():
        x = torch.cat([i.reshape(-1, i.size(-1)) for i in inputs])
        assert torch.allclose(hessians[f"{name}.weight"], x.T @ x, rtol=1e-4, atol=1e-3)
    assert "tok_emb.weight" not in hessians and "lm_head.weight" in hessians


def test_a_tied_embedding_is_rounded_as_the_head_on_the_heads_inputs(dataset, monkeypatch):
    monkeypatch.setattr(train_gpt, "KEEP_FLOAT_MAX_NUMEL", 0)  # the tiny embedding is exported as codes
    model = tiny_model(randomize=True, TIE_EMBEDDINGS="1", EMBED_CLIP_SIGMAS="20", NUM_LAYER_SCHEDULE="0:2",
                       GPTQ_CALIB_SEQS="4")
    heads_inputs = []
    files = sorted(Path(dataset["DATA_PATH"]).glob("fineweb_train_*.bin"))
    layers = train_gpt.layer_plan(model.args, 2)
    hessians = train_gpt.gptq_hessians(model, model.args, files, layers, torch.device("cpu"))
    # The head's inputs: the final normed hidden state, as the same tokens give it.
    tokens = train_gpt.first_tokens(files, 4 * model.args.train_seq_len + 1)
    x, y = tokens[:-1].view(4, -1), tokens[1:].view(4, -1)
    model.head_input_hook = heads_inputs.append
    with torch.no_grad():
        model(x, y, layers)
    model.head_input_hook = None
    h = torch.cat([i.reshape(-1, i.size(-1)) for i in heads_inputs])
    assert torch.allclose(hessians["tok_emb.weight"], h.T @ h, rtol=1e-4, atol=1e-3)
    rounded = train_gpt.gptq_round(model.state_dict(), hessians, model.args)
    codes, step = rounded["tok_emb.weight"]
    emb = model.tok_emb.weight.detach()
    assert codes.shape == emb.shape and codes.abs().max() <= 127  # EMBED_BITS=8
    assert torch.allclose(step.float(), (20 * emb.std(dim=1) / 127).half().float())  # SDClip 20: the grid of the export
    rtn = train_gpt.quantize_rows(emb, 8, train_gpt.row_clip(emb, 20.0))[0]
    out_err = lambda c: (h @ (c * step.float()[:, None] - emb).T).square().sum()
    assert out_err(codes.float()) < out_err(rtn)  # less error on the logits than rounding to nearest
    off = tiny_model(TIE_EMBEDDINGS="1", NUM_LAYER_SCHEDULE="0:2", GPTQ_CALIB_SEQS="4", GPTQ_EMBEDDING="0")
    assert "tok_emb.weight" not in train_gpt.gptq_hessians(off, off.args, files, layers, torch.device("cpu"))
    assert model.head_input_hook is None


def test_gptq_settings_are_checked():
    for env, match in (({"GPTQ_CLIP_FACTORS": "1,x"}, "GPTQ_CLIP_FACTORS"), ({"GPTQ_CLIP_FACTORS": "1.2"}, "GPTQ_CLIP_FACTORS"),
                       ({"QUANT_METHOD": "gptq", "MAX_WALLCLOCK_SECONDS": "10"}, "GPTQ_RESERVE_SECONDS=12.0"),
                       ({"QUANT_METHOD": "awq"}, "QUANT_METHOD")):
        with pytest.raises(train_gpt.RunError, match=match):
            tiny_args(**env)


def test_a_capped_gptq_run_stops_training_its_reserve_early():
    cap = lambda **env: train_gpt.training_cap_ms(tiny_args(MAX_WALLCLOCK_SECONDS="600", **env))
    assert cap() == 600_000
    assert cap(QUANT_METHOD="gptq") == 588_000
    assert cap(QUANT_METHOD="gptq", GPTQ_RESERVE_SECONDS="30") == 570_000


@pytest.mark.slow
def test_gptq_calibration_reads_no_validation_token(tmp_path, dataset):
    """Two runs that differ only in their validation split write the same GPTQ artifact (and score
    differently): the export read none of it. The compliance line names the calibration data."""
    source = Path(dataset["DATA_PATH"])
    val = read_shard(next(source.glob("fineweb_val_*.bin")))[:4097]  # short: the evaluations are not the point
    env = {**dataset, "MODEL_DIM": "128", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "MLP_MULT": "5",
           "NUM_LAYER_SCHEDULE": "0:2", "TRAIN_SEQ_LEN": "32", "TRAIN_BATCH_TOKENS": "2048", "VAL_BATCH_SIZE": "4096",
           "TORCH_COMPILE": "0", "WARMUP_STEPS": "0", "ITERATIONS": "2", "MAX_WALLCLOCK_SECONDS": "0",
           "VAL_LOSS_EVERY": "0", "EVAL_STRIDE": "0", "QUANT_METHOD": "gptq", "QUANT_BITS": "6", "GPTQ_CALIB_SEQS": "8"}
    digests, scores = [], []
    for i, tokens in enumerate((val, val[::-1].copy())):  # the same tokens in reverse: another validation text
        data = tmp_path / f"data{i}"
        data.mkdir()
        for shard in source.glob("fineweb_train_*.bin"):
            (data / shard.name).symlink_to(shard)
        write_shard(data / "fineweb_val_000000.bin", tokens)
        (run := tmp_path / f"run{i}").mkdir()
        result = run_script(run, {**env, "DATA_PATH": str(data), "RUN_ID": "gptq"})
        assert result.returncode == 0, result.stderr[-2000:]
        out = (run / "logs" / "gptq.txt").read_text()
        assert re.search(r"^gptq calibration:train_tokens seqs:8 tokens:256 depth:2 matrices:3 ", out, re.M), out[-2000:]
        assert re.search(r"^compliance .* export_calibration:train_tokens artifact:", out, re.M)
        digests.append(hashlib.sha256((run / "artifacts" / "gptq" / "final_model.int6.ptz").read_bytes()).hexdigest())
        scores.append(re.search(r"^final_int6_zlib_roundtrip_exact val_loss:(\S+)", out, re.M).group(1))
    assert digests[0] == digests[1] and scores[0] != scores[1]


def test_calibration_reads_the_streams_first_tokens_and_no_more(tmp_path, dataset):
    files = train_gpt.train_shard_files(str(Path(dataset["DATA_PATH"]) / "fineweb_train_*.bin"))
    total = sum(train_gpt.shard_token_count(f) for f in files)
    for n in (257, total + 1000):  # a little, and past the end (the stream starts again)
        assert torch.equal(train_gpt.first_tokens(files, n), train_gpt.TokenStream(files).take(n).long())
    reads = []
    fromfile = train_gpt.np.fromfile
    train_gpt.np.fromfile = lambda *a, **k: (k["dtype"] == "<u2" and reads.append(k["count"])) or fromfile(*a, **k)
    try:
        train_gpt.first_tokens(files, 257)
    finally:
        train_gpt.np.fromfile = fromfile
    assert reads == [257]  # tokens, not a whole shard (the header is read apart)


@pytest.mark.slow
def test_two_ranks_calibrate_and_round_once_on_rank_0(tmp_path, dataset):
    patch = ("import os\n"
             "hessians = train_gpt.gptq_hessians\n"
             "def counted(*a, **k):\n"
             "    open(f'gptq{os.environ[\"RANK\"]}.txt', 'w').close()\n"
             "    return hessians(*a, **k)\n"
             "train_gpt.gptq_hessians = counted")
    env = {**dataset, "MODEL_DIM": "128", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "MLP_MULT": "5", "NUM_LAYER_SCHEDULE": "0:1",
           "TRAIN_SEQ_LEN": "32", "TRAIN_BATCH_TOKENS": "2048", "VAL_BATCH_SIZE": "4096", "TORCH_COMPILE": "0",
           "WARMUP_STEPS": "0", "ITERATIONS": "1", "MAX_WALLCLOCK_SECONDS": "0", "VAL_LOSS_EVERY": "0", "EVAL_STRIDE": "0",
           "QUANT_METHOD": "gptq", "QUANT_BITS": "6", "GPTQ_CALIB_SEQS": "8", "RUN_ID": "g"}
    result = run_patched(tmp_path, env, patch, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "gptq0.txt").exists() and not (tmp_path / "gptq1.txt").exists()
    assert re.search(r"^gptq calibration:train_tokens seqs:8 .* matrices:3 ", result.stdout, re.M)
    assert re.search(r"^final_int6_zlib_roundtrip_exact ", result.stdout, re.M)  # both ranks scored its artifact


def test_hessians_are_fp32_under_cudas_bf16_autocast(dataset, monkeypatch):
    # On CUDA the calibration forward runs under bf16 autocast, which also reaches the hooks.
    monkeypatch.setattr(train_gpt, "CPU_AUTOCAST", True)
    monkeypatch.setattr(train_gpt, "KEEP_FLOAT_MAX_NUMEL", 0)
    model = tiny_model(randomize=True, NUM_LAYER_SCHEDULE="0:2", GPTQ_CALIB_SEQS="4")
    files = sorted(Path(dataset["DATA_PATH"]).glob("fineweb_train_*.bin"))
    hessians = train_gpt.gptq_hessians(model, model.args, files, train_gpt.layer_plan(model.args, 2), torch.device("cpu"))
    assert hessians and all(h.dtype == torch.float32 and torch.isfinite(h).all() for h in hessians.values())
