"""Plain-PyTorch definitions that every backend is checked against (the ``torch`` backend)."""

import torch.nn.functional as F

from .activations import activation_id


def activation(z, name, negative_slope=0.01):
    """The torch.nn.functional activation called ``name`` applied to ``z``."""
    activation_id(name)
    if name == "none":
        return z
    if name == "relu":
        return F.relu(z)
    if name == "gelu":
        return F.gelu(z)
    if name == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if name == "silu":
        return F.silu(z)
    if name == "sigmoid":
        return z.sigmoid()
    if name == "tanh":
        return z.tanh()
    return F.leaky_relu(z, negative_slope)


def linear_act(input, weight, bias=None, activation_name="none", negative_slope=0.01):
    """act(input @ weight.T + bias), composed from torch.nn.functional."""
    return activation(F.linear(input, weight, bias), activation_name, negative_slope)
