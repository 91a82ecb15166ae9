"""The CUDA path, proven on a CPU: every attention call is one that flash-only SDPA accepts, every
feature gives finite scores under CUDA's bf16 numerics, and the torch versions and devices the
script cannot run on are refused up front."""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

import train_gpt
from conftest import tiny_args

# Every train and eval path a feature adds, on top of the default Universal Transformer.
FEATURES = {
    "default": {},
    "mod": dict(MOD_CAPACITY="0.5", MOD_EVERY="1"),
    "deq": dict(DEQ="1", DEQ_WARMUP_STEPS="1", NUM_LAYER_SCHEDULE="0:2", DEQ_ITERS="3", EVAL_DEQ_ITERS="4",
                NUM_STEM_BLOCKS="1", NUM_TAIL_BLOCKS="1"),
    "seed_lora": dict(SEED_LORA_RANK="4", SEED_LORA_TARGETS="all"),
    "unet": dict(UNET_SKIPS="1", UNET_WEIGHTS="2", NUM_LAYER_SCHEDULE="0:2,4:4"),
    "hash": dict(BIGRAM_TABLE_SIZE="64", TRIGRAM_TABLE_SIZE="32"),
    "stem_tail": dict(NUM_STEM_BLOCKS="1", NUM_TAIL_BLOCKS="1", NUM_LAYER_SCHEDULE="0:1,4:2"),
    "looped_record": dict(NUM_STEM_BLOCKS="1", NUM_CORE_BLOCKS="2", NUM_TAIL_BLOCKS="1", PER_LAYER_CONTROLS="0",
                          NUM_LAYER_SCHEDULE="0:1,0.5:2", UNET_SKIPS="1", UNET_GATES="1", ATTN_PER_BLOCK="1",
                          MLP_LAYERS="2", NORM_BIAS="0", TIE_EMBEDDINGS="1", MLP_NEGATIVE_SLOPE="0.5", ROPE_DIMS="4",
                          LN_SCALE="1", XSA_LAST_N="3", PARALLEL_RESIDUAL_START="2", ORTHO_INIT="1"),
}


class FlashOnly:
    """F.scaled_dot_product_attention that refuses what CUDA's flash kernel refuses (the checks of
    PyTorch's sdp_utils that can fail for this model): an attention mask, a non-causal call, query
    and key lengths that differ, dropout, a head dim that is not a multiple of 8 or above 256, a
    last dim that is not contiguous, grouped heads that do not divide, and inputs that are not
    fp16/bf16 once autocast has cast them."""

    def __init__(self, sdpa):
        self.sdpa, self.calls, self.paths = sdpa, 0, set()

    def __call__(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        device = q.device.type
        dtypes = {torch.get_autocast_dtype(device)} if torch.is_autocast_enabled(device) else {q.dtype, k.dtype, v.dtype}
        problems = [what for what, bad in (
            ("an attn_mask", attn_mask is not None),
            ("not causal", not is_causal),
            ("query and key lengths differ", q.size(-2) != k.size(-2)),
            ("dropout", dropout_p != 0.0),
            (f"head dim {q.size(-1)}", q.size(-1) % 8 != 0 or q.size(-1) > 256),
            ("strided last dim", any(t.stride(-1) != 1 for t in (q, k, v))),
            ("heads do not group", q.size(-3) % k.size(-3) != 0 or (k.size(-3) != q.size(-3) and not enable_gqa)),
            (f"dtypes {dtypes}", not dtypes <= {torch.float16, torch.bfloat16} or len(dtypes) != 1),
        ) if bad]
        assert not problems, f"flash attention would refuse this call: {', '.join(problems)}"
        self.calls += 1
        return self.sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                         enable_gqa=enable_gqa)


@pytest.fixture
def cuda_numerics(monkeypatch) -> FlashOnly:
    """bf16 autocast as on CUDA (AUTOCAST=bf16), and SDPA as flash alone would run it."""
    monkeypatch.setattr(train_gpt, "CPU_AUTOCAST", True)
    flash = FlashOnly(F.scaled_dot_product_attention)
    monkeypatch.setattr(F, "scaled_dot_product_attention", flash)
    return flash


def byte_luts(vocab: int) -> train_gpt.ByteLUTs:
    is_boundary = torch.zeros(vocab, dtype=torch.bool)
    is_boundary[train_gpt.BOS_ID] = True
    return train_gpt.ByteLUTs(torch.full((vocab,), 2, dtype=torch.int16), torch.zeros(vocab, dtype=torch.bool), is_boundary)


def val_stream(n: int) -> torch.Tensor:
    # Documents of 50 to 149 tokens, each starting with BOS, for TTT's per-document lanes.
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, 512, (n + 1,), generator=g)
    pos = 0
    while pos <= n:
        tokens[pos] = train_gpt.BOS_ID
        pos += 50 + int(torch.randint(0, 100, (1,), generator=g))
    return tokens


def run_every_path(args: train_gpt.Hyperparameters, ttt_modes: tuple[dict, ...] = ({},)) -> list[float]:
    """Train one step at every stage's plan (DEQ's solve too), then score the stream plainly, with
    sliding windows and with TTT at the last stage, as main() does; returns every loss and bpb."""
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = train_gpt.GPT(args)
    model.tok_emb.bfloat16()  # as main() does under bf16 numerics
    optimizers = train_gpt.build_optimizers(model, args)
    plans = list(dict.fromkeys(stage.plan for stage in train_gpt.run_stages(args)))
    mode = train_gpt.training_mode(args, torch.ones(()))
    g = torch.Generator().manual_seed(1)
    batch = lambda: train_gpt.inputs_and_targets(torch.randint(0, args.vocab_size, (2 * args.train_seq_len + 1,), generator=g),
                                                 args.train_seq_len)
    scores = []
    for layers in plans:
        with train_gpt.autocast(device):
            loss = model(*batch(), layers, mode)[0].mean()
        loss.backward()
        scores.append(float(loss))
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    tokens, luts, layers = val_stream(300), byte_luts(args.vocab_size), plans[-1]
    for stride in (args.train_seq_len, 8):
        scores += train_gpt.evaluate(model, layers, tokens, luts, seq_len=args.train_seq_len, stride=stride, batch=8)[:2]
    for ttt in ttt_modes:
        ttt_args = types.SimpleNamespace(**{**vars(args), "eval_stride": 8, "ttt_chunk_tokens": 64, "ttt_batch_docs": 3,
                                            **{k.lower(): v for k, v in ttt.items()}})
        scores += train_gpt.eval_ttt(model, model, ttt_args, layers, tokens, luts)[:3]
    return scores


@pytest.mark.parametrize("feature", list(FEATURES))
def test_every_attention_call_is_flash_compatible_and_bf16_scores_are_finite(cuda_numerics, feature):
    full_ttt = {"TTT_MODE": "full", "TTT_RESET": "none"}  # the same forwards as LoRA TTT, less the adapters
    scores = run_every_path(tiny_args(**FEATURES[feature]), ({}, full_ttt) if feature == "default" else ({},))
    assert all(map(torch.isfinite, torch.tensor(scores))), scores
    assert cuda_numerics.calls > 0


def test_the_checker_refuses_what_flash_refuses(cuda_numerics):
    q = torch.randn(1, 4, 16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cuda_numerics(q, q, q, is_causal=True)
        for bad in (dict(attn_mask=torch.ones(16, 16, dtype=torch.bool)), dict(is_causal=False)):
            with pytest.raises(AssertionError, match="flash attention would refuse"):
                cuda_numerics(q, q, q, **{"is_causal": True, **bad})
        with pytest.raises(AssertionError, match="head dim 12"):
            cuda_numerics(*(torch.randn(1, 4, 16, 12),) * 3, is_causal=True)
    with pytest.raises(AssertionError, match="dtypes"):  # fp32 without autocast
        cuda_numerics(q, q, q, is_causal=True)


def test_cuda_refuses_head_dims_flash_cannot_run_before_any_work():
    args = tiny_args(MODEL_DIM="48", NUM_HEADS="4")  # head dim 12: fine on a CPU
    with pytest.raises(train_gpt.RunError, match=r"head dim MODEL_DIM/NUM_HEADS=12: flash attention"):
        args.validate(1, "cuda")
    tiny_args(MODEL_DIM="64", NUM_HEADS="2").validate(1, "cuda")  # 32 is fine
    with pytest.raises(train_gpt.RunError, match="AUTOCAST"):
        tiny_args(AUTOCAST="fp16")


@pytest.mark.parametrize("version,ok", [("2.13.0+cpu", True), ("2.5.1+cu124", True), ("2.10.0", True),
                                        ("2.4.1", False), ("1.13.1", False)])
def test_torch_versions_below_2_5_are_refused(version, ok):
    if ok:
        train_gpt.check_torch_version(version)
    else:
        with pytest.raises(train_gpt.RunError, match=rf"torch {version} is older than 2.5"):
            train_gpt.check_torch_version(version)


def test_recompile_limit_is_set_on_old_and_new_torch():
    new, old = types.SimpleNamespace(recompile_limit=8), types.SimpleNamespace(cache_size_limit=8)
    train_gpt.set_recompile_limit(new, 64)
    train_gpt.set_recompile_limit(old, 64)
    assert new.recompile_limit == 64 and old.cache_size_limit == 64 and not hasattr(old, "recompile_limit")
