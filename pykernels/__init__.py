"""pykernels: fused CUDA, Triton and C++ kernels for training MLPs and Transformers.

    import pykernels
    y = pykernels.linear_act(x, weight, bias, "gelu")      # act(x @ weight.T + bias)
    layer = pykernels.nn.Linear(512, 2048, activation="gelu")
    with pykernels.use_backend("triton"): ...

``pykernels.backends()`` lists the backends usable here (DESIGN.md §3).
"""

from . import nn, reference
from .activations import ACTIVATIONS
from .backends import BACKENDS, backends, has_cuda, use_backend
from .ops.linear_act import LinearActFunction, linear_act

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "LinearActFunction",
    "backends",
    "has_cuda",
    "linear_act",
    "nn",
    "reference",
    "use_backend",
]
