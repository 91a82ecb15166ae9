"""mod: Mixture-of-Depths routing: exactly k tokens per routed pass, a learning router, the causal
rule at evaluation, fp32 decisions under autocast. (Its causality and graph capture are tested
with DEQ's in test_deq.py.)"""
from __future__ import annotations

import torch

import train_gpt
from conftest import batch, tiny_model

MOD = dict(MOD_CAPACITY="0.25", MOD_EVERY="1", NUM_LAYER_SCHEDULE="0:3")


def test_mod_processes_exactly_k_tokens_and_the_router_learns():
    model = tiny_model(randomize=True, **MOD)
    x, y = batch(model.args)
    seen = []
    hook = model.block.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    model.train()
    nats, reports = model(x, y, 3, train_gpt.Mode(training=True))
    loss = (nats + reports["router_loss"]).mean()
    hook.remove()
    k = int(0.25 * x.size(1))
    assert seen == [torch.Size([x.size(0), k, 32])] * 3
    loss.backward()
    assert model.controls.router.grad[:3].abs().sum(dim=1).gt(0).all()


def test_mod_skips_tokens_exactly():
    # With one routed pass and all routers far below zero at evaluation, the output equals the
    # model with no passes at all.
    model = tiny_model(randomize=True, MOD_CAPACITY="0.5", MOD_EVERY="1", NUM_LAYER_SCHEDULE="0:1")
    x, y = batch(model.args)
    model.eval()
    with torch.no_grad():
        model.controls.router.zero_()
        none_chosen = model(x, y, 1)[0]  # sigmoid(0) = 0.5 is not > 0.5
        assert torch.equal(none_chosen, model(x, y, 0)[0])


def test_mod_causal_rule_equals_processing_only_the_chosen_tokens():
    # Evaluation's routed pass (no attention mask, static shapes) against its definition: per
    # sequence, the tokens with sigmoid(router) > 0.5 go through the block alone, as a shorter
    # sequence at their own positions, and get weight * update; the others are untouched.
    model = tiny_model(randomize=True, MOD_CAPACITY="0.5", MOD_EVERY="1", NUM_LAYER_SCHEDULE="0:1")
    model.eval()
    torch.manual_seed(1)
    x, x0 = torch.randn(3, 32, 32), torch.randn(3, 32, 32)
    c = model.controls.at(0)
    rope = train_gpt.rotary_tables(32, 8, 10000.0, x.device)
    with torch.no_grad():
        out, _ = train_gpt.routed_pass(model, model.block, x, x0, c, model.controls.router[0], rope, train_gpt.Mode(), None)
        weight = torch.sigmoid(x @ model.controls.router[0])
        counts = (weight > 0.5).sum(dim=1).tolist()
        assert len(set(counts)) > 1 and 0 < min(counts) and max(counts) < 32  # rows differ
        for b in range(3):
            idx = torch.nonzero(weight[b] > 0.5).flatten()
            cos, sin = (t[..., idx, :] for t in rope)
            xs = x[b, idx][None]
            update = model.block(xs, x0[b, idx][None], c, (cos, sin), None) - xs
            ref = x[b].clone()
            ref[idx] = (xs + weight[b, idx][None, :, None] * update)[0]
            assert torch.allclose(out[b], ref, rtol=1e-5, atol=1e-4), b


def test_routing_decisions_are_fp32_under_bf16_autocast():
    """Under CUDA's bf16 autocast (AUTOCAST=bf16 forces it on a CPU) the router's logits stay fp32:
    with logits near the 0.5 boundary, bf16 rounding of x @ router would flip decisions."""
    model = tiny_model(randomize=True, MOD_CAPACITY="0.5", MOD_EVERY="1", NUM_LAYER_SCHEDULE="0:1")
    model.eval()
    torch.manual_seed(2)
    router = torch.randn(32)
    x = torch.randn(3, 32, 32)
    x -= 0.999 * (x @ router)[..., None] * router / router.square().sum()  # logits at 1/1000 of their size
    x0 = torch.randn(3, 32, 32)
    rope = train_gpt.rotary_tables(32, 8, 10000.0, x.device)
    chosen = torch.sigmoid(x @ router) > 0.5  # fp32, no autocast
    assert 0 < chosen.sum() < chosen.numel()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert (x @ router).dtype == torch.bfloat16  # what autocast does to a plain matmul
        out, _ = train_gpt.routed_pass(model, model.block, x, x0, model.controls.at(0), router, rope, train_gpt.Mode(), None)
    assert torch.equal((out != x).any(dim=-1), chosen)
