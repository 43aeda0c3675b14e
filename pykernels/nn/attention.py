"""pykernels.nn.MultiheadAttention: torch.nn.MultiheadAttention on the fused kernels."""

import warnings

import torch

from ..ops.attention import scaled_dot_product_attention
from ..ops.linear_act import linear_act
from ._clone import clone_as


def _additive(mask, dtype):
    """A torch.nn.MultiheadAttention mask (bool: True = do not attend; float: added) as an
    additive float mask."""
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


class MultiheadAttention(torch.nn.MultiheadAttention):
    """torch.nn.MultiheadAttention with the projections on :func:`pykernels.linear_act` and
    the attention on :func:`pykernels.scaled_dot_product_attention`.

    A subclass of torch's: the same parameters, state_dict, forward signature and return
    value ``(output, weights)``. With ``need_weights=False`` the fused path runs (weights
    None); with ``need_weights=True`` (torch's default; warned once per module), or with
    add_bias_kv / add_zero_attn, PyTorch's own forward computes the weights as it always
    does.
    """

    @classmethod
    def from_torch(cls, attention):
        """The fused module over ``attention``'s Parameters (shared, not copied), options
        and hooks; ``attention`` itself is left as it was."""
        if not isinstance(attention, torch.nn.MultiheadAttention):
            raise TypeError(f"attention must be a torch.nn.MultiheadAttention, got "
                            f"{type(attention).__name__}")
        return clone_as(attention, cls)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        if need_weights or self.bias_k is not None or self.add_zero_attn:
            if need_weights and not getattr(self, "_warned_need_weights", False):
                # torch's default is need_weights=True, so a plain mha(x, x, x) call would
                # otherwise never reach the fused kernel without anyone noticing
                self._warned_need_weights = True
                warnings.warn("pykernels.nn.MultiheadAttention called with need_weights=True "
                              "runs PyTorch's attention, not the fused kernel; pass "
                              "need_weights=False to use it", stacklevel=2)
            return super().forward(query, key, value, key_padding_mask, need_weights,
                                   attn_mask, average_attn_weights, is_causal)
        if is_causal and attn_mask is None:
            raise RuntimeError("is_causal=True is a hint that attn_mask is the causal mask; "
                               "pass attn_mask too (as torch.nn.MultiheadAttention)")
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        # (L, N, E) from here on, as torch's functional form
        length, batch, embed = query.shape
        heads, head_dim = self.num_heads, self.head_dim
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)

        def heads_first(x, w, b):  # (len, N, E_in) -> (N, heads, len, head_dim)
            y = linear_act(x, w, b)
            return y.view(x.shape[0], batch, heads, head_dim).permute(1, 2, 0, 3)

        q, k, v = heads_first(query, w_q, b_q), heads_first(key, w_k, b_k), \
            heads_first(value, w_v, b_v)
        mask, causal = None, False
        if is_causal and key_padding_mask is None:
            causal = True  # attn_mask is the causal mask, by the hint's contract
        else:
            mask = _additive(attn_mask, q.dtype)
            if mask is not None and mask.dim() == 3:  # (N * heads, L, S)
                mask = mask.view(batch, heads, *mask.shape[1:])
            padding = _additive(key_padding_mask, q.dtype)
            if padding is not None:
                padding = padding.view(batch, 1, 1, -1)
                mask = padding if mask is None else mask + padding
        out = scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal)
        out = out.permute(2, 0, 1, 3).reshape(length, batch, embed)
        out = linear_act(out, self.out_proj.weight, self.out_proj.bias)
        if unbatched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, None
