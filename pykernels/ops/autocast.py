"""torch.autocast for the fused ops.

Custom ops see no autocast of their own: inside ``torch.autocast`` their inputs arrive in
whatever dtype the previous op produced (a LayerNorm's float32, a parameter's float32), so
without this the backend would be picked for float32 (on CUDA: the torch reference) and
the fused half-precision kernels would never run. The public functions therefore cast
their matmul operands as autocast casts those of F.linear and
F.scaled_dot_product_attention: float32/float16/bfloat16 tensors on a device where
autocast is enabled go to its dtype; float64, integer and bool tensors are left alone (as
autocast leaves them). The cast is an ordinary differentiable ``.to``, so gradients flow
back to the float32 leaves in their own dtype.
"""

import torch

_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)
_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu", "xla", "mtia", "maia")


def autocast_operands(*tensors):
    """``tensors`` cast to the autocast dtype of their device where autocast is on there
    (None and non-tensors pass through unchanged, for the argument checks to report)."""
    for first in tensors:
        if isinstance(first, torch.Tensor):
            break
    else:
        return tensors
    device_type = first.device.type
    # meta (and other device types without an autocast mode) have nothing to cast
    if device_type not in _AUTOCAST_DEVICE_TYPES or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _ELIGIBLE else t
                 for t in tensors)
