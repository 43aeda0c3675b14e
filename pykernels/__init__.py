"""pykernels: fused CUDA, Triton and C++ kernels for training MLPs and Transformers.

    import pykernels
    y = pykernels.linear_act(x, weight, bias, "gelu")      # act(x @ weight.T + bias)
    loss = pykernels.cross_entropy(logits, target)          # F.cross_entropy, fused
    loss = pykernels.linear_cross_entropy(h, lm_head.weight, target)  # no (N, V) logits
    layer = pykernels.nn.Linear(512, 2048, activation="gelu")
    model = pykernels.models.Transformer(vocab_size, 256, 4, 4, max_seq_len=512)
    model = pykernels.fuse(model)                           # swap in the fused layers
    with pykernels.use_backend("triton"): ...

``pykernels.backends()`` lists the backends usable here (docs/ARCHITECTURE.md, "Backends").
"""

from . import models, nn, reference
from .activations import ACTIVATIONS
from .backends import BACKENDS, backends, has_cuda, use_backend
from .convert import FuseReport, explain_fuse, fuse
from .ops.attention import scaled_dot_product_attention, use_deterministic
from .ops.cross_entropy import cross_entropy
from .ops.linear_act import linear_act
from .ops.linear_cross_entropy import linear_cross_entropy
from .ops.linear_glu import linear_glu

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "FuseReport",
    "backends",
    "cross_entropy",
    "explain_fuse",
    "fuse",
    "has_cuda",
    "linear_act",
    "linear_glu",
    "linear_cross_entropy",
    "models",
    "nn",
    "reference",
    "scaled_dot_product_attention",
    "use_backend",
    "use_deterministic",
]
