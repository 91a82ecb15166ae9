"""unet: U-Net skips across the stack. With stem and tail blocks the plain point is the challenge
baseline, checked against an independent implementation of that baseline's model."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

import train_gpt
from conftest import batch, tiny_args, tiny_model, plan


def test_unet_skip_is_the_encoder_output_added_in_reverse():
    model = tiny_model(randomize=True, UNET_SKIPS="1", NUM_LAYER_SCHEDULE="0:4")
    plain = tiny_model(randomize=True, NUM_LAYER_SCHEDULE="0:4")
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "skip_weights"})
    x, y = batch(model.args)
    with torch.no_grad():
        model.skip_weights.zero_()  # zero skip weights: exactly the plain stack
        assert torch.equal(model(x, y, plan(model, 4))[0], plain(x, y, plan(plain, 4))[0])
        model.skip_weights[0] = 1.0  # only pass 2 (the first decoder pass) adds a skip
        outputs = []
        hook = model.block.register_forward_hook(lambda m, a, out: outputs.append(out))
        model(x, y, plan(model, 4))[0]
        hook.remove()
        # pass 2's input is pass 1's output plus the last stored skip, pass 1's output itself
        inputs = []
        hook = model.block.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
        model(x, y, plan(model, 4))[0]
        hook.remove()
        assert torch.allclose(inputs[2], 2 * outputs[1])
        assert torch.allclose(inputs[3], outputs[2])


def test_a_skip_gate_mixes_the_skip_in_by_its_sigmoid():
    model = tiny_model(randomize=True, UNET_SKIPS="1", UNET_GATES="1", NUM_LAYER_SCHEDULE="0:4")
    plain = tiny_model(randomize=True, NUM_LAYER_SCHEDULE="0:4")
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("skip_")})
    x, y = batch(model.args)

    def passes() -> tuple[list, list]:  # each pass's input and output
        inputs, outputs = [], []
        hooks = [model.block.register_forward_pre_hook(lambda m, a: inputs.append(a[0])),
                 model.block.register_forward_hook(lambda m, a, out: outputs.append(out))]
        model(x, y, plan(model, 4))
        for h in hooks:
            h.remove()
        return inputs, outputs

    with torch.no_grad():
        model.skip_gates.fill_(100.0)  # sigmoid 1: the skip is left out, exactly the plain stack
        assert torch.equal(model(x, y, plan(model, 4))[0], plain(x, y, plan(plain, 4))[0])
        # Pass 3 (the first of the decoder half) takes skip 0, pass 2's output times its weight.
        model.skip_gates.fill_(-100.0)  # sigmoid 0: the weighted skip alone
        inputs, outputs = passes()
        assert torch.allclose(inputs[2], model.skip_weights[0] * outputs[1], atol=1e-6)
        model.skip_gates[0].fill_(0.0)  # sigmoid 1/2: the mean of the two
        inputs, outputs = passes()
        assert torch.allclose(inputs[2], (model.skip_weights[0] * outputs[1] + outputs[1]) / 2, atol=1e-6)


def test_unet_weights_2_needs_two_passes_everywhere():
    with pytest.raises(train_gpt.RunError, match="UNET_WEIGHTS=2 needs core passes in both halves"):
        tiny_args(UNET_SKIPS="1", UNET_WEIGHTS="2", NUM_LAYER_SCHEDULE="0:1,4:3")
    with pytest.raises(train_gpt.RunError, match="UNET_WEIGHTS=2"):
        tiny_args(UNET_WEIGHTS="2")


PLAIN = {"NUM_STEM_BLOCKS": "4", "NUM_LAYER_SCHEDULE": "0:1", "NUM_TAIL_BLOCKS": "4", "MLP_MULT": "2", "MLP_LAYERS": "2",
         "ATTN_PER_BLOCK": "1", "UNET_SKIPS": "1", "TIE_EMBEDDINGS": "1", "NORM_BIAS": "0"}


def baseline_loss(state: dict[str, torch.Tensor], ids: torch.Tensor, targets: torch.Tensor, heads: int, kv_heads: int,
                  softcap: float = 30.0, rope_base: float = 10000.0) -> torch.Tensor:
    """The challenge baseline's forward (9 blocks, U-Net skips, tied head), written from its
    description, on weights given as blocks.{i}.* / skip_weights / tok_emb.weight."""
    norm = lambda t: F.rms_norm(t, (t.size(-1),))
    emb = state["tok_emb.weight"]
    dim, seq = emb.size(1), ids.size(1)
    hd = dim // heads
    inv_freq = 1.0 / rope_base ** (torch.arange(0, hd, 2).float() / hd)
    freqs = torch.outer(torch.arange(seq).float(), inv_freq)
    cos, sin = freqs.cos()[None, None], freqs.sin()[None, None]

    def rotate(t):
        a, b = t[..., : hd // 2], t[..., hd // 2:]
        return torch.cat((a * cos + b * sin, a * -sin + b * cos), dim=-1)

    def block(i, x, x0):
        w = lambda name: state[f"blocks.{i}.{name}"]
        x = w("resid_mix")[0] * x + w("resid_mix")[1] * x0
        h = norm(x)
        q = (h @ w("c_q").T).view(-1, seq, heads, hd).transpose(1, 2)
        k = (h @ w("c_k").T).view(-1, seq, kv_heads, hd).transpose(1, 2)
        v = (h @ w("c_v").T).view(-1, seq, kv_heads, hd).transpose(1, 2)
        q, k = rotate(norm(q)) * w("q_gain")[None, :, None, None], rotate(norm(k))
        k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(-1, seq, dim)
        x = x + w("attn_scale") * (y @ w("proj").T)
        return x + w("mlp_scale") * (torch.relu(norm(x) @ w("fc").T).square() @ w("mlp_proj").T)

    x = x0 = norm(F.embedding(ids, emb))
    skips = []
    for i in range(4):
        x = block(i, x, x0)
        skips.append(x)
    for i in range(5):
        if skips:
            x = x + state["skip_weights"][i] * skips.pop()
        x = block(4 + i, x, x0)
    logits = norm(x) @ emb.T
    logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)


def as_baseline(model: train_gpt.GPT) -> dict[str, torch.Tensor]:
    blocks = [*model.stem, model.block, *model.tail]
    state = {"tok_emb.weight": model.tok_emb.weight, "skip_weights": model.skip_weights}
    for i, b in enumerate(blocks):
        attn, c = b.attns[0], model.controls.at(i)
        state.update({f"blocks.{i}.{k}": v for k, v in {
            "c_q": attn.c_q.weight, "c_k": attn.c_k.weight, "c_v": attn.c_v.weight, "proj": attn.proj.weight,
            "q_gain": attn.q_gain, "fc": b.mlp.fc.weight, "mlp_proj": b.mlp.proj.weight,
            "resid_mix": c.resid_mix, "attn_scale": c.attn_scale[0], "mlp_scale": c.mlp_scale}.items()})
    return state


def test_plain_point_has_the_baseline_parameter_count():
    args = train_gpt.Hyperparameters({**PLAIN, "MODEL_DIM": "512", "NUM_HEADS": "8", "NUM_KV_HEADS": "4"})
    args.validate(8)
    model = train_gpt.GPT(args)
    assert sum(p.numel() for p in model.parameters()) == 17_059_912  # the baseline's logged model_params
    blocks = [*model.stem, model.block, *model.tail]
    assert len({id(b.mlp.fc.weight) for b in blocks}) == 9  # nine unique blocks


def test_plain_point_computes_the_baseline_model():
    model = tiny_model(randomize=True, **PLAIN)
    x, y = batch(model.args)
    model.eval()
    with torch.no_grad():
        ours = model(x, y, plan(model, 1))[0]
        reference = baseline_loss(as_baseline(model), x, y, heads=4, kv_heads=2)
        assert torch.allclose(ours, reference, atol=1e-5, rtol=1e-5)
        model.tail[3].mlp.proj.weight.mul_(2)  # the last block is the last tail block
        assert not torch.allclose(model(x, y, plan(model, 1))[0], reference, atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["1", "2"])
@pytest.mark.parametrize("stem,tail", [(0, 0), (1, 1)])
def test_unet_stacks_compile_at_every_core_depth_and_all_learn(weights, stem, tail):
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    model = tiny_model(randomize=True, NUM_STEM_BLOCKS=str(stem), NUM_TAIL_BLOCKS=str(tail),
                       NUM_LAYER_SCHEDULE="0:2,3:3,6:4", UNET_SKIPS="1", UNET_WEIGHTS=weights)
    n_skips = (stem + 4 + tail) // 2  # the deepest stack's
    assert model.skip_weights.shape == (n_skips, 32)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x, y = batch(model.args)
    before = counters["stats"]["unique_graphs"]
    for depth in (2, 3, 4):
        model.zero_grad()
        compiled(x, y, plan(model, depth))[0].mean().backward()
        for module in (*model.stem, model.block, model.decoder_block, *model.tail):
            assert module is None or all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), depth
        rows = model.controls.mlp_scale.grad.abs().sum(dim=1).gt(0).tolist()
        assert rows == [True] * stem + [d < depth for d in range(4)] + [True] * tail, depth  # stem, core, tail
        skips = model.skip_weights.grad.abs().sum(dim=1).gt(0).tolist()  # the first decoder layers pop one each
        assert skips == [i < (stem + depth + tail) // 2 for i in range(n_skips)], depth
    assert counters["stats"]["unique_graphs"] - before == 3
    primed = counters["stats"]["unique_graphs"]
    for depth in (4, 2, 3):
        compiled(x, y, plan(model, depth))[0]
    assert counters["stats"]["unique_graphs"] == primed
