"""pykernels.nn.TransformerEncoderLayer / TransformerDecoderLayer: torch's layers with the
feed-forward on :func:`pykernels.linear_act` and the attention on the fused
:class:`pykernels.nn.MultiheadAttention`."""

import torch

from ..activations import activation_of
from ..ops.linear_act import linear_act
from ._clone import clone_as
from .attention import MultiheadAttention


class _FusedLayer:
    """What the fused encoder and decoder layers share: construction (as torch's layer, then
    the attention modules swapped for fused ones) and the fused feed-forward."""

    _torch_class = None  # the torch.nn layer this one is a drop-in for

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._fuse_parts()

    @classmethod
    def from_torch(cls, layer):
        """The fused layer over ``layer``'s Parameters, norms and dropouts (shared, not
        copied), so the state_dict keys are the same; ``layer`` itself is left as it was.
        Its attention modules become fused clones sharing their Parameters."""
        if not isinstance(layer, cls._torch_class):
            raise TypeError(f"layer must be a {cls._torch_class.__module__}."
                            f"{cls._torch_class.__name__}, got {type(layer).__name__}")
        fused = clone_as(layer, cls)
        fused._fuse_parts()
        return fused

    def _fuse_parts(self):
        fused = activation_of(self.activation)
        if fused is None:
            raise ValueError(f"activation must be relu or gelu (a string, the torch.nn "
                             f"module or function) or another activation module with a "
                             f"fused kernel; got {self.activation!r}")
        self.fused_activation, self.negative_slope = fused
        for name in ("self_attn", "multihead_attn"):
            attention = getattr(self, name, None)
            if attention is not None and not isinstance(attention, MultiheadAttention):
                setattr(self, name, MultiheadAttention.from_torch(attention))

    def _fused_ff(self, x):
        """linear2(dropout(act(linear1(x)))), the first linear and the activation fused."""
        hidden = linear_act(x, self.linear1.weight, self.linear1.bias, self.fused_activation,
                            negative_slope=self.negative_slope)
        return linear_act(self.dropout(hidden), self.linear2.weight, self.linear2.bias)


class TransformerEncoderLayer(_FusedLayer, torch.nn.TransformerEncoderLayer):
    """torch.nn.TransformerEncoderLayer (same constructor, parameters, state_dict and
    forward) running linear1 + activation fused and self-attention on the fused kernel.

    torch's forward takes a fast path of its own (``torch._transformer_encoder_layer_fwd``)
    in inference; this one always runs the fused ops, except on nested tensors: those come
    only from torch.nn.TransformerEncoder's padding-sparsity inference path, have no fused
    kernel, and run torch's forward as before.
    """

    _torch_class = torch.nn.TransformerEncoderLayer

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        if src.is_nested:
            return super().forward(src, src_mask, src_key_padding_mask, is_causal)
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask,
                                   is_causal=is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask,
                                          is_causal=is_causal))
        return self.norm2(x + self._ff_block(x))

    def _ff_block(self, x):
        return self.dropout2(self._fused_ff(x))


class TransformerDecoderLayer(_FusedLayer, torch.nn.TransformerDecoderLayer):
    """torch.nn.TransformerDecoderLayer (same constructor, parameters, state_dict and
    forward) running linear1 + activation fused and self- and cross-attention on the fused
    kernel (torch's decoder layer has no fast path to bypass)."""

    _torch_class = torch.nn.TransformerDecoderLayer

    def _ff_block(self, x):
        return self.dropout3(self._fused_ff(x))
