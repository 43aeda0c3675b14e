"""The activation math of the Triton kernels (linear_act, linear_glu), mirroring
kernels/common/activation.h, which the CUDA and C++ CPU backends share.

Not a family: every name here is meant to be imported by the family modules.
"""

import triton
import triton.language as tl

from ..activations import ACTIVATION_IDS
from ._common import tanh

NONE = tl.constexpr(ACTIVATION_IDS["none"])
RELU = tl.constexpr(ACTIVATION_IDS["relu"])
GELU = tl.constexpr(ACTIVATION_IDS["gelu"])
GELU_TANH = tl.constexpr(ACTIVATION_IDS["gelu_tanh"])
SILU = tl.constexpr(ACTIVATION_IDS["silu"])
SIGMOID = tl.constexpr(ACTIVATION_IDS["sigmoid"])
TANH = tl.constexpr(ACTIVATION_IDS["tanh"])
LEAKY_RELU = tl.constexpr(ACTIVATION_IDS["leaky_relu"])

# These constants go after a tensor in products, as in z * INV_SQRT2: under the
# interpreter, constexpr * tensor wraps the tensor in a constexpr.
INV_SQRT2 = tl.constexpr(0.70710678118654752440)
INV_SQRT_2PI = tl.constexpr(0.39894228040143267794)
SQRT_2_OVER_PI = tl.constexpr(0.79788456080286535588)
GELU_CUBIC = tl.constexpr(0.044715)


@triton.jit
def sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def apply_activation(z, ACTIVATION: tl.constexpr, negative_slope):
    """y = act(z), in z's dtype, with torch's semantics: relu and leaky_relu propagate NaN.

    gelu is 0.5 z (1 + erf(z / sqrt 2)) and gelu_tanh is
    0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3))).
    """
    if ACTIVATION == RELU:
        y = tl.where(z <= 0, 0.0, z)
    elif ACTIVATION == GELU:
        y = 0.5 * z * (1.0 + tl.math.erf(z * INV_SQRT2))
    elif ACTIVATION == GELU_TANH:
        y = 0.5 * z * (1.0 + tanh((z + z * GELU_CUBIC * z * z) * SQRT_2_OVER_PI))
    elif ACTIVATION == SILU:
        y = z * sigmoid(z)
    elif ACTIVATION == SIGMOID:
        y = sigmoid(z)
    elif ACTIVATION == TANH:
        y = tanh(z)
    elif ACTIVATION == LEAKY_RELU:
        y = tl.where(z > 0, z, z * negative_slope)
    else:
        y = z
    return y


@triton.jit
def activation_backward(dy, s, ACTIVATION: tl.constexpr, SAVED_IS_OUTPUT: tl.constexpr,
                         negative_slope):
    """dz = dy * act'(z), with s the output y (SAVED_IS_OUTPUT) or the pre-activation z.

    relu selects rather than multiplies: dz = s <= 0 ? 0 : dy. That makes a masked entry
    exactly 0 even where dy is inf or NaN, and passes dy through at s = NaN, as torch's
    threshold_backward does. For the other activations dz = dy * act', where act' is:
    leaky_relu: s > 0 ? 1 : slope (the same test works on y, because slope >= 0 there)
    sigmoid:    y (1 - y), y = s or sigmoid(z)
    tanh:       1 - y^2,   y = s or tanh(z)
    gelu:       Phi(z) + z phi(z)
    gelu_tanh:  0.5 (1 + t) + 0.5 z (1 - t^2) sqrt(2/pi) (1 + 3 c z^2),
                t = tanh(sqrt(2/pi) (z + c z^3))
    silu:       sig (1 + z (1 - sig)), sig = sigmoid(z)
    'none' has no case here: its dz is dy, and the caller does not load s for it.
    """
    if ACTIVATION == RELU:
        dz = tl.where(s <= 0, 0.0, dy)
    else:
        if ACTIVATION == LEAKY_RELU:
            d = tl.where(s > 0, 1.0, negative_slope)
        elif ACTIVATION == SIGMOID:
            if SAVED_IS_OUTPUT:
                y = s
            else:
                y = sigmoid(s)
            d = y * (1.0 - y)
        elif ACTIVATION == TANH:
            if SAVED_IS_OUTPUT:
                y = s
            else:
                y = tanh(s)
            d = 1.0 - y * y
        elif ACTIVATION == GELU:
            d = (0.5 * (1.0 + tl.math.erf(s * INV_SQRT2))
                 + s * INV_SQRT_2PI * tl.exp(-0.5 * s * s))
        elif ACTIVATION == GELU_TANH:
            t = tanh((s + s * GELU_CUBIC * s * s) * SQRT_2_OVER_PI)
            d = 0.5 * (1.0 + t) + 0.5 * s * (1.0 - t * t) * SQRT_2_OVER_PI * (
                1.0 + s * (3.0 * GELU_CUBIC) * s
            )
        else:
            tl.static_assert(ACTIVATION == SILU, "'none' has no act': dz is dy")
            sig = sigmoid(s)
            d = sig * (1.0 + s * (1.0 - sig))
        dz = dy * d
    return dz
