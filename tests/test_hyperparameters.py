"""HYPERPARAMETERS: every setting is read from its variable, checked, and refused in one line
naming it; the depth schedule."""
from __future__ import annotations

import re

import pytest

import train_gpt
from conftest import REPO, clock_of, tiny_args

BAD_SETTINGS = {
    "NUM_HEADS": ["0", "-4"], "NUM_KV_HEADS": ["0"], "MLP_MULT": ["inf", "nan", "0"], "SEED": ["-1", "4294967296"],
    "BETA1": ["1", "-0.1"], "BETA2": ["1.5"], "ADAM_EPS": ["-1e-8"], "TIED_EMBED_INIT_STD": ["-0.1"],
    "LOGIT_SOFTCAP": ["nan", "0"], "MAX_WALLCLOCK_SECONDS": ["nan", "-1", "inf"], "ROPE_BASE": ["0", "-5"],
    "MATRIX_LR": ["-0.04"], "EMBED_LR": ["-1"], "HEAD_LR": ["-1"], "SCALAR_LR": ["nan"], "TTT_LR": ["-0.01"],
    "MUON_BACKEND_STEPS": ["0"], "MUON_MOMENTUM": ["1"], "VAL_BATCH_SIZE": ["0", "-8"], "TIE_EMBEDDINGS": ["2", "true"],
    "TORCH_COMPILE": ["-1"], "ITERATIONS": ["-1"], "WARMDOWN_ITERS": ["-1"], "VAL_LOSS_EVERY": ["-5"],
    "GRAD_CLIP_NORM": ["-1"], "VOCAB_SIZE": ["70000", "1"], "TRAIN_BATCH_TOKENS": ["0"], "ANDERSON_BETA": ["0", "1.5"],
    "MOD_CAPACITY": ["-0.5"], "EMA_DECAY": ["1"], "CHECKPOINT_KEEP": ["0"], "UNET_WEIGHTS": ["3"],
    "RUN_ID": ["../../x", "a/b", ".hidden", "", "x" * 129],
}


@pytest.mark.parametrize("name,value", [(n, v) for n, vs in BAD_SETTINGS.items() for v in vs])
def test_every_bad_setting_is_one_error_naming_it(name, value):
    with pytest.raises(train_gpt.RunError) as error:
        tiny_args(**{name: value}).validate()
    assert str(error.value).startswith(f"{name}=") and "\n" not in str(error.value)


def test_off_values_and_edges_are_accepted():
    args = tiny_args(MAX_WALLCLOCK_SECONDS="0", WARMDOWN_ITERS="0", GRAD_CLIP_NORM="0", VAL_LOSS_EVERY="0",
                     ITERATIONS="0", SEED="4294967295", BETA2="0", ANDERSON_BETA="1", TIE_EMBEDDINGS="1", RUN_ID="a.b-c_1")
    # Each off value turns its feature off: no wallclock cap, no warmdown (and no division by its 0 steps).
    clock = clock_of(args)
    clock.elapsed_ms, clock.step_ms = 1e9, 100.0
    assert clock.cap_ms is None and not clock.out_of_time()
    assert [train_gpt.lr_multiplier(args, clock, s) for s in (0, 5, 10**6)] == [1.0] * 3
    assert args.tie_embeddings is True and train_gpt.GPT(args).lm_head is None  # tied: the embedding is the head


def test_the_depth_schedule_is_parsed_once_into_stages():
    train_gpt.parse_layer_schedule.cache_clear()
    args = tiny_args(NUM_LAYER_SCHEDULE="0:2,100:4,250:6")
    for _ in range(3):
        stages = train_gpt.run_stages(args)
    assert [(s.start, s.depth, len(s.plan)) for s in stages] == [(0, 2, 2), (100, 4, 4), (250, 6, 6)]
    assert train_gpt.parse_layer_schedule.cache_info().misses == 1


@pytest.mark.parametrize("schedule", ["5:2", "0:2,0:4", "0:2,10:4,5:6", "0:0", "0:two", "0:2:3", ""])
def test_bad_schedules_are_refused(schedule):
    with pytest.raises(train_gpt.RunError, match="NUM_LAYER_SCHEDULE"):
        train_gpt.parse_layer_schedule(schedule)


def test_every_setting_is_named_after_its_environment_variable():
    # The launch command maps a logged setting `name` back to the variable NAME.
    pairs = re.findall(r"self\.(\w+) = self\._get\(\"(\w+)\"", (REPO / "train_gpt.py").read_text())
    assert len(pairs) > 50 and all(attr.upper() == env for attr, env in pairs)
