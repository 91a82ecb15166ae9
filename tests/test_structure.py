"""The core's structure: the layer plan the model runs, the blocks TTT adapts, and the stripped
scripts (only the core plus named systems) computing what the full script computes."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest
import torch

import train_gpt
from conftest import REPO, TINY, child_env, tiny_model

UNET_STACK = dict(NUM_STEM_BLOCKS="1", NUM_TAIL_BLOCKS="1", UNET_SKIPS="1", UNET_WEIGHTS="2", NUM_LAYER_SCHEDULE="0:2,3:4")


def blocks_called(model: train_gpt.GPT, depth: int) -> list[str]:
    names = {module: name for name, module in model.named_modules() if isinstance(module, train_gpt.Block)}
    called = []
    hooks = [m.register_forward_pre_hook(lambda m, a: called.append(names[m])) for m in names]
    x = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        model(x, x, depth)
    for h in hooks:
        h.remove()
    return called


def test_the_forward_runs_the_blocks_the_plan_lists_in_its_order():
    model = tiny_model(randomize=True, **UNET_STACK)
    plan = train_gpt.layer_plan(model.args, 4)
    assert train_gpt.describe_plan(4, plan) == ("layer_plan depth:4 layers:6 stem.0@0>skip block@1>skip block@2>skip "
                                                "skip0+decoder_block@3 skip1+decoder_block@4 skip2+tail.0@5")
    assert blocks_called(model, 4) == [layer.block for layer in plan]
    assert blocks_called(model, 2) == ["stem.0", "block", "decoder_block", "tail.0"]
    assert model.controls.rows == 1 + 4 + 1 and model.skip_weights.shape[0] == 3


def test_routed_and_solved_layers_are_kinds_of_the_plan():
    mod = train_gpt.layer_plan(tiny_model(MOD_CAPACITY="0.5", MOD_EVERY="2", NUM_LAYER_SCHEDULE="0:4").args, 4)
    assert [layer.kind for layer in mod] == ["block", "routed", "block", "routed"]
    deq_args = tiny_model(DEQ="1", NUM_STEM_BLOCKS="1", NUM_TAIL_BLOCKS="1", NUM_LAYER_SCHEDULE="0:2").args
    assert train_gpt.describe_plan(0, train_gpt.layer_plan(deq_args, train_gpt.DEQ_SOLVE)).endswith(
        "stem.0@0 block@1:solve tail.0@2")
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
    plan = train_gpt.layer_plan(model.args, 4)
    model.check_plan(4, plan)
    plan[layer] = plan[layer]._replace(**bad)
    with pytest.raises(train_gpt.RunError, match=rf"^layer_plan depth:4 .*: layer {layer} needs {needs}"):
        model.check_plan(4, plan)


def test_ttt_adapts_every_block_of_the_plan_with_its_own_adapters():
    model = tiny_model(randomize=True, **UNET_STACK)
    lora = train_gpt.LoRA(model, 4, lanes=2, rank=2, seed=0)
    lanes = torch.tensor([0, 1])
    adapters = lora.select(lanes)
    assert list(adapters) == ["head", "stem.0", "block", "decoder_block", "tail.0"]
    assert set(adapters["decoder_block"]) == {"q0", "v0", "q1", "v1"}
    x = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        base = model(x, x, 4)[0]
        assert torch.equal(model(x, x, 4, train_gpt.Mode(adapters=adapters))[0], base)  # B = 0: the artifact's model
        for name in adapters:  # each block's adapter acts on that block (and the head's on the head) alone
            for key, (block, proj) in lora.keys.items():
                lora.b[key].fill_(0.1 if block == name else 0.0)
            moved = model(x, x, 4, train_gpt.Mode(adapters=lora.select(lanes)))[0]
            assert not torch.allclose(moved, base), name


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SYSTEM_SETTINGS = {"hash_embed": {"BIGRAM_TABLE_SIZE": "64"}, "seed_lora": {"SEED_LORA_RANK": "2"},
                   "mod": {"MOD_CAPACITY": "0.5"}, "deq": {"DEQ": "1"}, "ttt": {"TTT_ENABLED": "1"},
                   "ema": {"EMA_DECAY": "0.5"}, "checkpoints": {"CHECKPOINT_EVERY": "2"},
                   "unet": {"UNET_SKIPS": "1"}, "warmdown_steps": {"WARMDOWN_FRAC": "0.5"}, "gptq": {"QUANT_METHOD": "gptq"},
                   "size_guard": {"SIZE_CHECK": "warn"}, "input_checks": {}}


def test_every_system_strips_alone_to_a_script_that_builds_its_model(tmp_path):
    listed = subprocess.run([sys.executable, str(REPO / "records" / "submission.py"), "strip", str(REPO / "train_gpt.py"),
                             "--list"], capture_output=True, text=True, check=True).stdout
    assert set(re.findall(r"^(\w+): \d+ blocks?", listed, re.M)) == set(SYSTEM_SETTINGS)
    for system, settings in SYSTEM_SETTINGS.items():
        out = tmp_path / f"{system}.py"
        subprocess.run([sys.executable, str(REPO / "records" / "submission.py"), "strip", str(REPO / "train_gpt.py"),
                        "-o", str(out), "--keep", system], check=True, capture_output=True)
        stripped = load(out, f"stripped_{system}")
        args = stripped.Hyperparameters({**TINY, **settings})
        args.validate()
        assert set(settings) <= stripped.known_settings()
        assert not (stripped.known_settings() - train_gpt.known_settings())
        others = {k for s, kv in SYSTEM_SETTINGS.items() if s != system for k in kv}
        assert not others & stripped.known_settings(), system  # the other systems' settings are gone
        model = stripped.GPT(args)
        stripped.param_roles(model)  # every parameter has its one role
        x = torch.randint(0, 512, (2, 32))
        for depth in stripped.scheduled_depths(args):
            assert model(x, x, depth)[0].shape == x.shape


def final_lines(stdout: str) -> list[str]:
    variable = re.compile(r" (?:train_time|step_avg|eval_time|tokens_per_s|write_time):\S+| \(code:\d+ bytes\)"
                          r"|\(final_\S+:\d+ms.*?\) |code bytes:.*|artifact:\d+/")
    kept = re.compile(r"^(step:\d+/\d+ |final_|quant_gap |layer_plan |compliance |Serialized model |train_summary )")
    return [variable.sub("", line) for line in stdout.splitlines() if kept.match(line)]


def test_the_stripped_core_computes_what_the_full_script_computes(tmp_path, dataset):
    core = tmp_path / "core.py"
    subprocess.run([sys.executable, str(REPO / "records" / "submission.py"), "strip", str(REPO / "train_gpt.py"),
                    "-o", str(core)], check=True, capture_output=True)
    assert len(core.read_text().splitlines()) < len((REPO / "train_gpt.py").read_text().splitlines()) - 500
    env = {**dataset, **TINY, "ITERATIONS": "4", "NUM_LAYER_SCHEDULE": "0:1,2:2", "VAL_LOSS_EVERY": "2",
           "TRAIN_LOG_EVERY": "1", "EVAL_STRIDE": "16", "SEED": "3", "RUN_ID": "same",
           "MAX_WALLCLOCK_SECONDS": "0"}  # the wallclock warmdown's LR depends on measured step times
    outs = []
    for script in (REPO / "train_gpt.py", core):
        run_dir = tmp_path / script.stem
        run_dir.mkdir()
        result = subprocess.run([sys.executable, str(script)], cwd=run_dir, env=child_env({"OMP_NUM_THREADS": "2", **env}),
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        outs.append(final_lines(result.stdout))
    full, stripped = outs
    assert any(line.startswith("final_sliding_window_exact") for line in full)
    assert [line for line in full if line.startswith("layer_plan")] == ["layer_plan depth:1 layers:1 block@0",
                                                                         "layer_plan depth:2 layers:2 block@0 block@1"]
    assert stripped == full
