"""seed_lora: random maps regenerated from seeds, stored as adapters + seeds + checksums."""
from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
import torch

import train_gpt
from conftest import REPO, batch, tiny_args, tiny_model

WIDE = dict(MODEL_DIM="128", MLP_MULT="5", NUM_LAYER_SCHEDULE="0:2")


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def test_same_seed_same_matrix_in_another_process():
    matrix, checksum = train_gpt.seeded_signs(96, 80, 7)
    code = (f"import sys, hashlib; sys.path.insert(0, {str(REPO)!r}); import torch, train_gpt; torch.manual_seed(123); "
            "m, c = train_gpt.seeded_signs(96, 80, 7); print(hashlib.sha256(m.numpy().tobytes()).hexdigest(), c)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [digest(matrix), str(checksum)]
    assert set(matrix.mul(80 ** 0.5).round().unique().tolist()) == {-1.0, 1.0}
    other, other_checksum = train_gpt.seeded_signs(96, 80, 8)
    assert not torch.equal(matrix, other) and other_checksum != checksum


def test_random_maps_are_not_stored_and_reload_gives_identical_logits(tmp_path):
    model = tiny_model(randomize=True, SEED_LORA_RANK="8", SEED_LORA_TARGETS="all", **WIDE)
    state = model.state_dict()
    assert not any("random_map" in k for k in state)
    assert {k.rsplit(".", 1)[-1] for k in state if ".c_q." in k or ".fc." in k} == {"lora_a", "lora_b", "seed", "checksum"}
    torch.save(state, tmp_path / "w.pt")
    fresh = tiny_model(seed=99, SEED_LORA_RANK="8", SEED_LORA_TARGETS="all", **WIDE)
    fresh.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True), strict=True)
    x, y = batch(model.args)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(x, y, 2)[0], fresh(x, y, 2)[0])
        # through the quantized artifact the adapters are rounded, the maps regenerated exactly
        path = str(tmp_path / "m.ptz")
        train_gpt.write_atomic(path, train_gpt.serialize_artifact(state, model.args))
        fresh.load_state_dict(train_gpt.load_artifact(path), strict=True)
        assert all(torch.equal(a.random_map, b.random_map) for a, b in zip(
            (m for m in model.modules() if isinstance(m, train_gpt.SeedLoRALinear)),
            (m for m in fresh.modules() if isinstance(m, train_gpt.SeedLoRALinear))))
        assert (model(x, y, 2)[0] - fresh(x, y, 2)[0]).abs().max() < 0.05


def test_tampered_checksum_is_refused():
    model = tiny_model(SEED_LORA_RANK="4", **WIDE)
    state = model.state_dict()
    state["block.mlp.fc.checksum"] = state["block.mlp.fc.checksum"] + 1
    with pytest.raises(train_gpt.RunError, match="block.mlp.fc.random_map: regenerating seed"):
        tiny_model(SEED_LORA_RANK="4", **WIDE).load_state_dict(state)


def test_seed_lora_of_another_width_is_a_shape_error_not_a_checksum_error():
    lora = dict(SEED_LORA_RANK="4", SEED_LORA_TARGETS="all")
    state = tiny_model(MODEL_DIM="64", **lora).state_dict()
    with pytest.raises(train_gpt.RunError) as error:
        train_gpt.load_weights(tiny_model(**lora), state, "a.ptz")
    assert "size mismatch" in str(error.value) and "checksum" not in str(error.value)


def test_seed_lora_artifact_is_smaller_than_the_dense_model():
    sizes = {}
    for name, overrides in (("dense", {}), ("seed_lora", dict(SEED_LORA_RANK="16", SEED_LORA_TARGETS="all"))):
        model = tiny_model(randomize=True, **overrides, **WIDE)
        args = tiny_args(**overrides, **WIDE)
        sizes[name] = len(train_gpt.serialize_artifact(model.state_dict(), args))
    assert sizes["seed_lora"] < 0.6 * sizes["dense"], sizes


def test_adapters_train_and_the_map_stays_frozen():
    model = tiny_model(randomize=True, SEED_LORA_RANK="4", **WIDE)
    x, y = batch(model.args)
    model(x, y, 2)[0].mean().backward()
    fc = model.block.mlp.fc
    assert fc.lora_a.grad is not None and fc.lora_b.grad.abs().sum() > 0
    assert not fc.random_map.requires_grad and "random_map" not in dict(model.named_parameters())
    optimizers = train_gpt.build_optimizers(model, model.args)
    assert any(fc.lora_b is p for p in optimizers[0].param_groups[0]["params"])  # Muon trains the adapters
