"""DEQ mode (Anderson solve, phantom gradients) and Mixture-of-Depths routing: causality,
gradients, graph capture."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo

import train_gpt
from conftest import tiny_model
from test_model import batch

DEQ = dict(DEQ="1", NUM_LAYER_SCHEDULE="0:2", DEQ_ITERS="6", EVAL_DEQ_ITERS="10")
MOD = dict(MOD_CAPACITY="0.25", MOD_EVERY="1", NUM_LAYER_SCHEDULE="0:3")


def contractive_map(dim: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
    a = q @ torch.diag(torch.linspace(-0.95, 0.95, dim)) @ q.T  # spectral radius 0.95
    b = torch.randn(dim, generator=g)
    return lambda z: z @ a.T + b


def test_anderson_beats_plain_iteration_on_a_contractive_map():
    f = contractive_map()
    z0 = torch.zeros(2, 5, 24)

    def iterations_to(target: float, m: int) -> int:
        return next(n for n in range(2, 400) if train_gpt.anderson(f, z0, n, m=m, lam=1e-8, beta=1.0)[1] < target)

    anderson, plain = iterations_to(1e-3, m=5), iterations_to(1e-3, m=1)
    assert anderson * 3 < plain, (anderson, plain)
    # plain iteration is exactly z <- f(z): n iterations apply f n times
    z = z0
    for _ in range(6):
        z = f(z)
    out, _ = train_gpt.anderson(f, z0, 6, m=1, lam=0.0, beta=1.0)
    assert torch.allclose(out, z, atol=1e-5)


def test_anderson_solves_in_fp32_under_bf16_autocast():
    # CUDA trains under bf16 autocast. The map here is elementwise fp32 (autocast leaves it alone),
    # so any difference from the solve without autocast comes from the mixing: a bf16 Gram matrix
    # would carry relative errors of about 4e-3, far above its 1e-4 ridge.
    g = torch.Generator().manual_seed(0)
    scale, shift = torch.rand(24, generator=g) * 0.9, torch.randn(24, generator=g)
    f = lambda z: scale * torch.tanh(z) + shift
    z0 = torch.zeros(2, 5, 24)
    exact, residual = train_gpt.anderson(f, z0, 20, m=5, lam=1e-4, beta=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed, mixed_residual = train_gpt.anderson(f, z0, 20, m=5, lam=1e-4, beta=1.0)
    assert mixed.dtype == torch.float32 and mixed_residual.dtype == torch.float32
    assert torch.allclose(mixed, exact, atol=1e-6) and residual < 1e-4
    assert mixed_residual == pytest.approx(float(residual), rel=1e-3, abs=1e-7)


def test_anderson_mixes_each_token_alone():
    # A map that couples nothing across tokens: every token's solve must equal its solve alone.
    f = contractive_map()
    z0 = torch.randn(1, 6, 24)
    together, _ = train_gpt.anderson(f, z0, 8, m=4, lam=1e-4, beta=0.9)
    for t in range(6):
        alone, _ = train_gpt.anderson(f, z0[:, t:t + 1], 8, m=4, lam=1e-4, beta=0.9)
        assert torch.allclose(together[:, t:t + 1], alone, atol=1e-5)


@pytest.mark.parametrize("overrides", [DEQ, MOD], ids=["deq", "mod"])
@pytest.mark.parametrize("training", [True, False])
def test_later_tokens_never_change_earlier_losses(overrides, training):
    model = tiny_model(randomize=True, **overrides)
    depth = 0 if "DEQ" in overrides else 3
    model.train(training)
    mode = train_gpt.Mode(training=training)
    x, y = batch(model.args)
    with torch.no_grad():
        base = model(x, y, depth, mode)[0]
        for t in (3, 17):
            x2, y2 = x.clone(), y.clone()
            x2[:, t + 1:] = (x2[:, t + 1:] + 11) % 500 + 2
            y2[:, t:] = (y2[:, t:] + 11) % 500 + 2
            out = model(x2, y2, depth, mode)[0]
            if training and "MOD_CAPACITY" in overrides:
                continue  # training's top-k sees the whole sequence; evaluation never uses it
            assert torch.equal(out[:, :t], base[:, :t]), t


def test_phantom_step_at_lambda_1_is_the_jacobian_free_gradient():
    model = tiny_model(randomize=True, PHANTOM_STEPS="1", PHANTOM_LAMBDA="1", **DEQ)
    model.train()
    x, _ = batch(model.args)
    x0 = train_gpt.rms_norm(model.tok_emb(x))
    rope = train_gpt.rotary_tables(x.size(1), 8, 10000.0, x.device)
    inputs = []
    hook = model.block.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().clone()))
    z, residual = train_gpt.deq_solve(model, x0, model.controls.at(0), rope, train_gpt.Mode(training=True), None)
    hook.remove()
    params = list(model.block.parameters())
    deq_grads = torch.autograd.grad(z.square().sum(), params)
    z_star = inputs[-1]  # the solver's output, where the one tracked step starts
    jfb = model.block(z_star, x0, model.controls.at(0), rope, None, {})
    jfb_grads = torch.autograd.grad(jfb.square().sum(), params)
    assert torch.equal(z, jfb)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(deq_grads, jfb_grads))
    assert float(residual) > 0  # the solve reports its residual


def test_deq_and_mod_capture_in_one_graph_each():
    for overrides, depths in ((DEQ, (2, 0)), (MOD, (3,))):
        torch._dynamo.reset()
        counters = torch._dynamo.utils.counters
        model = tiny_model(randomize=True, **overrides)
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        x, y = batch(model.args)
        before = counters["stats"]["unique_graphs"]
        for depth in depths:
            compiled.train()
            compiled(x, y, depth, train_gpt.Mode(training=True))[0].mean().backward()
            compiled.eval()
            with torch.inference_mode():
                compiled(x, y, depth)[0]
        primed = counters["stats"]["unique_graphs"]
        assert primed - before == 2 * len(depths)
        for depth in depths:
            compiled.train()
            compiled(x, y, depth, train_gpt.Mode(training=True))[0]
        assert counters["stats"]["unique_graphs"] == primed


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
