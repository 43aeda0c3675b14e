"""pykernels.nn.GatedMLP: the gated MLP of Llama-family models on the fused linear_glu."""

import torch

from ..activations import activation_id
from ..ops.linear_glu import linear_glu


class GatedMLP(torch.nn.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))`` with the gate and up products and the
    gating fused (:func:`pykernels.linear_glu`).

    The parameters are those of HuggingFace's ``LlamaMLP`` (``gate_proj``, ``up_proj``,
    ``down_proj``, torch.nn.Linear each), so its state_dict loads unchanged, and optimizers,
    weight tying and sharding see the same tensors.

    The fused op wants the gate and up weights stacked; they stay separate Parameters (state_dict
    keys and per-parameter gradients as in HF), so each forward concatenates them: a copy of
    2 * hidden * d_model values (read and written once, and the weight gradient is split
    back without a copy), which is small next to the GEMMs when the rows number in the
    hundreds or more (each weight value takes part in 2 * rows flops).
    """

    def __init__(self, d_model, hidden, activation="silu", bias=False, negative_slope=0.01,
                 device=None, dtype=None):
        super().__init__()
        activation_id(activation)
        factory = {"device": device, "dtype": dtype}
        self.gate_proj = torch.nn.Linear(d_model, hidden, bias=bias, **factory)
        self.up_proj = torch.nn.Linear(d_model, hidden, bias=bias, **factory)
        self.down_proj = torch.nn.Linear(hidden, d_model, bias=bias, **factory)
        self.activation = activation
        self.negative_slope = negative_slope

    def forward(self, x):
        weight = torch.cat([self.gate_proj.weight, self.up_proj.weight])
        bias = (None if self.gate_proj.bias is None
                else torch.cat([self.gate_proj.bias, self.up_proj.bias]))
        h = linear_glu(x, weight, bias, self.activation, negative_slope=self.negative_slope)
        return self.down_proj(h)

    def extra_repr(self):
        text = f"activation={self.activation}"
        if self.activation == "leaky_relu":
            text += f", negative_slope={self.negative_slope}"
        return text
