"""ema: an exponential moving average of the weights, exported instead of them."""
from __future__ import annotations

import torch

import train_gpt
from conftest import tiny_model


def test_ema_follows_its_formula():
    model = tiny_model(randomize=True)
    decay = 0.9
    ema = train_gpt.EMA(model, decay)
    params = list(model.parameters())
    expected = [p.detach().double().clone() for p in params]
    for i in range(5):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p) * (i + 1))
        ema.update()
        expected = [decay * e + (1 - decay) * p.detach().double() for e, p in zip(expected, params)]
    for e, s in zip(expected, ema.shadow):
        assert torch.allclose(s.double(), e, rtol=1e-5, atol=1e-6)
    ema.copy_to_model()
    assert all(torch.equal(p.detach(), s) for p, s in zip(params, ema.shadow))
