"""Activation names and ids shared by every backend.

The ids match ``enum class Activation`` in ``kernels/common/activation.h`` (used by the
CUDA and C++ CPU kernels) and the constants the Triton kernels branch on.
"""

import torch
import torch.nn.functional as F

ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh", "leaky_relu")
ACTIVATION_IDS = {name: i for i, name in enumerate(ACTIVATIONS)}


def activation_id(activation):
    """The integer id of an activation name, or a ValueError naming the argument."""
    if not isinstance(activation, str) or activation not in ACTIVATION_IDS:
        raise ValueError(
            f"activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}"
        )
    return ACTIVATION_IDS[activation]


def activation_module(activation, negative_slope=0.01):
    """The torch.nn module computing the activation called ``activation`` ("none": Identity).

    The unfused twin of a fused layer: pykernels.models.reference builds its layers with it.
    """
    activation_id(activation)
    if activation == "leaky_relu":
        return torch.nn.LeakyReLU(negative_slope)
    if activation in ("gelu", "gelu_tanh"):
        return torch.nn.GELU(approximate="tanh" if activation == "gelu_tanh" else "none")
    return {"none": torch.nn.Identity, "relu": torch.nn.ReLU, "silu": torch.nn.SiLU,
            "sigmoid": torch.nn.Sigmoid, "tanh": torch.nn.Tanh}[activation]()


def activation_of(fn):
    """``(name, negative_slope)`` of the fused activation equal to ``fn`` (a torch.nn
    activation module, or one of the functions torch.nn.Transformer*Layer accept), or None
    when no fused kernel computes it. Subclasses are not matched: they may change forward."""
    functions = {F.relu: "relu", F.gelu: "gelu", F.silu: "silu", torch.sigmoid: "sigmoid",
                 torch.tanh: "tanh"}
    if not isinstance(fn, torch.nn.Module):
        name = next((n for f, n in functions.items() if f is fn), None)
        return None if name is None else (name, 0.01)
    kind = type(fn)
    if kind is torch.nn.GELU:
        return {"none": ("gelu", 0.01), "tanh": ("gelu_tanh", 0.01)}.get(fn.approximate)
    if kind is torch.nn.LeakyReLU:
        return "leaky_relu", float(fn.negative_slope)
    modules = {torch.nn.ReLU: "relu", torch.nn.SiLU: "silu", torch.nn.Sigmoid: "sigmoid",
               torch.nn.Tanh: "tanh"}
    return (modules[kind], 0.01) if kind in modules else None
