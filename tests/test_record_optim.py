"""record_optim: MuonEq-R (rows of the update normalized before orthogonalization) and decoupled
weight decay on the matrices, the token embedding and the controls."""
from __future__ import annotations

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
