"""Drop-in torch.nn modules backed by the fused ops."""

from .attention import MultiheadAttention
from .linear import Linear
from .loss import CrossEntropyLoss, LinearCrossEntropyLoss
from .transformer import TransformerDecoderLayer, TransformerEncoderLayer

__all__ = ["CrossEntropyLoss", "Linear", "LinearCrossEntropyLoss", "MultiheadAttention",
           "TransformerDecoderLayer", "TransformerEncoderLayer"]
