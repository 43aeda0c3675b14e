"""What a family's cases module hands to the generic op checks (test_ops_generic.py).

A family module (``<family>_cases.py``) builds, from its own inputs:
- ``cases()``: ``Case`` objects, each one call of the op on one backend with the plain-torch
  reference it must equal, and the generic checks it feeds (``float64``: values and
  gradients against the reference within ``tol``; ``float32``: the low-precision rule of
  pykernels.testing against float64; ``gradcheck``);
- ``opchecks()``: ``OpCheck`` objects, one torch.library opcheck of a registered op each;
- ``bad_inputs()``: ``BadInput`` objects, one wrong call each and the error naming the
  argument that it must raise.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from pykernels.testing import assert_low_precision_close


@dataclass
class Case:
    id: str
    inputs: Callable[[], tuple]  # float64 tensors; those requiring grad are differentiated
    ours: Callable
    reference: Callable  # plain PyTorch, run on the same tensors
    checks: tuple = ("float64",)
    tol: float = 1e-10  # of the float64 comparison
    atol: float | None = None  # of the float64 comparison where it differs from tol
    # (name, exact output, dtype) -> atol of the low-precision rule for that output, or None
    rule_atol: Callable | None = None
    seed: int = 0  # torch's global seed for gradcheck (fast mode draws random directions)
    gradcheck: dict = field(default_factory=dict)  # gradcheck's options (fast_mode)
    grad_out: Callable | None = None  # inputs -> float64 grad_output; default seeded randn
    names: tuple = ("out", "grad_input", "grad_weight", "grad_bias")
    marks: tuple = ()


@dataclass
class OpCheck:
    id: str
    op: Any
    args: Callable[[], tuple]
    test_utils: tuple | None = None  # None: opcheck's default set
    marks: tuple = ()


@dataclass
class BadInput:
    id: str
    call: Callable[[], Any]
    error: type
    pattern: str
    marks: tuple = ()
    # (monkeypatch) -> None: makes a kernel call fail, for "raised before any kernel ran"
    guard: Callable | None = field(default=None, repr=False)


def params(family, items):
    return [pytest.param(item, id=f"{family}-{item.id}", marks=item.marks) for item in items]


def present(*tensors):
    """The inputs of a case without its absent (None) optional tensors."""
    return tuple(t for t in tensors if t is not None)


def non_contiguous_linear(out_features, seed):
    """(input, weight, bias) of a linear layer in float64, none of them contiguous: input
    (9, 2, 13) transposed, weight (out_features, 13) transposed, bias with stride 2."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(13, 2, 9, generator=g, dtype=torch.float64).transpose(0, 2)
    w = torch.randn(13, out_features, generator=g, dtype=torch.float64).t()
    b = torch.randn(2 * out_features, generator=g, dtype=torch.float64)[::2]
    assert not x.is_contiguous() and not w.is_contiguous() and not b.is_contiguous()
    return tuple(t.requires_grad_() for t in (x, w, b))


def differentiable(inputs):
    return [t for t in inputs if t.requires_grad]


def default_grad_out(out, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device)


def forward_and_grads(fn, inputs, grad_out):
    """[fn(*inputs), d(out . grad_out)/d(each input requiring grad)]."""
    out = fn(*inputs)
    return [out, *torch.autograd.grad(out, differentiable(inputs), grad_out.to(out.dtype))]


def grad_out_for(case, inputs):
    out = case.reference(*inputs)
    return case.grad_out(inputs) if case.grad_out else default_grad_out(out)


def assert_float64_matches(case):
    inputs = case.inputs()
    grad_out = grad_out_for(case, inputs)
    ours = forward_and_grads(case.ours, inputs, grad_out)
    ref = forward_and_grads(case.reference, inputs, grad_out)
    assert len(ours) == len(ref)
    for name, a, e in zip(case.names, ours, ref, strict=False):
        assert a.shape == e.shape, name
        atol = case.tol if case.atol is None else case.atol
        torch.testing.assert_close(a, e, rtol=case.tol, atol=atol,
                                   msg=lambda m, name=name: f"{case.id} {name}: {m}")


def assert_low_precision_rule(case, dtype=torch.float32):
    """ours in ``dtype`` has at most the rule's multiple of plain torch's error in ``dtype``,
    both against the float64 reference (pykernels.testing)."""
    exact = case.inputs()
    grad_out = grad_out_for(case, exact)
    # class-index targets and bool masks keep their dtype
    low = tuple(t.detach().to(dtype).requires_grad_(t.requires_grad)
                if t.is_floating_point() else t for t in exact)
    ours = forward_and_grads(case.ours, low, grad_out)
    plain = forward_and_grads(case.reference, low, grad_out)
    ref = forward_and_grads(case.reference, exact, grad_out)
    assert len(ours) == len(ref)
    for name, a, p, e in zip(case.names, ours, plain, ref, strict=False):
        assert a.dtype == dtype and a.shape == e.shape, name
        atol = case.rule_atol(name, e, dtype) if case.rule_atol else None
        assert_low_precision_close(a, p, e, name=f"{case.id} {name}", atol=atol)
