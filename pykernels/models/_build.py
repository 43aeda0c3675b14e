"""The MLP and the Transformer, written once over a set of layer factories and loss
functions, the class attribute ``ops``: pykernels.models gives them the fused ones,
pykernels.models.reference the plain torch.nn ones. ``ops`` provides

    MultiheadAttention                   a torch.nn.MultiheadAttention class
    linear(in, out, activation="none", bias=True)
                                         a linear layer (the fused one applies activation)
    activation(name)                     the module in the slot after linear(..., name)
    cross_entropy(logits, targets)       mean cross-entropy, logits (N, C)
    lm_loss(hidden, head, targets)       (logits or None, cross-entropy of head(hidden))

Both twins build the same modules in the same order, so they have the same parameter
names, shapes and (for one seed) initial values.

A fused layer ``Linear + activation`` keeps the slot its activation module has in the
reference as an ``nn.Identity`` (what :func:`pykernels.fuse` does to a Sequential too), so
the state_dict keys line up.
"""

import numbers
from collections.abc import Sequence

import torch
from torch import nn

from ..activations import activation_id


def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _dropout(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ValueError(f"dropout must be in [0, 1), got {value!r}")
    return float(value)


class MLP(nn.Module):
    """``in_features -> hidden_features... -> out_features``: each hidden layer
    ``dropout(act(linear(x)))``, the last layer a bare linear. ``hidden_features`` is an int
    or a sequence of ints (empty: one linear layer).

    ``forward(x, targets=None)`` returns ``(logits, loss)``: the cross-entropy of the logits
    (``(..., out_features)``) against integer ``targets`` (``(...)``, ``-100`` ignored), or
    None without targets.
    """

    ops = None  # set by the fused and reference subclasses

    def __init__(self, in_features, hidden_features, out_features, activation="relu",
                 dropout=0.0):
        super().__init__()
        if isinstance(hidden_features, Sequence) and not isinstance(hidden_features, str):
            hidden = [_positive_int(h, "hidden_features[i]") for h in hidden_features]
        else:
            hidden = [_positive_int(hidden_features, "hidden_features")]
        sizes = [_positive_int(in_features, "in_features"), *hidden]
        out_features = _positive_int(out_features, "out_features")
        activation_id(activation)
        dropout = _dropout(dropout)
        layers = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [self.ops.linear(fan_in, fan_out, activation),
                       self.ops.activation(activation), nn.Dropout(dropout)]
        layers.append(self.ops.linear(sizes[-1], out_features))
        self.layers = nn.Sequential(*layers)

    def forward(self, x, targets=None):
        logits = self.layers(x)
        if targets is None:
            return logits, None
        return logits, self.ops.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                              targets.reshape(-1))


def _causal_mask(length, device):
    """torch.nn.MultiheadAttention's form of a causal mask (True = do not attend); with
    ``is_causal=True`` the fused and PyTorch attention only take it as the hint's witness."""
    return torch.ones(length, length, dtype=torch.bool, device=device).triu(1)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block on ``(batch, length, d_model)``:
    ``x = x + attn(ln1(x)); x = x + ff(ln2(x))``, with ``ff = dropout(linear(act(linear)))``
    and attention dropout ``dropout`` on the attention weights."""

    ops = None  # set by the fused and reference subclasses

    def __init__(self, d_model, n_heads, ff_dim=None, dropout=0.0, causal=False,
                 activation="gelu"):
        super().__init__()
        d_model = _positive_int(d_model, "d_model")
        n_heads = _positive_int(n_heads, "n_heads")
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        ff_dim = 4 * d_model if ff_dim is None else _positive_int(ff_dim, "ff_dim")
        activation_id(activation)
        dropout = _dropout(dropout)
        self.causal = bool(causal)
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = self.ops.MultiheadAttention(d_model, n_heads, dropout=dropout,
                                                batch_first=True)
        self.ln2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(self.ops.linear(d_model, ff_dim, activation),
                                self.ops.activation(activation),
                                self.ops.linear(ff_dim, d_model), nn.Dropout(dropout))

    def forward(self, x):
        h = self.ln1(x)
        mask = _causal_mask(x.shape[1], x.device) if self.causal else None
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask,
                          is_causal=self.causal)[0]
        return x + self.ff(self.ln2(x))


class Transformer(nn.Module):
    """A decoder-only (``causal=True``) or bidirectional language model: token + learned
    position embeddings, ``n_layers`` pre-LN blocks, a final LayerNorm and a bias-free LM
    head, tied to the token embedding when ``tie_weights``.

    ``forward(idx, targets=None)`` takes integer ``idx`` ``(batch, length)`` with
    ``length <= max_seq_len`` and returns ``(logits, loss)``: without targets the logits
    ``(batch, length, vocab_size)`` and None; with int64 targets (shape of idx, ``-100``
    ignored) the mean next-token cross-entropy; the fused model computes it from the final
    hidden states and the head weight without forming the logits, and returns None for them.
    """

    ops = None  # set by the fused and reference subclasses
    block = None  # their TransformerBlock

    def __init__(self, vocab_size, d_model, n_heads, n_layers, max_seq_len, ff_dim=None,
                 dropout=0.0, causal=True, tie_weights=True, activation="gelu"):
        super().__init__()
        vocab_size = _positive_int(vocab_size, "vocab_size")
        d_model = _positive_int(d_model, "d_model")
        n_layers = _positive_int(n_layers, "n_layers")
        self.max_seq_len = _positive_int(max_seq_len, "max_seq_len")
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(self.max_seq_len, d_model)
        # N(0, 1) embeddings would put logits of scale sqrt(d_model) on the tied head
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        self.drop = nn.Dropout(_dropout(dropout))
        self.blocks = nn.ModuleList(
            self.block(d_model, n_heads, ff_dim, dropout, causal, activation)
            for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = self.ops.linear(d_model, vocab_size, bias=False)
        if tie_weights:
            self.lm_head.weight = self.tok_emb.weight

    def forward(self, idx, targets=None):
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 \
                or idx.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"idx must be an int64 or int32 tensor of shape (batch, length), "
                            f"got {_describe(idx)}")
        if idx.shape[1] > self.max_seq_len:
            raise ValueError(f"idx has length {idx.shape[1]}, more than max_seq_len "
                             f"({self.max_seq_len})")
        if targets is not None and (not isinstance(targets, torch.Tensor)
                                    or targets.shape != idx.shape):
            raise ValueError(f"targets must be a tensor of idx's shape {tuple(idx.shape)}, "
                             f"got {_describe(targets)}")
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        if targets is None:
            return self.lm_head(x), None
        return self.ops.lm_loss(x.reshape(-1, x.shape[-1]), self.lm_head, targets.reshape(-1))


def _describe(value):
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} of shape {tuple(value.shape)}"
    return type(value).__name__
