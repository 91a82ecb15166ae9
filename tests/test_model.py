"""The PR #1088 architecture: parameter count, weight sharing, per-depth controls, compile
behaviour across depths and QAT under compile."""
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
        before = {d: model(x, y, d)[0] for d in (2, 6)}
        model.controls.attn_norm_bias[3].add_(0.5)  # the 4th pass: used at depth 6, not at depth 2
        after = {d: model(x, y, d)[0] for d in (2, 6)}
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
        compiled(x, y, depth)[0].mean().backward()
        compiled.eval()
        with torch.inference_mode():
            compiled(x, y, depth)[0]

    before = counters["stats"]["unique_graphs"]  # counters are process-wide; reset() keeps them
    for depth in depths:  # priming, as prime_compile does before the clock starts
        train_and_eval(depth)
    primed = counters["stats"]["unique_graphs"]
    assert primed - before == 2 * len(depths)
    for depth in depths[::-1] + depths:  # switching back and forth reuses the cached graphs
        train_and_eval(depth)
    assert counters["stats"]["unique_graphs"] == primed


# Wide enough that the MLP matrices are quantized at export (more than 65,536 elements), so QAT
# applies to them; the attention matrices (128x128) stay float in both.
QAT_SHAPE = dict(MODEL_DIM="128", MLP_MULT="5", NUM_LAYER_SCHEDULE="0:2")


def expected_step(w: torch.Tensor, bits: int, sigmas: float, mode: str) -> torch.Tensor:
    """One step per row, from the definitions. noise (PR #1088): row max / (2^(bits-1) - 1), no
    floor. grid_noise: the export grid's clip / (2^(bits-1) - 1), the clip being `sigmas` row stds,
    or else the row max but at least 1 (the baseline's int8 floor)."""
    if mode == "noise":
        clip = w.abs().amax(dim=1)
    else:
        clip = sigmas * w.std(dim=1) if sigmas else torch.clamp(w.abs().amax(dim=1), min=1.0)
    return (clip / (2 ** (bits - 1) - 1))[:, None]


@pytest.mark.parametrize("compile_layer", [False, True])
@pytest.mark.parametrize("mode,bits,sigmas", [("noise", 8, 0.0), ("noise", 6, 2.5), ("grid_noise", 8, 0.0),
                                              ("grid_noise", 6, 0.0), ("grid_noise", 5, 0.0), ("grid_noise", 6, 2.5)])
def test_qat_noise_is_one_step_of_its_grid(mode, bits, sigmas, compile_layer):
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = train_gpt.CastedLinear(300, 256, "attn")
    with torch.no_grad():  # row scales from 0.01 to 3: some rows use the clip floor, some do not
        layer.weight.copy_(torch.randn(256, 300) * torch.linspace(0.01, 3, 256)[:, None])
    gate = torch.zeros(())
    call = lambda x, g: layer(x, train_gpt.QAT(g, {"attn": bits, "mlp": 8}, sigmas, mode))  # the layer's kind decides
    run = torch.compile(call, backend="aot_eager", fullgraph=True) if compile_layer else call
    eye = torch.eye(300)
    assert torch.equal(run(eye, gate).T, layer.weight.detach())  # gate 0: the float weight
    gate.fill_(1.0)  # QAT starts without a recompile: the gate is data, not a flag
    noise = (run(eye, gate).T - layer.weight).detach()  # F.linear(I, W') = W'^T recovers the weight
    step = expected_step(layer.weight.detach(), bits, sigmas, mode)
    assert (noise.abs() <= step / 2 * 1.001).all()
    ratio = (noise.abs() / step).mean(dim=1)  # uniform on [-1/2, 1/2): E|noise| = step / 4
    assert ((ratio - 0.25).abs() < 0.04).all()


@pytest.mark.parametrize("mode", ["noise", "grid_noise", "ste"])
def test_qat_runs_under_compile_and_turns_on_without_recompiling(mode):
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    model = tiny_model(randomize=True, QAT_MODE=mode, **QAT_SHAPE)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x, y = batch(model.args)
    model.eval()
    with torch.no_grad():
        float_loss = model(x, y, 2)[0]
    compiled.train()
    gate = torch.zeros(())
    training = train_gpt.training_mode(model.args, gate)
    assert torch.equal(compiled(x, y, 2, training)[0].detach(), float_loss)  # before QAT_START_FRAC: the float forward
    graphs = counters["stats"]["unique_graphs"]
    gate.fill_(1.0)
    first, second = compiled(x, y, 2, training)[0].detach(), compiled(x, y, 2, training)[0].detach()
    assert counters["stats"]["unique_graphs"] == graphs
    gap = (first - float_loss).abs().mean()
    assert 1e-4 < gap < 0.05 * float_loss.mean()  # the grid's perturbation, not a different model
    assert torch.equal(first, second) == (mode == "ste")  # noise is redrawn, rounding is not


def test_ste_forward_is_the_exported_model_and_gradients_pass_straight_through():
    # With the SDClip rule, QAT and export use the same clip, so the STE forward is exactly the
    # forward of the roundtripped matrices, and its gradients are that model's gradients.
    model = tiny_model(randomize=True, QAT_MODE="ste", MATRIX_CLIP_SIGMAS="3", QUANT_BITS="6", **QAT_SHAPE)
    x, y = batch(model.args)
    state = model.state_dict()
    roundtrip = train_gpt.dequantize_state_dict(train_gpt.quantize_state_dict(state, model.args))
    quantized = {name for name, t in state.items() if train_gpt.export_spec(name, t, model.args)}
    matrices = {name for name in quantized if name.startswith("block.")}
    assert matrices and all(".mlp." in name for name in matrices)
    exported = tiny_model(randomize=True, **QAT_SHAPE)
    exported.load_state_dict({**state, **{name: roundtrip[name] for name in matrices}})
    exported.eval()
    model.train()
    ste_loss = model(x, y, 2, train_gpt.training_mode(model.args, torch.ones(())))[0].mean()
    ref_loss = exported(x, y, 2)[0].mean()
    assert torch.allclose(ste_loss, ref_loss, rtol=1e-5, atol=1e-6)
    ste_loss.backward()
    ref_loss.backward()
    for (name, p), q in zip(model.named_parameters(), exported.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-3, atol=1e-6), name


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


def test_row_adam_is_adam_per_row_and_a_row_without_gradient_keeps_no_state():
    """RowAdam on one [3, 4] tensor whose rows the plan uses in turn equals torch's Adam on three
    separate rows, each stepped only while used (PR #1088's per-depth parameters: a parameter
    without a gradient is skipped). A row first used at step 6 then takes fresh Adam's first step,
    lr in every coordinate, not the 0.45 lr of a state whose step count ran on."""
    torch.manual_seed(0)
    lr, betas, eps = 0.04, (0.9, 0.95), 1e-8
    p = torch.nn.Parameter(torch.randn(3, 4))
    opt = train_gpt.RowAdam([p], lr=lr, betas=betas, eps=eps)
    rows = [torch.nn.Parameter(p[r].detach().clone()) for r in range(3)]
    seeds = [torch.optim.Adam([q], lr=lr, betas=betas, eps=eps) for q in rows]
    phases = [[0]] * 5 + [[0, 1, 2]] * 4 + [[2]] * 3  # depth 1, then 3, then the third row alone
    for step, used in enumerate(phases):
        mask = torch.zeros(3, dtype=torch.bool)
        mask[used] = True
        g = torch.randn(3, 4) * mask[:, None]  # an unused row's gradient is zero, as indexing gives it
        before = p.detach().clone()
        p.grad = g
        opt.set_used({p: mask})
        opt.step()
        for r in used:
            rows[r].grad = g[r].clone()
            seeds[r].step()
        for r in range(3):
            assert torch.allclose(p[r], rows[r], rtol=0, atol=1e-6), (step, r)
        if step == 5:  # rows 1 and 2 are used for the first time
            assert torch.allclose((p - before)[1:].abs(), torch.full((2, 4), lr), rtol=1e-4)
    assert torch.equal(opt.state[p]["row_steps"].flatten(), torch.tensor([9.0, 4.0, 7.0]))


def test_unet_skip_is_the_encoder_output_added_in_reverse():
    model = tiny_model(randomize=True, UNET_SKIPS="1", NUM_LAYER_SCHEDULE="0:4")
    plain = tiny_model(randomize=True, NUM_LAYER_SCHEDULE="0:4")
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "skip_weights"})
    x, y = batch(model.args)
    with torch.no_grad():
        model.skip_weights.zero_()  # zero skip weights: exactly the plain stack
        assert torch.equal(model(x, y, 4)[0], plain(x, y, 4)[0])
        model.skip_weights[0] = 1.0  # only pass 2 (the first decoder pass) adds a skip
        outputs = []
        hook = model.block.register_forward_hook(lambda m, a, out: outputs.append(out))
        model(x, y, 4)[0]
        hook.remove()
        # pass 2's input is pass 1's output plus the last stored skip, pass 1's output itself
        inputs = []
        hook = model.block.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
        model(x, y, 4)[0]
        hook.remove()
        assert torch.allclose(inputs[2], 2 * outputs[1])
        assert torch.allclose(inputs[3], outputs[2])


def test_unet_weights_2_needs_two_passes_everywhere():
    with pytest.raises(train_gpt.RunError, match="UNET_WEIGHTS=2 needs core passes in both halves"):
        tiny_args(UNET_SKIPS="1", UNET_WEIGHTS="2", NUM_LAYER_SCHEDULE="0:1,4:3")
    with pytest.raises(train_gpt.RunError, match="UNET_WEIGHTS=2"):
        tiny_args(UNET_WEIGHTS="2")


def test_ngram_buckets_use_only_the_current_document_up_to_each_position():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 500, (3, 40), generator=g)
    ids[:, 0] = 1
    ids[0, 17] = 1  # a second document starts at 17 in row 0
    for n, size in ((2, 97), (3, 61)):
        buckets = train_gpt.ngram_buckets(ids, n, size)
        assert buckets.min() >= 0 and buckets.max() <= size - 1
        for t in range(40):  # changing later tokens never moves the bucket of t
            changed = ids.clone()
            changed[:, t + 1:] = torch.randint(2, 500, changed[:, t + 1:].shape, generator=g)
            assert torch.equal(train_gpt.ngram_buckets(changed, n, size)[:, : t + 1], buckets[:, : t + 1])
        # nothing crosses the BOS at 17: the first document's tokens do not reach the second's buckets
        changed = ids.clone()
        changed[0, 1:17] = torch.randint(2, 500, (16,), generator=g)
        assert torch.equal(train_gpt.ngram_buckets(changed, n, size)[0, 17:], buckets[0, 17:])
        # the first n-1 positions of each document have no full context: the reserved last bucket
        for start in (0, 17):
            assert (buckets[0, start:start + n - 1] == size - 1).all()
        assert (buckets[0, 19:] < size - 1).all() and len(set(buckets[0, 19:].tolist())) > 5


def test_hash_embeddings_are_causal_and_start_neutral():
    model = tiny_model(randomize=True, BIGRAM_TABLE_SIZE="256", TRIGRAM_TABLE_SIZE="128", HASH_EMBED_DIM="16")
    fresh = tiny_model(BIGRAM_TABLE_SIZE="256", TRIGRAM_TABLE_SIZE="128", HASH_EMBED_DIM="16")
    x, y = batch(model.args)
    assert torch.equal(fresh.hash_emb(x), torch.zeros(*x.shape, 32))  # zero-initialized projection
    with torch.no_grad():
        base = model(x, y, 3)[0]
        for t in (5, 20):
            x2, y2 = x.clone(), y.clone()
            x2[:, t + 1:] = (x2[:, t + 1:] + 7) % 500 + 2  # inputs after t
            y2[:, t:] = (y2[:, t:] + 7) % 500 + 2
            # losses at positions < t use inputs and targets up to t only
            assert torch.equal(model(x2, y2, 3)[0][:, :t], base[:, :t])


ROLE_CONFIGS = [{}, {"MOD_CAPACITY": "0.5"}, {"DEQ": "1"}, {"SEED_LORA_RANK": "4", "SEED_LORA_TARGETS": "all"},
                {"UNET_SKIPS": "1", "UNET_WEIGHTS": "2", "NUM_LAYER_SCHEDULE": "0:4"},
                {"BIGRAM_TABLE_SIZE": "64", "TRIGRAM_TABLE_SIZE": "64"},
                {"NUM_STEM_BLOCKS": "1", "NUM_TAIL_BLOCKS": "1", "UNET_SKIPS": "1", "TIE_EMBEDDINGS": "1"}]


@pytest.mark.parametrize("config", ROLE_CONFIGS, ids=lambda c: ",".join(c) or "default")
def test_every_parameter_has_exactly_one_role_and_the_optimizers_follow_it(config):
    model = tiny_model(**config)
    roles = {name: train_gpt.param_role(name) for name, _ in model.named_parameters()}
    assert None not in roles.values()
    optimizers = train_gpt.build_optimizers(model, model.args)
    in_muon = {id(p) for p in optimizers[0].param_groups[0]["params"]}
    in_adam = [id(p) for opt in optimizers[1:] for group in opt.param_groups for p in group["params"]]
    assert len(in_adam) == len(set(in_adam)) and not in_muon & set(in_adam)
    for name, p in model.named_parameters():  # each parameter in exactly one optimizer, the one its role names
        assert (id(p) in in_muon) == (roles[name] == "matrix") and (id(p) in in_muon) != (id(p) in in_adam), name
        if roles[name] in ("control", "norm_bias"):  # controls stay float in the artifact, whatever their size
            assert train_gpt.export_spec(name, torch.zeros(100_000), model.args) is None
            assert train_gpt.passthrough_dtype(name, p) == (torch.float32 if roles[name] == "control" else torch.float16)


def test_a_parameter_outside_the_role_table_or_in_two_roles_is_refused(monkeypatch):
    model = tiny_model()
    model.register_parameter("atn_scale", torch.nn.Parameter(torch.ones(3)))  # a typo of a control name
    with pytest.raises(train_gpt.RunError, match="parameter atn_scale has no role"):
        train_gpt.build_optimizers(model, model.args)
    monkeypatch.setitem(train_gpt.PARAM_ROLES, "head", r"lm_head\.weight|tok_emb\.weight")
    with pytest.raises(train_gpt.RunError, match="parameter tok_emb.weight has two roles"):
        train_gpt.param_roles(tiny_model())
