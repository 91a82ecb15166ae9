"""MUON OPTIMIZER: Muon's orthogonalized updates, RowAdam's per-row state, and which optimizer
trains each parameter (its role in PARAM_ROLES)."""
from __future__ import annotations

import pytest
import torch

import train_gpt
from conftest import RUN, TINY, run_script, tiny_model


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


@pytest.mark.slow
def test_rows_first_used_after_a_depth_change_take_fresh_adams_first_step(tmp_path, dataset):
    """PR #1088's rule at the switch: the control rows depth 3 adds were never used at depth 1, so
    they keep their init and no Adam state until then, and their first update is lr in every
    coordinate (lr * g / |g|), as a fresh parameter's; a step count that ran on gave 0.45 lr."""
    env = {**dataset, **RUN, "TTT_ENABLED": "0", "EVAL_STRIDE": "0", "ITERATIONS": "5", "NUM_LAYER_SCHEDULE": "0:1,4:3",
           "VAL_LOSS_EVERY": "0", "WARMDOWN_ITERS": "0", "CHECKPOINT_EVERY": "1", "RUN_ID": "rows"}
    result = run_script(tmp_path, env)
    assert result.returncode == 0, result.stderr[-2000:]
    import torch
    before, after = (torch.load(tmp_path / "checkpoints" / "rows" / f"step{s}.pt", weights_only=True)["model"] for s in (4, 5))
    lr = float(TINY.get("SCALAR_LR", 0.04))
    for name in ("resid_mix", "attn_scale", "mlp_scale", "attn_norm_bias", "mlp_norm_bias"):
        fresh = before[f"controls.{name}"][1:]
        init = torch.ones_like(fresh) if "scale" in name else torch.zeros_like(fresh)
        if name == "resid_mix":
            init[:, 0] = 1.0
        assert torch.equal(fresh, init), name  # untouched by the four steps at depth 1
        step = (after[f"controls.{name}"][1:] - fresh).abs()
        # lr * g / (|g| + ADAM_EPS): lr where |g| >> 1e-8, a little less for the smallest gradients
        assert step.max() <= lr * (1 + 1e-5) and step.median() == pytest.approx(lr, rel=1e-3), (name, step.flatten()[:8])


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
