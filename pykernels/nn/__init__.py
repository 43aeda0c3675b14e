"""Drop-in torch.nn modules backed by the fused ops."""

from .attention import MultiheadAttention
from .gated_mlp import GatedMLP
from .linear import Linear
from .loss import CrossEntropyLoss, LinearCrossEntropyLoss
from .transformer import TransformerDecoderLayer, TransformerEncoderLayer

__all__ = ["CrossEntropyLoss", "GatedMLP", "Linear", "LinearCrossEntropyLoss",
           "MultiheadAttention", "TransformerDecoderLayer", "TransformerEncoderLayer"]
