"""pykernels.nn.Linear: torch.nn.Linear's parameters and state dict, the fused activation."""

import pytest
import torch
import torch.nn.functional as F

import pykernels


def test_module_state_dict_round_trip_and_init():
    torch.manual_seed(7)
    ours = pykernels.nn.Linear(9, 4, activation="relu")
    torch.manual_seed(7)
    plain = torch.nn.Linear(9, 4)
    assert list(ours.state_dict()) == list(plain.state_dict()) == ["weight", "bias"]
    for key, value in plain.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value)  # same init under the same seed
    other = torch.nn.Linear(9, 4)
    ours.load_state_dict(other.state_dict())
    x = torch.randn(5, 9)
    torch.testing.assert_close(ours(x), F.relu(other(x)))
    back = torch.nn.Linear(9, 4)
    back.load_state_dict(ours.state_dict())
    assert torch.equal(back.weight, other.weight)
    no_bias = pykernels.nn.Linear(9, 4, bias=False, activation="gelu")
    assert no_bias.bias is None and list(no_bias.state_dict()) == ["weight"]
    assert "activation=gelu" in repr(no_bias)


def test_module_from_torch_shares_parameters():
    plain = torch.nn.Linear(6, 3, dtype=torch.float64)
    fused = pykernels.nn.Linear.from_torch(plain, activation="leaky_relu", negative_slope=0.1)
    assert fused.weight is plain.weight and fused.bias is plain.bias
    x = torch.randn(4, 6, dtype=torch.float64)
    fused(x).sum().backward()
    ref = F.leaky_relu(F.linear(x, plain.weight.detach(), plain.bias.detach()), 0.1)
    torch.testing.assert_close(fused(x), ref)
    assert plain.weight.grad is not None
    with pytest.raises(TypeError, match="linear"):
        pykernels.nn.Linear.from_torch(torch.nn.ReLU())
    with pytest.raises(ValueError, match="activation"):
        pykernels.nn.Linear(3, 3, activation="swish")
