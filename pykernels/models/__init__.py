"""MLP and Transformer on the fused ops.

    model = pykernels.models.Transformer(vocab_size=256, d_model=128, n_heads=4,
                                         n_layers=2, max_seq_len=64)
    _, loss = model(idx, targets)         # linear + cross-entropy fused: no logits tensor

:mod:`pykernels.models.reference` has plain torch.nn twins with the same parameter names,
shapes and initialisation: either model loads the other's state_dict.
"""

from torch import nn

from .. import nn as fused_nn
from ..ops.cross_entropy import cross_entropy
from ..ops.linear_cross_entropy import linear_cross_entropy
from . import _build


class FusedOps:
    """The fused layers and losses the models are built from (see ``_build``)."""

    MultiheadAttention = fused_nn.MultiheadAttention

    @staticmethod
    def linear(in_features, out_features, activation="none", bias=True):
        return fused_nn.Linear(in_features, out_features, bias=bias, activation=activation)

    @staticmethod
    def activation(activation):
        return nn.Identity()  # the activation runs inside the linear before it

    @staticmethod
    def cross_entropy(logits, targets):
        return cross_entropy(logits, targets)

    @staticmethod
    def lm_loss(hidden, head, targets):
        return None, linear_cross_entropy(hidden, head.weight, targets, linear_bias=head.bias)


class MLP(_build.MLP):
    __doc__ = _build.MLP.__doc__
    ops = FusedOps


class TransformerBlock(_build.TransformerBlock):
    __doc__ = _build.TransformerBlock.__doc__
    ops = FusedOps


class Transformer(_build.Transformer):
    __doc__ = _build.Transformer.__doc__
    ops = FusedOps
    block = TransformerBlock


__all__ = ["MLP", "Transformer", "TransformerBlock"]
