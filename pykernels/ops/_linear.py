"""What the two linear families (linear_act.py, linear_glu.py) share: the checks of the
linear layer's arguments, the 2-D view of the input, and the gradients' fake shapes."""

from ..activations import activation_id
from . import _checks

EMPTY_SHAPE = (0,)


def check_args(input, weight, bias, activation, negative_slope):
    """Validate the public arguments; returns the activation id. Errors name the argument."""
    _checks.tensor(input, "input")
    _checks.tensor(weight, "weight", like=input)
    if bias is not None:
        _checks.tensor(bias, "bias", like=input)
    if weight.dim() != 2:
        raise ValueError(
            f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if input.dim() == 0 or input.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"input.shape[-1] must equal weight.shape[1] (in_features = {weight.shape[1]}), "
            f"got input of shape {tuple(input.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"bias must have shape ({weight.shape[0]},) (out_features), "
            f"got {tuple(bias.shape)}")
    _checks.real(negative_slope, "negative_slope")
    return activation_id(activation)


def rows(t):
    """``t`` as a 2-D (rows, last dim) tensor; explicit sizes, as -1 fails for 0 columns."""
    return t.reshape(t.shape[:-1].numel(), t.shape[-1])


def fake_grads(grad_out, input, weight, need_input_grad, need_weight_grad, has_bias):
    """Empty tensors shaped like a linear backward's (grad_input, grad_weight, grad_bias),
    (0,) where a gradient is not computed."""
    def maybe(shape, needed):
        return grad_out.new_empty(shape if needed else EMPTY_SHAPE)

    return (maybe(input.shape, need_input_grad), maybe(weight.shape, need_weight_grad),
            maybe(weight.shape[:1], has_bias))
