"""Plain-PyTorch definitions that every backend is checked against (the ``torch`` backend)."""

import torch
import torch.nn.functional as F

from .activations import activation_id


def activation(z, name, negative_slope=0.01):
    """The torch.nn.functional activation called ``name`` applied to ``z``."""
    activation_id(name)
    if name == "none":
        return z
    if name == "relu":
        return F.relu(z)
    if name == "gelu":
        return F.gelu(z)
    if name == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if name == "silu":
        return F.silu(z)
    if name == "sigmoid":
        return z.sigmoid()
    if name == "tanh":
        return z.tanh()
    return F.leaky_relu(z, negative_slope)


def linear_act(input, weight, bias=None, activation_name="none", negative_slope=0.01):
    """act(input @ weight.T + bias), composed from torch.nn.functional."""
    return activation(F.linear(input, weight, bias), activation_name, negative_slope)


def linear_glu(input, weight, bias=None, activation_name="silu", negative_slope=0.01):
    """act(input @ Wg.T + bg) * (input @ Wu.T + bu), with weight = [Wg; Wu] stacked as
    (2 * out_features, in_features) and bias = [bg; bu] likewise."""
    gate, up = F.linear(input, weight, bias).chunk(2, dim=-1)
    return activation(gate, activation_name, negative_slope) * up


def class_dim(input):
    """The class dimension of cross-entropy logits: 0 for (C,), else 1 (as PyTorch)."""
    return 0 if input.dim() == 1 else 1


def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, z_loss=0.0, softcap=None):
    """F.cross_entropy, plus z_loss * logsumexp(x)**2 per row and logits capped by
    softcap * tanh(x / softcap). The z term joins each non-ignored row's loss before the
    reduction; 'mean' divides by PyTorch's own denominator (the summed class weight of the
    non-ignored targets, or the row count for probability targets)."""
    x = input if softcap is None else softcap * torch.tanh(input / softcap)
    ce = F.cross_entropy(x, target, weight, ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing)
    if z_loss == 0:
        return ce
    z = z_loss * torch.logsumexp(x, class_dim(x)) ** 2
    if not target.is_floating_point():
        z = z.masked_fill(target == ignore_index, 0)
    if reduction == "none":
        return ce + z
    if reduction == "sum":
        return ce + z.sum()
    if target.is_floating_point():
        denominator = z.numel()
    else:
        valid = target != ignore_index
        denominator = (valid.sum() if weight is None
                       else weight[target[valid]].sum())
    return ce + z.sum() / denominator


def linear_cross_entropy(input, linear_weight, target, linear_bias=None, weight=None,
                         reduction="mean", ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                         softcap=None):
    """cross_entropy of the materialised logits input @ linear_weight.T + linear_bias."""
    return cross_entropy(F.linear(input, linear_weight, linear_bias), target, weight,
                         ignore_index, reduction, label_smoothing, z_loss, softcap)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False, window=None,
                                 softcap=None):
    """softmax(q k^T * scale [softcap] + mask) v, composed from plain torch ops.

    The contract of F.scaled_dot_product_attention (boolean masks: True may attend; float
    masks add; is_causal top-left), plus ``window=(left, right)`` (query i attends key j iff
    i - left <= j <= i + right; None on a side: unbounded) and ``softcap`` (softcap *
    tanh(s / softcap) on the scaled scores, before the mask). Rows with nothing to attend
    to give 0 and pass zero gradient. Dropout draws its mask with torch's own generator.
    """
    L, S = query.shape[-2], key.shape[-2]
    if scale is None:
        scale = query.shape[-1] ** -0.5
    if enable_gqa:
        group = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(group, -3)
        value = value.repeat_interleave(group, -3)
    s = (query @ key.transpose(-2, -1)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(L, device=query.device)[:, None]
    j = torch.arange(S, device=query.device)[None, :]
    allowed = torch.ones(L, S, dtype=torch.bool, device=query.device)
    if is_causal:
        allowed &= j <= i
    if window is not None:
        # sides beyond L + S are unbounded (and would overflow int64 arithmetic)
        left, right = (None if side is None else min(side, L + S) for side in window)
        if left is not None:
            allowed &= j >= i - left
        if right is not None:
            allowed &= j <= i + right
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        allowed = allowed & attn_mask
    elif attn_mask is not None:
        s = s + attn_mask
    s = s.masked_fill(~allowed, float("-inf"))
    valid = (s > float("-inf")).any(-1, keepdim=True)
    p = torch.softmax(torch.where(valid, s, 0), -1)  # no NaN, not even in the backward
    p = torch.where(valid, p, 0)
    if dropout_p > 0:
        p = F.dropout(p, dropout_p)
    return p @ value
