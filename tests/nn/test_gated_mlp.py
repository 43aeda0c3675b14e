"""pykernels.nn.GatedMLP: a Llama MLP's state dict and values, against plain PyTorch."""

import pytest
import torch
from linear_glu_cases import reference_mlp

import pykernels


def test_gated_mlp_loads_a_llama_state_dict_and_matches_it():
    d_model, hidden = 16, 44
    g = torch.Generator().manual_seed(9)
    llama = {  # the keys and shapes of transformers' LlamaMLP (bias=False)
        "gate_proj.weight": torch.randn(hidden, d_model, generator=g, dtype=torch.float64),
        "up_proj.weight": torch.randn(hidden, d_model, generator=g, dtype=torch.float64),
        "down_proj.weight": torch.randn(d_model, hidden, generator=g, dtype=torch.float64),
    }
    mlp = pykernels.nn.GatedMLP(d_model, hidden, dtype=torch.float64)
    mlp.load_state_dict(llama, strict=True)
    assert list(mlp.state_dict()) == list(llama)
    for key, value in mlp.state_dict().items():
        assert torch.equal(value, llama[key])
    x = torch.randn(2, 5, d_model, generator=g, dtype=torch.float64)
    out = mlp(x)
    ref = reference_mlp(mlp, x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    params = list(mlp.parameters())
    grads = torch.autograd.grad(out.square().sum(), params)
    ref_grads = torch.autograd.grad(ref.square().sum(), params)
    for a, e in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_gated_mlp_with_bias_round_trips_and_names_its_activation():
    mlp = pykernels.nn.GatedMLP(8, 12, activation="leaky_relu", bias=True, negative_slope=0.2)
    other = pykernels.nn.GatedMLP(8, 12, activation="leaky_relu", bias=True,
                                  negative_slope=0.2)
    other.load_state_dict(mlp.state_dict(), strict=True)
    assert sorted(mlp.state_dict()) == sorted(
        f"{name}_proj.{p}" for name in ("gate", "up", "down") for p in ("weight", "bias"))
    x = torch.randn(4, 8)
    torch.testing.assert_close(other(x), mlp(x))
    torch.testing.assert_close(mlp(x), reference_mlp(mlp, x))
    assert "negative_slope=0.2" in repr(mlp)
    with pytest.raises(ValueError, match="activation must be one of"):
        pykernels.nn.GatedMLP(8, 12, activation="swish")
