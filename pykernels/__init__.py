"""pykernels: fused CUDA, Triton and C++ kernels for training MLPs and Transformers.

    import pykernels
    y = pykernels.linear_act(x, weight, bias, "gelu")      # act(x @ weight.T + bias)
    loss = pykernels.cross_entropy(logits, target)          # F.cross_entropy, fused
    loss = pykernels.linear_cross_entropy(h, lm_head.weight, target)  # no (N, V) logits
    layer = pykernels.nn.Linear(512, 2048, activation="gelu")
    with pykernels.use_backend("triton"): ...

``pykernels.backends()`` lists the backends usable here (DESIGN.md §3).
"""

from . import nn, reference
from .activations import ACTIVATIONS
from .backends import BACKENDS, backends, has_cuda, use_backend
from .ops.attention import AttentionFunction, scaled_dot_product_attention, use_deterministic
from .ops.cross_entropy import (
    CrossEntropyFunction,
    LinearCrossEntropyFunction,
    cross_entropy,
    linear_cross_entropy,
)
from .ops.linear_act import LinearActFunction, linear_act

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "AttentionFunction",
    "BACKENDS",
    "CrossEntropyFunction",
    "LinearCrossEntropyFunction",
    "LinearActFunction",
    "backends",
    "cross_entropy",
    "has_cuda",
    "linear_act",
    "linear_cross_entropy",
    "nn",
    "reference",
    "scaled_dot_product_attention",
    "use_backend",
    "use_deterministic",
]
