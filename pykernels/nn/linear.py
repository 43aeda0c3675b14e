"""pykernels.nn.Linear: torch.nn.Linear with a fused activation."""

import torch

from ..activations import activation_id
from ..ops.linear_act import linear_act


class Linear(torch.nn.Linear):
    """``act(x @ weight.T + bias)`` in one fused op.

    Same parameter names, shapes, initialisation and state_dict as torch.nn.Linear, so
    either loads the other's state_dict; ``activation`` and ``negative_slope`` as in
    :func:`pykernels.linear_act`.
    """

    def __init__(self, in_features, out_features, bias=True, activation="none",
                 negative_slope=0.01, device=None, dtype=None):
        activation_id(activation)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = activation
        self.negative_slope = negative_slope

    @classmethod
    def from_torch(cls, linear, activation="none", negative_slope=0.01):
        """A fused Linear that shares ``linear``'s weight and bias Parameters (no copy)."""
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        activation_id(activation)
        fused = cls.__new__(cls)
        torch.nn.Module.__init__(fused)
        fused.in_features = linear.in_features
        fused.out_features = linear.out_features
        fused.weight = linear.weight
        fused.register_parameter("bias", linear.bias)
        fused.activation = activation
        fused.negative_slope = negative_slope
        fused.train(linear.training)
        return fused

    def forward(self, input):
        return linear_act(input, self.weight, self.bias, self.activation,
                          negative_slope=self.negative_slope)

    def extra_repr(self):
        text = f"{super().extra_repr()}, activation={self.activation}"
        if self.activation == "leaky_relu":
            text += f", negative_slope={self.negative_slope}"
        return text
