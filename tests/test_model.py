"""The PR #1088 architecture: parameter count, weight sharing, per-depth controls, compile
behaviour across depths and noisy QAT."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo

import train_gpt
from conftest import tiny_args, tiny_model


def batch(args, seqs: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, args.vocab_size, (seqs * args.train_seq_len + 1,), generator=g)
    return train_gpt.inputs_and_targets(tokens, args.train_seq_len)


def test_default_config_is_the_pr1088_record():
    args = train_gpt.Hyperparameters({})
    args.validate(8)
    model = train_gpt.GPT(args)
    assert sum(p.numel() for p in model.parameters()) == 18_135_072
    assert args.layer_schedule == [(0, 2), (2000, 6)]
    # One shared block: each of its matrices appears once, whatever the depth.
    names = list(model.state_dict())
    matrices = [n for n in names if n.startswith("block.") and model.state_dict()[n].ndim == 2]
    assert len(matrices) == len(set(matrices)) == 2 * 4 + 3
    assert {n for n in names if "mlp" in n and n.startswith("block.")} == {
        "block.mlp.fc.weight", "block.mlp.mids.0.weight", "block.mlp.proj.weight"}
    # Per-depth controls have one row per scheduled depth (max 6).
    assert model.controls.attn_norm_bias.shape == (6, 2, 640)
    assert model.controls.resid_mix.shape == (6, 2, 640)


def test_mlp_layers_and_fractional_mult():
    model = tiny_model(MLP_LAYERS="2", MLP_MULT="1.5", ATTN_PER_BLOCK="1")
    assert model.block.mlp.fc.weight.shape == (48, 32)
    assert len(model.block.mlp.mids) == 0 and len(model.block.attns) == 1


def test_depth_controls_are_independent_per_depth():
    model = tiny_model(randomize=True, NUM_LAYER_SCHEDULE="0:2,5:6")
    x, y = batch(model.args)
    model.eval()
    with torch.no_grad():
        before = {d: model(x, y, d) for d in (2, 6)}
        model.controls.attn_norm_bias[3].add_(0.5)  # the 4th pass: used at depth 6, not at depth 2
        after = {d: model(x, y, d) for d in (2, 6)}
    assert torch.equal(before[2], after[2])
    assert not torch.allclose(before[6], after[6])


def test_compile_every_depth_without_recompiles():
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    args = tiny_args(NUM_LAYER_SCHEDULE="0:1,3:2,6:4")
    model = tiny_model(NUM_LAYER_SCHEDULE="0:1,3:2,6:4")
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # graph breaks raise
    x, y = batch(args)
    depths = [d for _, d in args.layer_schedule]

    def train_and_eval(depth: int) -> None:
        compiled.train()
        compiled(x, y, depth).mean().backward()
        compiled.eval()
        with torch.inference_mode():
            compiled(x, y, depth)

    before = counters["stats"]["unique_graphs"]  # counters are process-wide; reset() keeps them
    for depth in depths:  # priming, as prime_compile does before the clock starts
        train_and_eval(depth)
    primed = counters["stats"]["unique_graphs"]
    assert primed - before == 2 * len(depths)
    for depth in depths[::-1] + depths:  # switching back and forth reuses the cached graphs
        train_and_eval(depth)
    assert counters["stats"]["unique_graphs"] == primed


@pytest.mark.parametrize("compile_model", [False, True])
def test_noisy_qat_only_in_training_forwards(compile_model):
    torch._dynamo.reset()
    model = tiny_model(randomize=True)
    run = torch.compile(model, backend="eager", fullgraph=True) if compile_model else model
    x, y = batch(model.args)
    run.train()
    train1, train2 = run(x, y, 3), run(x, y, 3)
    run.eval()
    with torch.inference_mode():
        eval1, eval2 = run(x, y, 3), run(x, y, 3)
    assert torch.equal(eval1, eval2)
    assert not torch.equal(train1, train2)
    assert not torch.equal(train1, eval1)
    # Without QAT, a training forward is the deterministic eval forward.
    clean = tiny_model(randomize=True, NOISY_QAT="0")
    clean.train()
    with torch.no_grad():
        assert torch.equal(clean(x, y, 3), eval1)


def test_qat_noise_is_within_one_int8_step_per_row():
    torch.manual_seed(0)
    layer = train_gpt.CastedLinear(16, 8, bias=False)
    eye = torch.eye(16)
    noisy_w = layer(eye, noisy=True).T  # F.linear(I, W') = W'^T recovers the noisy weight
    step = layer.weight.abs().amax(dim=1, keepdim=True) / 127
    err = (noisy_w - layer.weight).abs()
    assert (err <= step / 2 + 1e-7).all()
    assert (err > 0).float().mean() > 0.9
    assert torch.equal(layer(eye).T, layer.weight.detach())


def test_depth_schedule_lookup():
    schedule = train_gpt.parse_layer_schedule("0:2,100:4,250:6")
    assert [train_gpt.depth_at(schedule, s) for s in (0, 99, 100, 249, 250, 10**6)] == [2, 2, 4, 4, 6, 6]


@pytest.mark.parametrize("schedule", ["5:2", "0:2,0:4", "0:2,10:4,5:6", "0:0", "0:two", "0:2:3", ""])
def test_bad_schedules_are_refused(schedule):
    with pytest.raises(train_gpt.RunError, match="NUM_LAYER_SCHEDULE"):
        train_gpt.parse_layer_schedule(schedule)


def test_muon_orthogonalizes_updates():
    torch.manual_seed(0)
    g = torch.randn(64, 32)
    s = torch.linalg.svdvals(train_gpt.zeropower_via_newtonschulz5(g, steps=5).float())
    assert s.max() / s.min() < 4 and 0.5 < s.mean() < 1.5
    assert torch.linalg.svdvals(g).max() / torch.linalg.svdvals(g).min() > 4
