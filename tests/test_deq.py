"""deq: the DEQ Universal Transformer: Anderson's solve, phantom gradients, the core solved on the
stem's output; with Mixture-of-Depths: later tokens never change earlier losses, and each
captures in one graph."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo

import train_gpt
from conftest import batch, tiny_model
from test_mod import MOD

DEQ = dict(DEQ="1", NUM_LAYER_SCHEDULE="0:2", DEQ_ITERS="6", EVAL_DEQ_ITERS="10")


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


def test_phantom_step_at_lambda_1_is_the_jacobian_free_gradient():
    model = tiny_model(randomize=True, PHANTOM_STEPS="1", PHANTOM_LAMBDA="1", **DEQ)
    model.train()
    x, _ = batch(model.args)
    x0 = train_gpt.rms_norm(model.tok_emb(x))
    rope = train_gpt.rotary_tables(x.size(1), 8, 10000.0, x.device)
    inputs = []
    hook = model.block.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().clone()))
    z, reports = train_gpt.solve_layer(model, train_gpt.Layer("solve", "block", 0), x0, x0, rope, train_gpt.Mode(training=True))
    hook.remove()
    params = list(model.block.parameters())
    deq_grads = torch.autograd.grad(z.square().sum(), params)
    z_star = inputs[-1]  # the solver's output, where the one tracked step starts
    jfb = model.block(z_star, x0, model.controls.at(0), rope, train_gpt.Mode())
    jfb_grads = torch.autograd.grad(jfb.square().sum(), params)
    assert torch.equal(z, jfb)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(deq_grads, jfb_grads))
    assert float(reports["deq_residual"]) > 0  # the solve reports its residual


def test_deq_core_solves_on_the_stem_output():
    model = tiny_model(randomize=True, NUM_STEM_BLOCKS="1", NUM_TAIL_BLOCKS="1", DEQ="1", NUM_LAYER_SCHEDULE="0:2",
                       DEQ_ITERS="3", EVAL_DEQ_ITERS="3")
    stem_out, injections = [], []
    model.stem[0].register_forward_hook(lambda m, a, out: stem_out.append(out))
    model.block.register_forward_pre_hook(lambda m, a: injections.append(a[1]))
    x, y = batch(model.args)
    model.eval()
    with torch.no_grad():
        model(x, y, train_gpt.run_stages(model.args)[-1].plan)[0]
    assert injections and all(u is stem_out[0] for u in injections)
    assert model.controls.resid_mix.shape[0] == 3  # stem, the one DEQ row, tail


@pytest.mark.parametrize("overrides", [DEQ, MOD], ids=["deq", "mod"])
@pytest.mark.parametrize("training", [True, False])
def test_later_tokens_never_change_earlier_losses(overrides, training):
    model = tiny_model(randomize=True, **overrides)
    layers = train_gpt.run_stages(model.args)[-1].plan  # DEQ's: the solve
    model.train(training)
    mode = train_gpt.Mode(training=training)
    x, y = batch(model.args)
    with torch.no_grad():
        base = model(x, y, layers, mode)[0]
        for t in (3, 17):
            x2, y2 = x.clone(), y.clone()
            x2[:, t + 1:] = (x2[:, t + 1:] + 11) % 500 + 2
            y2[:, t:] = (y2[:, t:] + 11) % 500 + 2
            out = model(x2, y2, layers, mode)[0]
            if training and "MOD_CAPACITY" in overrides:
                continue  # training's top-k sees the whole sequence; evaluation never uses it
            assert torch.equal(out[:, :t], base[:, :t]), t


@pytest.mark.slow
def test_deq_and_mod_capture_in_one_graph_each():
    for overrides, stages in ((DEQ, 2), (MOD, 1)):
        torch._dynamo.reset()
        counters = torch._dynamo.utils.counters
        model = tiny_model(randomize=True, **overrides)
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        x, y = batch(model.args)
        plans = [stage.plan for stage in train_gpt.run_stages(model.args)]
        assert len(plans) == stages  # DEQ's: the unrolled passes, then the solve
        before = counters["stats"]["unique_graphs"]
        for layers in plans:
            compiled.train()
            compiled(x, y, layers, train_gpt.Mode(training=True))[0].mean().backward()
            compiled.eval()
            with torch.inference_mode():
                compiled(x, y, layers)[0]
        primed = counters["stats"]["unique_graphs"]
        assert primed - before == 2 * len(plans)
        for layers in plans:
            compiled.train()
            compiled(x, y, layers, train_gpt.Mode(training=True))[0]
        assert counters["stats"]["unique_graphs"] == primed
