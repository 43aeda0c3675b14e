"""Activation names and ids shared by every backend.

The ids match ``enum class Activation`` in ``kernels/activation.h`` (used by the CUDA and
C++ CPU kernels) and the constants the Triton kernels branch on.
"""

ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh", "leaky_relu")
ACTIVATION_IDS = {name: i for i, name in enumerate(ACTIVATIONS)}


def activation_id(activation):
    """The integer id of an activation name, or a ValueError naming the argument."""
    if not isinstance(activation, str) or activation not in ACTIVATION_IDS:
        raise ValueError(
            f"activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}"
        )
    return ACTIVATION_IDS[activation]


def grad_from_output(activation, negative_slope):
    """Whether act'(z) is a function of y = act(z) alone, so the forward may save y.

    relu' = [y > 0], sigmoid' = y (1 - y), tanh' = 1 - y^2, and for leaky_relu
    [y > 0] picks the branch exactly when negative_slope >= 0. gelu, gelu_tanh and silu
    need the pre-activation z. Saving y costs no memory of its own: the next layer keeps
    it alive as its input anyway.
    """
    if activation == "leaky_relu":
        return negative_slope >= 0
    return activation in ("none", "relu", "sigmoid", "tanh")
