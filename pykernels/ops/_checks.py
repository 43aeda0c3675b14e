"""Argument checks shared by every op, so that the same mistake gets the same exception
type and wording everywhere (docs/ARCHITECTURE.md, "One call, end to end"): a value of the
wrong type is a TypeError, a value of the right type but wrong size, shape, range or device
is a ValueError, and the message names the argument and what was expected."""

import math
import numbers

import torch
from torch import Tensor


def tensor(t, name, *, floating=True, like=None, like_name="input", same_dtype=True):
    """``t`` must be a tensor (floating point unless ``floating=False``); with ``like``, on
    its device and (``same_dtype``) of its dtype."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if like is not None:
        if same_dtype and t.dtype != like.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {like_name} has dtype "
                            f"{like.dtype}")
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device} but {like_name} is on {like.device}")


def real(value, name, low=None, high=None, *, low_open=False, high_open=False, finite=False):
    """``value`` as a float: a real number (not a bool), not NaN, within the bounds given
    (open at a side with ``low_open`` / ``high_open``), finite when ``finite``."""
    # exact float / int first: numbers.Real is an ABC, whose isinstance costs host time
    if type(value) not in (float, int) and (isinstance(value, bool)
                                            or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high or math.isnan(value) or (finite and math.isinf(value)):
        if low is None and high is None:
            raise ValueError(f"{name} must be a finite number, got {value}")
        lo = "(-inf" if low is None else ("(" if low_open else "[") + str(float(low))
        hi = "inf)" if high is None else str(float(high)) + (")" if high_open else "]")
        also = "finite and " if finite else ""
        raise ValueError(f"{name} must be {also}in {lo}, {hi}, got {value}")
    return value


def integer(value, name, low=None):
    """``value`` as an int: an integer (not a bool), at least ``low``."""
    if type(value) is not int and (isinstance(value, bool)
                                   or not isinstance(value, numbers.Integral)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value}")
    return int(value)


def choice(value, name, options):
    """``value`` must be one of ``options`` (strings)."""
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {', '.join(options)}; got {value!r}")
    return value


def no_grad_for(t, name, op, why="the kernel backends do not differentiate it"):
    """A tensor argument the op cannot differentiate must not ask for a gradient: PyTorch
    raises for such arguments too, and a silently missing gradient is a wrong result."""
    if isinstance(t, Tensor) and t.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"pykernels.{op}: {name} requires grad, but {why}; detach it "
                         f"(or use backend='torch')")
