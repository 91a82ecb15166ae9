"""record_optim: MuonEq-R (rows of the update normalized before orthogonalization) and decoupled
weight decay on the matrices, the token embedding and the controls."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import train_gpt
from conftest import tiny_args, tiny_model


def newton_schulz_inputs(monkeypatch, **settings: str) -> list[torch.Tensor]:
    """What Muon hands to the orthogonalization in one step of a tiny model with random gradients."""
    seen = []
    real = train_gpt.zeropower_via_newtonschulz5
    monkeypatch.setattr(train_gpt, "zeropower_via_newtonschulz5", lambda g, steps: seen.append(g.clone()) or real(g, steps))
    model = tiny_model(**settings)
    (muon, *_) = train_gpt.build_optimizers(model, model.args)
    torch.manual_seed(0)
    for p in muon.param_groups[0]["params"]:
        p.grad = torch.randn_like(p) * torch.linspace(0.1, 3.0, p.size(0))[:, None]  # rows of unequal norm
    muon.step()
    return seen


def test_muoneq_r_hands_newton_schulz_rows_of_equal_norm(monkeypatch):
    for g in newton_schulz_inputs(monkeypatch, MUON_ROW_NORMALIZE="1"):
        assert torch.allclose(g.float().norm(dim=-1), torch.ones(g.size(0)), atol=1e-5)
    plain = newton_schulz_inputs(monkeypatch)
    assert all(g.norm(dim=-1).max() > 2 * g.norm(dim=-1).min() for g in plain)


def test_decoupled_weight_decay_shrinks_each_group_by_its_lr_times_its_decay():
    model = tiny_model(randomize=True, MUON_WD="0.1", EMBED_WD="0.2", ADAM_WD="0.3")
    optimizers = train_gpt.build_optimizers(model, model.args)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = 0.5
    roles = train_gpt.param_roles(model)
    before = {role: [p.detach().clone() for p in params] for role, params in roles.items()}
    train_gpt.decay_weights(optimizers)
    for role, factor in (("matrix", 0.95), ("embedding", 0.9), ("control", 0.85), ("norm_bias", 0.85), ("head", 1.0)):
        for old, new in zip(before[role], roles[role]):
            assert torch.allclose(new, old * factor), role
    assert roles["head"]  # untied: the head has no decay, as the records' Adam


def test_decays_are_fractions():
    for name in ("MUON_WD", "EMBED_WD", "ADAM_WD"):
        with pytest.raises(train_gpt.RunError, match=f"^{name}=1 must be in"):
            tiny_args(**{name: "1"})


def test_adam_row_steps_0_steps_every_row_as_torch_adam_does():
    """ADAM_ROW_STEPS=0 (the records'): at a stage's start the controls' Adam is told every row is
    used, and then equals torch's Adam on the whole tensor, whose unused rows see zero gradients;
    a skip first used at the depth change then moves 0.45 lr at first, not lr."""
    def begun(**settings: str) -> train_gpt.RowAdam:
        model = tiny_model(UNET_SKIPS="1", NUM_LAYER_SCHEDULE="0:1,3:3", **settings)
        row_adam = next(o for o in train_gpt.build_optimizers(model, model.args) if isinstance(o, train_gpt.RowAdam))
        trainer = SimpleNamespace(args=model.args, row_adam=row_adam, run=SimpleNamespace(base_model=model), step=0,
                                  log=lambda _line: None)
        train_gpt.Trainer.begin_stage(trainer, train_gpt.run_stages(model.args)[0])
        return row_adam

    per_row = begun()
    assert any(not bool(rows.all()) for rows in per_row.used.values())  # the depth-1 plan leaves skips unused
    assert begun(ADAM_ROW_STEPS="0").used == {}
    torch.manual_seed(0)
    lr, betas, eps = 0.04, (0.9, 0.95), 1e-8
    p, q = (torch.nn.Parameter(t) for t in torch.randn(2, 3, 4).clone())
    q.data.copy_(p.data)
    ours, torchs = train_gpt.RowAdam([p], lr=lr, betas=betas, eps=eps), torch.optim.Adam([q], lr=lr, betas=betas, eps=eps)
    ours.set_used({})
    for step in range(12):
        g = torch.randn(3, 4) * torch.tensor([1.0, float(step >= 6), float(step >= 6)])[:, None]  # rows 1, 2 from step 6
        before = p.detach().clone()
        p.grad, q.grad = g, g.clone()
        ours.step()
        torchs.step()
        assert torch.allclose(p, q, rtol=0, atol=1e-6), step
        if step == 6:  # a first gradient at Adam's 7th step: m, v hold one term each, bias-corrected for 7
            first = lr * (0.1 / (1 - 0.9**7)) / (0.05 / (1 - 0.95**7)) ** 0.5
            assert torch.allclose((p - before)[1:].abs(), torch.full((2, 4), first), rtol=1e-4) and first < 0.5 * lr
