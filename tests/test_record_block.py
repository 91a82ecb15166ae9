"""record_block: the looped records' block pieces, each against its definition: XSA, partial RoPE,
the layer-wise norm scale, parallel residuals, LeakyReLU(0.5)^2 and orthogonal init."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import train_gpt
from conftest import batch, tiny_args, tiny_model, plan

STACK = dict(NUM_STEM_BLOCKS="1", NUM_CORE_BLOCKS="2", NUM_TAIL_BLOCKS="1", NUM_LAYER_SCHEDULE="0:1,4:2",
             ATTN_PER_BLOCK="1", MLP_LAYERS="2", NORM_BIAS="0")


def test_xsa_leaves_no_component_along_the_own_value_and_keeps_the_rest():
    torch.manual_seed(0)
    y, v = torch.randn(2, 6, 5, 8), torch.randn(2, 3, 5, 8)  # 6 query heads over 3 KV heads
    out = train_gpt.exclude_own_value(y, v)
    own = v.repeat_interleave(2, dim=1)  # query head h reads KV head h // 2, as SDPA's GQA does
    unit = own / own.norm(dim=-1, keepdim=True)
    assert (out * unit).sum(-1).abs().max() < 1e-5
    assert torch.allclose(out + (y * unit).sum(-1, keepdim=True) * unit, y, atol=1e-5)


def test_partial_rope_rotates_only_its_dims_by_relative_position():
    torch.manual_seed(0)
    cos, sin = train_gpt.rotary_tables(16, 4, 10000.0, torch.device("cpu"))  # 4 of 8 head dims
    q, k = torch.randn(1, 1, 16, 8), torch.randn(1, 1, 16, 8)
    rq = train_gpt.apply_rotary(q, cos, sin)
    assert torch.equal(rq[..., 4:], q[..., 4:]) and not torch.allclose(rq[..., :4], q[..., :4])
    # the record's rotation of a pair (x1, x2) = (dim j, dim j + 2): (x1 cos + x2 sin, -x1 sin + x2 cos)
    x1, x2 = q[..., :2], q[..., 2:4]
    assert torch.allclose(rq[..., :4], torch.cat((x1 * cos + x2 * sin, -x1 * sin + x2 * cos), -1))
    # the rotated part's q.k depends on the positions' difference only: (3, 1) as (12, 10)
    same_q, same_k = q[..., :1, :].expand(1, 1, 16, 8), k[..., :1, :].expand(1, 1, 16, 8)  # one vector at every position
    a, b = train_gpt.apply_rotary(same_q, cos, sin)[0, 0, :, :4], train_gpt.apply_rotary(same_k, cos, sin)[0, 0, :, :4]
    assert torch.allclose(a[3] @ b[1], a[12] @ b[10], atol=1e-5)


def test_the_pieces_go_to_blocks_by_their_index_in_the_stack():
    model = tiny_model(**STACK, LN_SCALE="1", XSA_LAST_N="2", PARALLEL_RESIDUAL_START="2", ROPE_DIMS="4",
                       MLP_NEGATIVE_SLOPE="0.5")
    blocks = [model.stem[0], model.block[0], model.block[1], model.tail[0]]  # indices 0-3
    assert [b.norm_scale for b in blocks] == [1 / math.sqrt(i + 1) for i in range(4)]
    assert [b.attns[0].xsa for b in blocks] == [False, False, True, True]
    assert [b.parallel for b in blocks] == [False, False, True, True]
    assert model.rope_dims == 4
    x = torch.linspace(-2, 2, 9)
    assert torch.equal(blocks[0].mlp.act(x), torch.where(x > 0, x, 0.5 * x).square())
    plain = tiny_model(**STACK)
    assert [b.norm_scale for b in [plain.stem[0], plain.tail[0]]] == [1.0, 1.0]
    assert not plain.tail[0].parallel and not plain.tail[0].attns[0].xsa and plain.rope_dims == 8
    assert torch.equal(plain.stem[0].mlp.act(x), torch.relu(x).square())


def test_a_parallel_block_runs_attention_and_mlp_on_its_input():
    model = tiny_model(randomize=True, **STACK, PARALLEL_RESIDUAL_START="0", LN_SCALE="1")
    x, y = batch(model.args)
    block, c = model.tail[0], model.controls.at(3)
    h = torch.randn(2, x.size(1), 32)
    rope = train_gpt.rotary_tables(x.size(1), model.rope_dims, 10000.0, torch.device("cpu"))
    mode = train_gpt.Mode()
    with torch.no_grad():
        out = block(h, h, c, rope, mode)
        inp = c.resid_mix[0] * h + c.resid_mix[1] * h
        norm = F.rms_norm(inp, (32,)) * block.norm_scale
        expect = inp + c.attn_scale[0] * block.attns[0](norm, rope, mode) + c.mlp_scale * block.mlp(norm, mode)
    assert torch.allclose(out, expect, atol=1e-5)


def test_orthogonal_init_gives_orthogonal_matrices_and_keeps_zero_inits():
    model = tiny_model(MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="4", ORTHO_INIT="1")
    q, fc, proj = model.block.attns[0].c_q.weight, model.block.mlp.fc.weight, model.block.attns[0].proj.weight
    assert torch.allclose(q @ q.T, torch.eye(64), atol=1e-5)
    assert torch.allclose(fc.T @ fc, torch.eye(64), atol=1e-5)  # 128 x 64: orthonormal columns
    assert not proj.any()


def test_bad_rope_dims_are_refused():
    for bad in ("3", "10"):
        with pytest.raises(train_gpt.RunError, match=f"^ROPE_DIMS={bad} must be even and at most the head dim 8"):
            tiny_args(ROPE_DIMS=bad)


def test_the_looped_record_pieces_train_and_score_with_the_group():
    args = tiny_args(**STACK, PER_LAYER_CONTROLS="0", UNET_SKIPS="1", UNET_GATES="1", MLP_NEGATIVE_SLOPE="0.5",
                     ROPE_DIMS="4", LN_SCALE="1", XSA_LAST_N="4", PARALLEL_RESIDUAL_START="3", ORTHO_INIT="1")
    model = train_gpt.GPT(args)
    x, y = batch(args)
    losses = []
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(8):
        loss = model(x, y, plan(model, 2))[0].mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1 and all(math.isfinite(v) for v in losses)
