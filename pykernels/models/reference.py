"""Plain torch.nn twins of :mod:`pykernels.models`: the same modules in the same order
(so the same parameter names, shapes and initial values for one seed), built from
torch.nn.Linear, torch.nn activation modules, torch.nn.MultiheadAttention and
torch.nn.functional.cross_entropy. The reference Transformer returns its logits with the
loss, since it forms them anyway."""

import torch.nn.functional as F
from torch import nn

from ..activations import activation_module
from . import _build


class ReferenceOps:
    """The torch.nn layers and losses (see ``_build``)."""

    MultiheadAttention = nn.MultiheadAttention

    @staticmethod
    def linear(in_features, out_features, activation="none", bias=True):
        return nn.Linear(in_features, out_features, bias=bias)

    @staticmethod
    def activation(activation):
        return activation_module(activation)

    @staticmethod
    def cross_entropy(logits, targets):
        return F.cross_entropy(logits, targets)

    @staticmethod
    def lm_loss(hidden, head, targets):
        logits = head(hidden)
        return logits, F.cross_entropy(logits, targets)


class MLP(_build.MLP):
    __doc__ = _build.MLP.__doc__
    ops = ReferenceOps


class TransformerBlock(_build.TransformerBlock):
    __doc__ = _build.TransformerBlock.__doc__
    ops = ReferenceOps


class Transformer(_build.Transformer):
    __doc__ = _build.Transformer.__doc__
    ops = ReferenceOps
    block = TransformerBlock


__all__ = ["MLP", "Transformer", "TransformerBlock"]
