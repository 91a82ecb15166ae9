"""MODEL: the PR #1088 architecture (parameter count, weight sharing, per-depth controls), the
stem/core/tail stack and the layer plan it runs, compile behaviour across depths, and QAT."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch._dynamo

import train_gpt
from conftest import REPO, UNET_STACK, batch, clock_of, tiny_args, tiny_model, plan


def test_default_config_is_the_pr1088_record():
    args = train_gpt.Hyperparameters({})
    args.validate(8)
    model = train_gpt.GPT(args)
    assert sum(p.numel() for p in model.parameters()) == 18_135_072
    assert args.layer_schedule == ((0, 2), (2000, 6))
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
        before = {d: model(x, y, plan(model, d))[0] for d in (2, 6)}
        model.controls.attn_norm_bias[3].add_(0.5)  # the 4th pass: used at depth 6, not at depth 2
        after = {d: model(x, y, plan(model, d))[0] for d in (2, 6)}
    assert torch.equal(before[2], after[2])
    assert not torch.allclose(before[6], after[6])


def test_core_passes_sit_between_stem_and_tail():
    model = tiny_model(randomize=True, NUM_STEM_BLOCKS="2", NUM_TAIL_BLOCKS="2", NUM_LAYER_SCHEDULE="0:3")
    order = []
    for name, module in [("stem0", model.stem[0]), ("stem1", model.stem[1]), ("core", model.block),
                         ("tail0", model.tail[0]), ("tail1", model.tail[1])]:
        module.register_forward_pre_hook(lambda m, a, name=name: order.append(name))
    x, y = batch(model.args)
    with torch.no_grad():
        model(x, y, plan(model, 3))[0]
    assert order == ["stem0", "stem1", "core", "core", "core", "tail0", "tail1"]


def test_bad_stem_tail_settings_name_the_variable():
    with pytest.raises(train_gpt.RunError, match="NUM_STEM_BLOCKS=-1 must be at least 0"):
        tiny_args(NUM_STEM_BLOCKS="-1")
    # UNET_WEIGHTS=2 needs core passes on both sides of the stack's middle
    with pytest.raises(train_gpt.RunError, match="UNET_WEIGHTS=2 needs core passes in both halves"):
        tiny_args(UNET_SKIPS="1", UNET_WEIGHTS="2", NUM_STEM_BLOCKS="3", NUM_LAYER_SCHEDULE="0:2")
    tiny_args(UNET_SKIPS="1", UNET_WEIGHTS="2", NUM_STEM_BLOCKS="1", NUM_TAIL_BLOCKS="1", NUM_LAYER_SCHEDULE="0:2")


def blocks_called(model: train_gpt.GPT, depth: int) -> list[str]:
    names = {module: name for name, module in model.named_modules() if isinstance(module, train_gpt.Block)}
    called = []
    hooks = [m.register_forward_pre_hook(lambda m, a: called.append(names[m])) for m in names]
    x = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        model(x, x, plan(model, depth))
    for h in hooks:
        h.remove()
    return called


def test_the_forward_runs_the_blocks_the_plan_lists_in_its_order():
    model = tiny_model(randomize=True, **UNET_STACK)
    stage = train_gpt.run_stages(model.args)[-1]
    assert str(stage) == ("layer_plan depth:4 layers:6 stem.0@0>skip block@1>skip block@2>skip "
                          "skip0+decoder_block@3 skip1+decoder_block@4 skip2+tail.0@5")
    assert blocks_called(model, 4) == [layer.block for layer in stage.plan]
    assert blocks_called(model, 2) == ["stem.0", "block", "decoder_block", "tail.0"]
    assert model.controls.rows == 1 + 4 + 1 and model.skip_weights.shape[0] == 3


def test_routed_and_solved_layers_are_kinds_of_the_plan():
    mod = train_gpt.layer_plan(tiny_model(MOD_CAPACITY="0.5", MOD_EVERY="2", NUM_LAYER_SCHEDULE="0:4").args, 4)
    assert [layer.kind for layer in mod] == ["plain", "routed", "plain", "routed"]
    deq_args = tiny_model(DEQ="1", NUM_STEM_BLOCKS="1", NUM_TAIL_BLOCKS="1", NUM_LAYER_SCHEDULE="0:2").args
    assert str(train_gpt.run_stages(deq_args)[-1]).endswith("stem.0@0 block@1:solve tail.0@2")
    assert [str(layer) for layer in train_gpt.layer_plan(deq_args, 2)] == ["stem.0@0", "block@1", "block@1", "tail.0@2"]


@pytest.mark.parametrize("layer, bad, needs", [
    (1, dict(row=9), "control row 9 of 6"),
    (1, dict(block="tail.3"), "block tail.3"),
    (1, dict(block="lm_head"), "block lm_head"),
    (1, dict(pop=3), "skip weight 3"),  # the model has 3
    (0, dict(pop=0), "skip weight 0"),  # nothing kept yet
    (4, dict(pop=0), "skip weight 0"),  # layer 3 popped it
])
def test_a_plan_the_model_cannot_run_is_refused_naming_the_layer(layer, bad, needs):
    model = tiny_model(**UNET_STACK)
    stage = train_gpt.run_stages(model.args)[-1]
    model.check_plan(stage)
    layers = list(stage.plan)
    layers[layer] = layers[layer]._replace(**bad)
    with pytest.raises(train_gpt.RunError, match=rf"^layer_plan depth:4 .*: layer {layer} needs {needs}"):
        model.check_plan(stage._replace(plan=tuple(layers)))


@pytest.mark.slow
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
        compiled(x, y, plan(model, depth))[0].mean().backward()
        compiled.eval()
        with torch.inference_mode():
            compiled(x, y, plan(model, depth))[0]

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
    call = lambda x, g: layer(x, train_gpt.Mode(qat=train_gpt.QAT(g, {"attn": bits, "mlp": 8}, sigmas, mode)))  # the layer's class decides
    run = torch.compile(call, backend="aot_eager", fullgraph=True) if compile_layer else call
    eye = torch.eye(300)
    assert torch.equal(run(eye, gate).T, layer.weight.detach())  # gate 0: the float weight
    gate.fill_(1.0)  # QAT starts without a recompile: the gate is data, not a flag
    noise = (run(eye, gate).T - layer.weight).detach()  # F.linear(I, W') = W'^T recovers the weight
    step = expected_step(layer.weight.detach(), bits, sigmas, mode)
    assert (noise.abs() <= step / 2 * 1.001).all()
    ratio = (noise.abs() / step).mean(dim=1)  # uniform on [-1/2, 1/2): E|noise| = step / 4
    assert ((ratio - 0.25).abs() < 0.04).all()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["noise", "grid_noise", "ste"])
def test_qat_runs_under_compile_and_turns_on_without_recompiling(mode):
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    model = tiny_model(randomize=True, QAT_MODE=mode, **QAT_SHAPE)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x, y = batch(model.args)
    model.eval()
    with torch.no_grad():
        float_loss = model(x, y, plan(model, 2))[0]
    compiled.train()
    gate = torch.zeros(())
    training = train_gpt.training_mode(model.args, gate)
    assert torch.equal(compiled(x, y, plan(model, 2), training)[0].detach(), float_loss)  # before QAT_START_FRAC: the float forward
    graphs = counters["stats"]["unique_graphs"]
    gate.fill_(1.0)
    first, second = compiled(x, y, plan(model, 2), training)[0].detach(), compiled(x, y, plan(model, 2), training)[0].detach()
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
    ste_loss = model(x, y, plan(model, 2), train_gpt.training_mode(model.args, torch.ones(())))[0].mean()
    ref_loss = exported(x, y, plan(model, 2))[0].mean()
    assert torch.allclose(ste_loss, ref_loss, rtol=1e-5, atol=1e-6)
    ste_loss.backward()
    ref_loss.backward()
    for (name, p), q in zip(model.named_parameters(), exported.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-3, atol=1e-6), name


def test_an_unknown_layer_kind_is_refused_when_the_stages_are_built(monkeypatch):
    args = tiny_args(MOD_CAPACITY="0.5", MOD_EVERY="2", NUM_LAYER_SCHEDULE="0:2")
    assert [layer.kind for layer in train_gpt.run_stages(args)[0].plan] == ["plain", "routed"]
    monkeypatch.delitem(train_gpt.LAYER_KINDS, "routed")
    with pytest.raises(train_gpt.RunError, match=r"^layer_plan depth:2 layers:2 block@0 block@1:routed: layer kind "
                                                 r"'routed' is not one of plain, solve$"):
        train_gpt.run_stages(args)
    with pytest.raises(train_gpt.RunError, match="layer kind 'routed'"):
        args.validate()  # before any data is read


def test_the_forward_dispatches_each_layer_through_its_kind(monkeypatch):
    model = tiny_model(randomize=True, NUM_STEM_BLOCKS="1", NUM_LAYER_SCHEDULE="0:2")
    plan = train_gpt.run_stages(model.args)[0].plan
    calls = []

    def traced(model, layer, x, x0, rope, mode):
        calls.append(str(layer))
        return x + 1.0, {"seen": torch.ones(())}

    monkeypatch.setitem(train_gpt.LAYER_KINDS, "plain", train_gpt.LayerKind(traced, cost=lambda _args: 1.0))
    x = torch.randint(0, 512, (1, 8))
    _, reports = model(x, x, plan)
    assert calls == ["stem.0@0", "block@1", "block@2"]
    assert reports["seen"].item() == 3.0  # same-named reports of several layers add up


def test_deq_solves_from_its_warmup_at_the_scheduled_depth():
    args = tiny_args(DEQ="1", DEQ_WARMUP_STEPS="3", NUM_STEM_BLOCKS="1", NUM_TAIL_BLOCKS="1", NUM_LAYER_SCHEDULE="0:2,5:4")
    stages = train_gpt.run_stages(args)
    assert [(s.start, s.depth) for s in stages] == [(0, 2), (3, 2), (5, 4)]
    assert str(stages[0]) == "layer_plan depth:2 layers:4 stem.0@0 block@1 block@1 tail.0@2"
    assert str(stages[1]) == "layer_plan depth:2 layers:3 stem.0@0 block@1:solve tail.0@2"
    assert stages[2].plan == stages[1].plan  # the solve has no depth of its own: one graph for both
    at_start = train_gpt.run_stages(tiny_args(DEQ="1", DEQ_WARMUP_STEPS="0", NUM_LAYER_SCHEDULE="0:2"))
    assert [(s.start, s.depth, [layer.kind for layer in s.plan]) for s in at_start] == [(0, 2, ["solve"])]
    solve, plain = (train_gpt.stage_cost(args, s) for s in (stages[1], stages[0]))
    assert plain == 4 and solve == 2 + args.deq_iters / 3 + args.phantom_steps


def test_deq_refuses_a_core_whose_passes_differ():
    for setting in (dict(UNET_SKIPS="1"), dict(MOD_CAPACITY="0.5")):
        with pytest.raises(train_gpt.RunError, match=r"DEQ=1 iterates one map .* UNET_SKIPS or MOD_CAPACITY"):
            tiny_args(DEQ="1", NUM_LAYER_SCHEDULE="0:4", **setting).validate()


RECORD_ENV = REPO / "configs" / "looped_record.env"


def record_args() -> train_gpt.Hyperparameters:
    """The settings of configs/looped_record.env, the 1.0810 looped record's, read as a run reads them."""
    env = dict(line.split("=", 1) for line in RECORD_ENV.read_text().splitlines() if line and not line.startswith("#"))
    args = train_gpt.Hyperparameters(env)
    args.validate(8)
    return args


def physical(layer: train_gpt.Layer, args: train_gpt.Hyperparameters) -> int:
    """A layer's block as the record numbers its 11 blocks: stem 0-2, the core group 3-5, tail 6-10."""
    part, _, index = layer.block.partition(".")
    offset = {"stem": 0, "block": args.num_stem_blocks, "tail": args.num_stem_blocks + args.num_core_blocks}[part]
    return offset + int(index or 0)


def test_the_looped_record_config_builds_the_records_parameter_count_and_order():
    args = record_args()
    model = train_gpt.GPT(args)
    # The record's published count: 11 x 2,883,584 block matrices + the 8192 x 512 tied embedding +
    # 30,808 controls (11 blocks' scales, mixes and q gains; 8 skip weights and 8 skip gates).
    assert sum(p.numel() for p in model.parameters()) == 35_944_536
    first, looped = train_gpt.run_stages(args)
    assert (first.start, first.depth, looped.start, looped.depth) == (0, 1, 0.35, 3)
    # The record's lists (its GPT.__init__ with NUM_LOOPS=2, LOOP_START=3, LOOP_END=5): before the
    # switch 11 layers split 5/6, after it 17 layers split 8/9.
    for stage, encoder, decoder in ((first, [0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10]),
                                    (looped, [0, 1, 2, 3, 4, 5, 3, 4], [5, 3, 4, 5, 6, 7, 8, 9, 10])):
        order = [physical(layer, args) for layer in stage.plan]
        assert order == encoder + decoder
        assert [layer.push for layer in stage.plan] == [True] * len(encoder) + [False] * len(decoder)
        # Decoder layer k adds skip k (the last kept one first) while skips remain; the rest add none.
        assert [layer.pop for layer in stage.plan[len(encoder):]] == \
            [k if k < len(encoder) else -1 for k in range(len(decoder))]
        # Every pass of a block uses the block's own control row.
        assert [layer.row for layer in stage.plan] == order
    assert model.controls.rows == 11 and model.skip_weights.shape == model.skip_gates.shape == (8, 512)
    blocks = [m for m in model.modules() if isinstance(m, train_gpt.Block)]
    assert len(blocks) == 11 and [b.parallel for b in blocks] == [False] * 7 + [True] * 4
    assert all(b.attns[0].xsa for b in blocks) and model.rope_dims == 16


def test_a_core_group_runs_its_blocks_in_order_in_every_pass():
    model = tiny_model(randomize=True, NUM_STEM_BLOCKS="1", NUM_CORE_BLOCKS="2", NUM_TAIL_BLOCKS="1",
                       NUM_LAYER_SCHEDULE="0:1,4:3")
    assert blocks_called(model, 3) == ["stem.0"] + ["block.0", "block.1"] * 3 + ["tail.0"]
    assert [layer.row for layer in plan(model, 3)] == [0, 1, 2, 3, 4, 5, 6, 7]  # a row per layer
    shared = tiny_model(NUM_CORE_BLOCKS="2", PER_LAYER_CONTROLS="0", NUM_LAYER_SCHEDULE="0:1,4:3")
    assert [layer.row for layer in plan(shared, 3)] == [0, 1] * 3 and shared.controls.rows == 2
    assert {n.split(".")[1] for n, _ in shared.named_parameters() if n.startswith("block.")} == {"0", "1"}
    assert {train_gpt.param_role(n) for n, _ in shared.named_parameters() if n.endswith("c_q.weight")} == {"matrix"}


def test_a_schedule_starts_at_steps_or_at_fractions_of_training():
    assert train_gpt.parse_layer_schedule("0:1,0.35:3") == ((0, 1), (0.35, 3))
    assert isinstance(train_gpt.parse_layer_schedule("0:1,0.35:3")[1][0], float)
    for bad, problem in (("0:1,1.5:3", "must lie in"), ("0:1,0.5:2,100:3", "all steps or all fractions"),
                         ("0:1,0.5:2,0.4:3", "must increase"), ("0.5:1", "must start at step 0")):
        with pytest.raises(train_gpt.RunError, match=problem):
            train_gpt.parse_layer_schedule(bad)
    args = tiny_args(NUM_LAYER_SCHEDULE="0:1,0.35:2", MAX_WALLCLOCK_SECONDS="1", ITERATIONS="100")
    clock = clock_of(args)
    clock.elapsed_ms, clock.step_ms, clock.sync_step = 340.0, 10.0, 10
    trainer = SimpleNamespace(args=args, clock=clock, step=10)
    assert not train_gpt.Trainer.reached(trainer, 0.35)  # 34% of the cap, by the clock's estimate
    trainer.step = 11
    assert train_gpt.Trainer.reached(trainer, 0.35) and train_gpt.Trainer.reached(trainer, 11)
    uncapped = SimpleNamespace(args=tiny_args(MAX_WALLCLOCK_SECONDS="0", ITERATIONS="20"), step=6)
    uncapped.clock = clock_of(uncapped.args)
    assert not train_gpt.Trainer.reached(uncapped, 0.35) and not train_gpt.Trainer.reached(uncapped, 7)
    uncapped.step = 7
    assert train_gpt.Trainer.reached(uncapped, 0.35) and train_gpt.Trainer.reached(uncapped, 7)


def test_systems_built_for_one_core_block_refuse_a_group():
    for settings, name in (({"DEQ": "1", "NUM_CORE_BLOCKS": "2"}, "DEQ"),
                           ({"DEQ": "1", "NUM_LAYER_SCHEDULE": "0:1,0.5:2"}, "DEQ"),
                           ({"UNET_SKIPS": "1", "UNET_WEIGHTS": "2", "NUM_CORE_BLOCKS": "2"}, "UNET_WEIGHTS"),
                           ({"UNET_GATES": "1"}, "UNET_GATES")):
        with pytest.raises(train_gpt.RunError, match=f"^{name}="):
            tiny_args(**settings)
