"""Comparison helpers shared by the tests and ``python -m pykernels check``.

The low-precision rule (docs/ARCHITECTURE.md, "Numerics rule of the tests"; as
FlashAttention's tests use it): a kernel's error against an exact reference (float64) may
be at most ``factor`` times the error plain PyTorch makes in the same dtype, plus a small
``atol``. A fixed tolerance would either hide regressions in float32 or fail honest
bfloat16 results.
"""

import torch

# atol of the rule per dtype: a few units of rounding of O(1) values.
DEFAULT_ATOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}


def max_abs_error(actual, exact):
    """max |actual - exact| computed in float64; 0 for empty tensors; inf on NaN mismatch."""
    a, e = actual.detach().double(), exact.detach().double()
    if a.shape != e.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != reference shape {tuple(e.shape)}")
    if a.numel() == 0:
        return 0.0
    same_nan = torch.isnan(a) == torch.isnan(e)
    if not bool(same_nan.all()):
        return float("inf")
    finite = ~torch.isnan(e)
    both_inf = torch.isinf(a) & torch.isinf(e) & (a == e)
    diff = torch.where(both_inf, torch.zeros_like(a), (a - e).abs())
    return float(diff[finite].max()) if bool(finite.any()) else 0.0


def within_low_precision_rule(actual, torch_same_dtype, exact, factor=2.0, atol=None):
    """(ok, error, tolerance): error(actual) <= factor * error(torch_same_dtype) + atol."""
    if atol is None:
        atol = DEFAULT_ATOL[actual.dtype]
    error = max_abs_error(actual, exact)
    tolerance = factor * max_abs_error(torch_same_dtype, exact) + atol
    return error <= tolerance, error, tolerance


def assert_low_precision_close(actual, torch_same_dtype, exact, name="output", factor=2.0,
                               atol=None):
    ok, error, tolerance = within_low_precision_rule(actual, torch_same_dtype, exact,
                                                     factor, atol)
    if not ok:
        raise AssertionError(
            f"{name}: max error {error:.3e} vs exact exceeds {tolerance:.3e} "
            f"({factor}x plain PyTorch's error in {actual.dtype} + atol)")
