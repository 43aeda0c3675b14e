"""pykernels.cross_entropy and linear_cross_entropy: every backend against plain PyTorch.

References are independent of the kernels: torch.nn.functional.cross_entropy (and
torch.nn.functional.linear_cross_entropy where torch has it) for everything PyTorch defines,
pykernels.reference for z_loss and softcap, itself checked here against the formulas written
out from the definitions. Exact references are float64; float32 and the half types follow the
low-precision rule of docs/ARCHITECTURE.md (pykernels.testing).

Gradcheck, float64 and float32 against the reference, opcheck and bad inputs are the generic
checks of test_ops_generic.py, fed by cross_entropy_cases.py; this file holds the rest.

Triton runs on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py) and is slow there:
its cases are small and few.
"""

import importlib.util
import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import cpu_kernel_backends, gpu_kernel_backends, pairwise
from cross_entropy_cases import (
    CPU_CASES,
    LCE_CASES,
    NO_AOT,
    TRITON_CASES,
    assert_rule,
    case_id,
    ce_op_args,
    lce_grads,
    lce_op_args,
    loss_and_grad,
    loss_atol,
    make_case,
    make_lce,
    ours_fn,
    random_grad_output,
    reference_fn,
    torch_fn,
    valid_case,
)
from torch.library import opcheck
from torch.utils._python_dispatch import TorchDispatchMode

import pykernels
from pykernels import reference
from pykernels.ops import _cross_entropy_common as ce_common
from pykernels.ops import linear_cross_entropy_chunks as lce_chunks
from pykernels.testing import assert_low_precision_close

ROOT = Path(__file__).resolve().parents[2]
CPU_BACKENDS = cpu_kernel_backends()
INF = float("inf")
HAS_TORCH_LCE = hasattr(F, "linear_cross_entropy")
needs_torch_lce = pytest.mark.skipif(
    not HAS_TORCH_LCE, reason="torch.nn.functional.linear_cross_entropy needs torch >= 2.13")

# The interpreter evaluates masked-off lanes too (-inf - -inf, log 0) and numpy warns.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


# ---- helpers ----------------------------------------------------------------------------

def formula_cross_entropy(x, target, weight=None, ignore_index=-100, reduction="mean",
                          label_smoothing=0.0, z_loss=0.0, softcap=None):
    """Cross-entropy written out from its definitions (float64, no F.cross_entropy): checks
    pykernels.reference, which defines z_loss and softcap for the kernels."""
    rows = (x.unsqueeze(0) if x.dim() == 1 else x.movedim(1, -1))
    num_classes = rows.shape[-1]
    rows = rows.reshape(-1, num_classes)
    s = rows if softcap is None else softcap * torch.tanh(rows / softcap)
    lse = torch.logsumexp(s, -1)
    neg_log_p = lse[:, None] - s
    w = torch.ones(num_classes, dtype=x.dtype) if weight is None else weight
    eps = label_smoothing
    if target.is_floating_point():
        q = (target.unsqueeze(0) if target.dim() == 1 else target.movedim(1, -1))
        q = (1 - eps) * q.reshape(-1, num_classes) + eps / num_classes
        loss = (w * q * neg_log_p).sum(-1) + z_loss * lse**2
        denominator = loss.shape[0]
    else:
        t = target.reshape(-1)
        keep = t != ignore_index
        tc = torch.where(keep, t, 0)
        w_t = torch.where(keep, w[tc], 0)
        smooth = (w * neg_log_p).sum(-1)
        loss = ((1 - eps) * w_t * neg_log_p.gather(1, tc[:, None])[:, 0]
                + eps / num_classes * smooth + z_loss * lse**2)
        loss = torch.where(keep, loss, 0)
        denominator = w_t.sum()
    if reduction == "none":
        return loss.reshape(x.shape[:0] if x.dim() == 1 else x.shape[:1] + x.shape[2:])
    return loss.sum() if reduction == "sum" else loss.sum() / denominator


def backend_params(cpu, triton, one_arg=False):
    """(backend, *combo) params: every combo (tuple of arguments, or one argument with
    ``one_arg``) of ``cpu`` on the cpu backend, the fewer of ``triton`` under the (slow)
    interpreter."""
    params = []
    for backend in CPU_BACKENDS:
        for combo in (triton if backend == "triton" else cpu):
            combo = (combo,) if one_arg else combo
            name = "-".join([backend] + ["x".join(map(str, c)) if isinstance(c, tuple)
                                         else str(c) for c in combo])
            params.append(pytest.param(backend, *combo, id=name))
    return params


def test_backends_and_cases():
    assert "cpu" in CPU_BACKENDS
    if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton"):
        assert "triton" in CPU_BACKENDS  # the triton tests below must not silently vanish
    for cases in (CPU_CASES, TRITON_CASES):
        for name, values in [("target", ["index", "prob"]), ("ignore", ["none", "rows", "class"]),
                             ("label_smoothing", [0.0, 0.3]), ("weight", [False, True]),
                             ("reduction", ["none", "mean", "sum"]), ("z_loss", [0.0, 0.01]),
                             ("softcap", [None, 2.5])]:
            assert {repr(c[name]) for c in cases} == {repr(v) for v in values}, name
        assert len({c["shape"] for c in cases}) == 4


# ---- the references ----------------------------------------------------------------------

@pytest.mark.parametrize("case, seed", [
    pytest.param(case, i + 100, id=f"{name}-{case_id(case)}")
    for name, cases in [("cpu_cases", CPU_CASES), ("triton_cases", TRITON_CASES)]
    for i, case in enumerate(cases)])
def test_reference_equals_the_formulas(case, seed):
    """pykernels.reference (the float64 reference of every backend in test_ops_generic)
    equals the formulas written out from the definitions, on the generic checks' inputs."""
    x, target, weight, kwargs = make_case(case, seed=seed)
    torch.testing.assert_close(reference.cross_entropy(x, target, weight, **kwargs),
                               formula_cross_entropy(x, target, weight, **kwargs),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape, options", [
    ((257, 1025), dict()),
    ((65, 4099), dict(label_smoothing=0.1, weight=True, ignore="rows")),
    ((3, 97, 129), dict(z_loss=1e-4, softcap=30.0, reduction="none")),
    ((2, 131073), dict(target="prob", label_smoothing=0.05, reduction="sum")),
    ((129, 2053), dict(label_smoothing=0.1, weight=True, ignore="class", z_loss=1e-4,
                       softcap=30.0, reduction="sum")),
], ids=["257x1025-plain", "65x4099-smooth-weight-ignore", "3x97x129-z-softcap-none",
        "2x131073-prob-sum", "129x2053-all"])
def test_cpu_float32_larger_shapes(shape, options):
    case = {"shape": shape, "target": "index", "ignore": "none", "label_smoothing": 0.0,
            "weight": False, "reduction": "mean", **options}
    exact_x, target, weight, kwargs = make_case(case, seed=sum(shape), scale=4.0)
    grad_output = random_grad_output(
        reference.cross_entropy(exact_x, target, weight, **kwargs).shape)
    t32 = target.float() if target.is_floating_point() else target
    w32 = None if weight is None else weight.float()
    ours = loss_and_grad(ours_fn("cpu", t32, w32, kwargs), exact_x.float(), grad_output)
    plain = loss_and_grad(reference_fn(t32, w32, kwargs), exact_x.float(), grad_output)
    exact = loss_and_grad(reference_fn(target, weight, kwargs), exact_x, grad_output)
    assert_rule(ours, plain, exact, f"cpu {case_id(case)}")


# ---- PyTorch semantics ------------------------------------------------------------------

_SEMANTICS = {
    "target": ["index", "prob"],
    "ignore": ["none", "rows", "class"],
    "label_smoothing": [0.0, 0.3],
    "weight": [False, True],
    "reduction": ["none", "mean", "sum"],
}
_ALL_SEMANTICS = [dict(zip(_SEMANTICS, v, strict=True))
                  for v in itertools.product(*_SEMANTICS.values())]
_ALL_SEMANTICS = [c for c in _ALL_SEMANTICS if valid_case(c)]


@pytest.mark.parametrize("backend, shape", backend_params(
    [(97,), (7, 97), (4, 33, 5), (3, 11, 2, 3)], [(97,), (4, 33, 5)], one_arg=True))
def test_equals_torch_cross_entropy(backend, shape):
    """z_loss=0 and no softcap is F.cross_entropy, option for option: every combination for
    the cpu backend's (N, C) and (N, C, d) inputs, all pairs for the others and triton."""
    every = backend == "cpu" and len(shape) in (2, 3)
    combos = _ALL_SEMANTICS if every else pairwise({"shape": [shape], **_SEMANTICS}, valid_case)
    for i, combo in enumerate(combos):
        case = {**combo, "shape": shape}
        x, target, weight, kwargs = make_case(case, seed=i)
        del kwargs["z_loss"], kwargs["softcap"]
        grad_output = random_grad_output(
            F.cross_entropy(x, target, weight, **kwargs).shape, seed=i)
        ours = loss_and_grad(ours_fn(backend, target, weight, kwargs), x, grad_output)
        torch_ = loss_and_grad(torch_fn(target, weight, kwargs), x, grad_output)
        for a, e in zip(ours, torch_, strict=True):
            assert a.shape == e.shape, case_id(case)
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12, msg=case_id(case))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weight", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_every_target_ignored_like_torch(backend, reduction, weight, label_smoothing):
    # 'mean' over nothing is 0/0 = NaN in PyTorch; the gradient is 0.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 7, generator=g, dtype=torch.float64)
    target = torch.full((4,), -100)
    w = torch.rand(7, generator=g, dtype=torch.float64) if weight else None
    kwargs = {"reduction": reduction, "label_smoothing": label_smoothing}
    grad_output = random_grad_output(() if reduction != "none" else (4,))
    ours = loss_and_grad(ours_fn(backend, target, w, kwargs), x, grad_output)
    torch_ = loss_and_grad(torch_fn(target, w, kwargs), x, grad_output)
    if reduction == "mean":
        assert torch.isnan(ours[0]) and torch.isnan(torch_[0])
    for a, e in zip(ours, torch_, strict=True):
        torch.testing.assert_close(a, e, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5), (0, 5, 3), (2, 5, 0), (3, 4, 0, 2)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("target_kind", ["index", "prob"])
def test_zero_rows_like_torch(backend, shape, target_kind):
    x = torch.randn(shape, dtype=torch.float64)
    target = (torch.rand(shape, dtype=torch.float64) if target_kind == "prob"
              else torch.zeros(shape[:1] + shape[2:], dtype=torch.long))
    for reduction in ["none", "mean", "sum"]:
        grad_output = random_grad_output(shape[:1] + shape[2:] if reduction == "none" else ())
        kwargs = {"reduction": reduction}
        ours = loss_and_grad(ours_fn(backend, target, None, kwargs), x, grad_output)
        torch_ = loss_and_grad(torch_fn(target, None, kwargs), x, grad_output)
        for a, e in zip(ours, torch_, strict=True):
            assert a.shape == e.shape
            torch.testing.assert_close(a, e, equal_nan=True)  # mean: NaN, sum: 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs(backend):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 33, 4, 2, generator=g, dtype=torch.float64).permute(0, 1, 3, 2)
    target = torch.randint(0, 33, (3, 4, 4), generator=g)[:, :, ::2].transpose(1, 2)
    probs = torch.rand(3, 33, 4, 2, generator=g, dtype=torch.float64).permute(0, 1, 3, 2)
    weight = torch.rand(66, generator=g, dtype=torch.float64)[::2]
    assert not (x.is_contiguous() or target.is_contiguous() or probs.is_contiguous()
                or weight.is_contiguous())
    grad_output = torch.randn(4, 2, 3, generator=g, dtype=torch.float64).permute(2, 1, 0)
    for t in (target, probs):
        kwargs = {"reduction": "none", "label_smoothing": 0.1}
        ours = loss_and_grad(ours_fn(backend, t, weight, kwargs), x, grad_output)
        torch_ = loss_and_grad(torch_fn(t, weight, kwargs), x, grad_output)
        for a, e in zip(ours, torch_, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


# ---- extreme values ---------------------------------------------------------------------

def extreme_logits(num_classes=97, seed=1):
    """Rows with logits of order 1e4, masked (-inf) classes, and only the target finite."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(7, num_classes, generator=g, dtype=torch.float64) * 3
    x[0] *= 1e4 / 3                                # random logits of order +-1e4
    x[1, ::2], x[1, 1::2] = 1e4, -1e4              # target (2) at +1e4
    x[2, 10:50] = -INF                             # a masked vocabulary
    x[3] = -INF
    x[3, 5] = 2.0                                  # only the target finite
    x[4] = -INF
    x[4, 7] = 1e4                                  # only the target finite, at 1e4
    x[5] = -1e4
    x[5, 3] = -INF
    x[5, 20] = 1e4                                 # target (9) at -1e4, another at 1e4
    x[6, 3] = -INF
    target = torch.tensor([1, 2, 3, 5, 7, 9, 11])
    return x, target


EXTREME_OPTIONS = [
    dict(),
    dict(label_smoothing=0.1),
    dict(z_loss=1e-4),
    dict(softcap=30.0),
    dict(label_smoothing=0.1, z_loss=1e-4, softcap=30.0, weight=True),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("options", EXTREME_OPTIONS,
                         ids=["plain", "smoothing", "z_loss", "softcap", "all"])
def test_extreme_logits(backend, options):
    x, target = extreme_logits()
    options = dict(options)
    weight = (torch.rand(x.shape[1], generator=torch.Generator().manual_seed(2),
                         dtype=torch.float64) + 0.5) if options.pop("weight", False) else None
    kwargs = {"reduction": "none", **options}
    grad_output = random_grad_output(x.shape[:1])
    exact = loss_and_grad(reference_fn(target, weight, kwargs), x, grad_output)
    ours64 = loss_and_grad(ours_fn(backend, target, weight, kwargs), x, grad_output)
    # Same values, inf where PyTorch has inf (label smoothing over -inf logits).
    for a, e in zip(ours64, exact, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9, equal_nan=True)
    w32 = None if weight is None else weight.float()
    ours = loss_and_grad(ours_fn(backend, target, w32, kwargs), x.float(), grad_output)
    plain = loss_and_grad(reference_fn(target, w32, kwargs), x.float(), grad_output)
    # The rule also fails on any finite/inf/NaN mismatch with the exact result.
    assert_rule(ours, plain, exact, f"{backend} extreme {options}")
    assert torch.isfinite(ours[1]).all()
    if not options:
        # Only the target finite: p = one-hot, loss 0 and gradient 0, exactly.
        assert ours[0][3] == 0 and ours[0][4] == 0
        assert not ours[1][3].any() and not ours[1][4].any()
        # Masked classes get exactly no gradient.
        assert not ours[1][2, 10:50].any()


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="needs the Triton interpreter")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_interpreter_half_types_extreme_rows(dtype):
    """The public API takes only float32/float64 for Triton on CPU tensors
    (pykernels.backends), but the interpreter runs fp16 and bf16: the row kernel itself is
    checked in them here, extreme rows included."""
    from pykernels.triton.cross_entropy import cross_entropy_rows

    x, target = extreme_logits()
    x[6] = x[6] * 5
    low = x.to(dtype)
    grad = torch.empty_like(low)
    rows = cross_entropy_rows(low.view(7, 97, 1), target, None, -100, 0.0, 0.0, 0.0,
                              grad.view(7, 97, 1), torch.ones(1))
    exact = loss_and_grad(reference_fn(target, None, {"reduction": "none"}), low.double(),
                          torch.ones(7, dtype=torch.float64))
    plain = loss_and_grad(reference_fn(target, None, {"reduction": "none"}), low,
                          torch.ones(7, dtype=torch.float64))
    assert rows.dtype == torch.float32 and grad.dtype == dtype
    assert_rule((rows.to(dtype), grad), plain, exact, f"triton interpreter {dtype}")
    assert torch.isfinite(rows).all() and torch.isfinite(grad).all()


# ---- autograd: saved gradient, grad_output, no-grad path --------------------------------

def _simple_case(seed=0, shape=(9, 97)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    target = torch.randint(0, shape[1], shape[:1] + shape[2:], generator=g)
    target.view(-1)[::4] = -100
    return x, target


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_second_backward_through_same_graph(backend, reduction, inplace_backward):
    # The default keeps PyTorch's contract (a second backward gives the same gradient);
    # inplace_backward=True consumes its saved gradient and says so on a second backward.
    x, target = _simple_case()
    x.requires_grad_()
    kwargs = {"reduction": reduction, "label_smoothing": 0.1}
    loss = pykernels.cross_entropy(x, target, backend=backend,
                                   inplace_backward=inplace_backward, **kwargs)
    grad_output = random_grad_output(loss.shape)
    (first,) = torch.autograd.grad(loss, x, grad_output, retain_graph=True)
    ref = loss_and_grad(reference_fn(target, None, kwargs), x, grad_output)
    torch.testing.assert_close(loss.detach(), ref[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(first, ref[1], rtol=1e-10, atol=1e-12)
    if inplace_backward:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            torch.autograd.grad(loss, x, grad_output)
    else:
        (second,) = torch.autograd.grad(loss, x, grad_output)
        assert torch.equal(first, second)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("scale", [1.0, 2.5, -0.75, 0.0])
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_grad_output_scales_the_gradient(backend, reduction, scale, inplace_backward):
    # inplace_backward: scale 1 takes the kernels' skip path (no multiply), the others the
    # in-place multiply; the default folds the scale into the backward's row kernel.
    x, target = _simple_case(seed=3)
    x.requires_grad_()
    loss = pykernels.cross_entropy(x, target, backend=backend, reduction=reduction,
                                   z_loss=1e-3, inplace_backward=inplace_backward)
    (scale * loss).backward()
    xr = x.detach().requires_grad_()
    (scale * reference.cross_entropy(xr, target, reduction=reduction, z_loss=1e-3)).backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(9, 97), (4, 33, 5)], ids=["2d", "3d"])
def test_reduction_none_random_grad_output(backend, shape):
    x, target = _simple_case(seed=4, shape=shape)
    grad_output = random_grad_output(target.shape, seed=4)
    grad_output.view(-1)[::3] = 1.0  # some rows exactly 1: the per-row skip path
    kwargs = {"reduction": "none", "softcap": 4.0, "label_smoothing": 0.05}
    ours = loss_and_grad(ours_fn(backend, target, None, kwargs), x, grad_output)
    ref = loss_and_grad(reference_fn(target, None, kwargs), x, grad_output)
    for a, e in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(6, 33), (3, 33, 4)], ids=["2d", "3d"])
@pytest.mark.parametrize("then", ["sum", "mean", "expand"])
def test_reduction_none_then_expanded_grad_output(backend, shape, then):
    # .sum() hands the backward an expanded (stride 0) grad_output: it once made the cpu
    # kernel refuse it and the triton kernel read past its one element.
    x, target = _simple_case(seed=6, shape=shape)
    grad_output = torch.tensor(1.5, dtype=torch.float64).expand(target.shape)

    def reduce(loss):
        return {"sum": loss.sum(), "mean": loss.mean(),
                "expand": (loss * grad_output).sum()}[then]

    ours = loss_and_grad(lambda x: reduce(pykernels.cross_entropy(
        x, target, reduction="none", backend=backend)), x, torch.tensor(1.0))
    torch_ = loss_and_grad(lambda x: reduce(F.cross_entropy(x, target, reduction="none")), x,
                           torch.tensor(1.0))
    for a, e in zip(ours, torch_, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    if then == "sum":  # directly: an expanded grad_output into the loss's backward
        x = x.detach().requires_grad_()
        loss = pykernels.cross_entropy(x, target, reduction="none", backend=backend)
        (grad,) = torch.autograd.grad(loss, x, grad_output)
        torch.testing.assert_close(grad, 1.5 * torch_[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("target_kind", ["index", "prob"])
def test_no_grad_path_gives_the_same_loss(backend, target_kind):
    case = {"shape": (5, 97, 2), "target": target_kind, "ignore": "none",
            "label_smoothing": 0.1, "weight": True, "reduction": "none", "z_loss": 1e-2,
            "softcap": 3.0}
    x, target, weight, kwargs = make_case(case, seed=8)
    with_grad = pykernels.cross_entropy(x.requires_grad_(), target, weight, backend=backend,
                                        **kwargs)
    with torch.no_grad():
        no_grad = pykernels.cross_entropy(x, target, weight, backend=backend, **kwargs)
    plain = pykernels.cross_entropy(x.detach(), target, weight, backend=backend, **kwargs)
    assert with_grad.requires_grad
    assert not no_grad.requires_grad and no_grad.grad_fn is None and plain.grad_fn is None
    assert torch.equal(no_grad, with_grad.detach()) and torch.equal(plain, no_grad)
    torch.testing.assert_close(plain, reference.cross_entropy(x.detach(), target, weight,
                                                              **kwargs), rtol=1e-10, atol=1e-12)


def test_torch_backend_differentiates_probability_targets():
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    probs = torch.rand(3, 5, dtype=torch.float64).softmax(1).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, p: pykernels.cross_entropy(x, p, backend="torch", z_loss=0.1), (x, probs))


# ---- linear_cross_entropy ---------------------------------------------------------------

@pytest.mark.parametrize(("shape", "gpu", "cpu"), [
    # (rows, in_features, num_classes): the logits block as large as the input, >= 64 rows;
    # on the CPU >= 2^30 multiply-adds per GEMM unless that passes 2^24 logits
    ((2048, 256, 8192), 64, 512),
    ((2048, 16, 8192), 64, 2048),  # the CPU floor (8192 rows) capped by the rows
    ((8192, 16, 8192), 64, 2048),  # ... and by the 2^24-logit cap
    ((16384, 4096, 1024), 16384, 16384),  # the input-sized block is the whole input
    ((2048, 256, 128000), 64, 64),  # 64 rows already make long GEMMs
    ((5, 0, 3), 5, 5),
])
def test_linear_cross_entropy_default_chunk_size(shape, gpu, cpu):
    assert lce_chunks.default_chunk_size(*shape) == gpu
    assert lce_chunks.default_chunk_size(*shape, "cpu") == cpu


@needs_torch_lce
@pytest.mark.parametrize("name", list(LCE_CASES))
def test_reference_linear_cross_entropy_equals_torch(name):
    """pykernels.reference equals torch's linear_cross_entropy where torch defines the case
    (test_ops_generic compares every backend with torch's, on the same inputs)."""
    spec = dict(LCE_CASES[name])
    rows, smoothing = spec.pop("rows"), spec.get("smoothing", 0.0)
    x, w, b, t, cw = make_lce(rows, 13, 97, **spec, seed=len(name))
    # torch refuses ignore_index with probabilities
    ignore = {} if t.is_floating_point() else {"ignore_index": -100}
    for reduction in ["none", "mean", "sum"]:
        grad_output = random_grad_output(() if reduction != "none" or rows is None else (rows,))
        theirs = lce_grads(lambda x, w, b, r=reduction: F.linear_cross_entropy(
            x, w, t, linear_bias=b, weight=cw, reduction=r, label_smoothing=smoothing,
            **ignore), x, w, b, grad_output)
        ref = lce_grads(lambda x, w, b, r=reduction: reference.linear_cross_entropy(
            x, w, t, b, cw, r, -100, smoothing), x, w, b, grad_output)
        for a, e in zip(ref, theirs, strict=True):
            assert a.shape == e.shape and a.dtype == e.dtype
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_linear_cross_entropy_repeated_backward(backend, reduction, inplace_backward):
    x, w, _, t, _ = make_lce(13, 6, 33, ignore=True, seed=14)
    x.requires_grad_()
    w.requires_grad_()
    loss = pykernels.linear_cross_entropy(x, w, t, reduction=reduction, chunk_size=5,
                                          inplace_backward=inplace_backward, backend=backend)
    grad_output = random_grad_output(loss.shape)
    first = torch.autograd.grad(loss, (x, w), grad_output, retain_graph=True)
    ref = torch.autograd.grad(reference.linear_cross_entropy(x, w, t, reduction=reduction),
                              (x, w), grad_output)
    for a, e in zip(first, ref, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    if inplace_backward and reduction != "none":  # the saved gradients were scaled in place
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            torch.autograd.grad(loss, (x, w), grad_output)
    else:  # 'none' recomputes from the saved inputs; the default scales into new tensors
        second = torch.autograd.grad(loss, (x, w), grad_output)
        assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_linear_cross_entropy_only_requested_gradients_and_no_grad(backend):
    x, w, b, t, _ = make_lce(11, 5, 17, bias=True, seed=15)
    w.requires_grad_()
    loss = pykernels.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=4,
                                          backend=backend)
    loss.backward()
    wr = w.detach().requires_grad_()
    reference.linear_cross_entropy(x, wr, t, b).backward()
    assert x.grad is None and b.grad is None
    torch.testing.assert_close(w.grad, wr.grad, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        no_grad = pykernels.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=4,
                                                 backend=backend)
    assert no_grad.grad_fn is None and torch.equal(no_grad, loss.detach())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_linear_cross_entropy_zero_rows(backend, reduction):
    x, w, b, _, _ = make_lce(0, 5, 9, bias=True)
    t = torch.zeros(0, dtype=torch.long)
    ours = lce_grads(lambda x, w, b: pykernels.linear_cross_entropy(
        x, w, t, linear_bias=b, reduction=reduction, backend=backend), x, w, b,
        random_grad_output((0,) if reduction == "none" else ()))
    ref = lce_grads(lambda x, w, b: reference.linear_cross_entropy(
        x, w, t, b, reduction=reduction), x, w, b,
        random_grad_output((0,) if reduction == "none" else ()))
    for a, e in zip(ours, ref, strict=True):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e, equal_nan=True)  # mean over no rows: NaN


# ---- registration: opcheck, torch.compile -----------------------------------------------

@pytest.mark.xfail(strict=True, reason=(
    "inplace_backward by design: opcheck's test_aot_dispatch fails ('Node getitem_N was "
    "invalid, but is output') when the forward op returns the gradient it saves for "
    "backward and the backward mutates that saved output in place "
    "(cross_entropy_scale_grad_); the public functions compile because they do not return "
    "the gradient (test_torch_compile_*), and the default mode passes (tests above)"))
@pytest.mark.parametrize("op", ["cross_entropy_forward", "linear_cross_entropy_forward"])
def test_opcheck_inplace_backward_aot_dispatch(op):
    args = (ce_op_args("cpu", "mean", True) if op == "cross_entropy_forward"
            else lce_op_args("cpu", "mean", True, inplace=True))
    opcheck(getattr(torch.ops.pykernels, op), args,
            test_utils=("test_aot_dispatch_static", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("per_row", [False, True], ids=["scalar", "per_row"])
def test_opcheck_cross_entropy_scale_grad(backend, per_row):
    g = torch.Generator().manual_seed(22)
    grad = torch.randn(5, 11, 3, generator=g)
    grad_output = torch.randn(5, 3, generator=g) if per_row else torch.tensor(2.5)
    opcheck(torch.ops.pykernels.cross_entropy_scale_grad_, (grad, grad_output, backend))
    expected = grad * (grad_output[:, None, :] if per_row else grad_output)
    torch.ops.pykernels.cross_entropy_scale_grad_(grad, grad_output, backend)
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_cross_entropy_fullgraph(reduction):
    case = {"shape": (7, 97, 3), "target": "index", "ignore": "rows", "label_smoothing": 0.1,
            "weight": True, "reduction": reduction, "z_loss": 1e-3, "softcap": 4.0}
    x, target, weight, kwargs = make_case(case, seed=24)
    grad_output = random_grad_output((7, 3) if reduction == "none" else ())

    def fn(x):
        return pykernels.cross_entropy(x, target, weight, backend="cpu", **kwargs)

    torch._dynamo.reset()
    compiled = loss_and_grad(torch.compile(fn, fullgraph=True), x, grad_output)
    eager = loss_and_grad(fn, x, grad_output)
    ref = loss_and_grad(reference_fn(target, weight, kwargs), x, grad_output)
    for c, e, r in zip(compiled, eager, ref, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(c, r, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # the no-grad path (compute_grad=False) traces too
        torch.testing.assert_close(torch.compile(fn, fullgraph=True)(x), eager[0],
                                   rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_linear_cross_entropy_fullgraph(reduction):
    x, w, b, t, cw = make_lce(23, 10, 37, bias=True, weight=True, ignore=True, seed=25)
    opts = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3, softcap=4.0)
    grad_output = random_grad_output((23,) if reduction == "none" else ())

    def fn(x, w, b):
        return pykernels.linear_cross_entropy(x, w, t, linear_bias=b, weight=cw, chunk_size=6,
                                              backend="cpu", **opts)

    torch._dynamo.reset()
    compiled = lce_grads(torch.compile(fn, fullgraph=True), x, w, b, grad_output)
    eager = lce_grads(fn, x, w, b, grad_output)
    ref = lce_grads(lambda x, w, b: reference.linear_cross_entropy(x, w, t, b, cw, **opts),
                    x, w, b, grad_output)
    for c, e, r in zip(compiled, eager, ref, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(c, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_total_weight_with_smoothing_like_torch(backend):
    x = torch.randn(4, 6, dtype=torch.float64)
    target = torch.tensor([1, 2, 1, -100])
    weight = torch.rand(6, dtype=torch.float64) + 0.5
    weight[1] = weight[2] = 0
    kwargs = {"label_smoothing": 0.2}
    grad_output = torch.tensor(1.0, dtype=torch.float64)
    ours = loss_and_grad(ours_fn(backend, target, weight, kwargs), x, grad_output)
    torch_ = loss_and_grad(lambda x: F.cross_entropy(x, target, weight, **kwargs), x,
                           grad_output)
    for a, e in zip(ours, torch_, strict=True):
        torch.testing.assert_close(a, e, equal_nan=True)


# ---- GPU (cuda marker: skipped without a CUDA device) ------------------------------------

GPU_CASES = [
    {"shape": (97, 1025), "target": "index", "ignore": "rows", "label_smoothing": 0.0,
     "weight": False, "reduction": "mean"},
    {"shape": (33, 50257), "target": "index", "ignore": "none", "label_smoothing": 0.1,
     "weight": True, "reduction": "sum", "z_loss": 1e-4},
    {"shape": (8, 97, 33), "target": "prob", "ignore": "none", "label_smoothing": 0.05,
     "weight": False, "reduction": "none"},
    {"shape": (256, 32000), "target": "index", "ignore": "class", "label_smoothing": 0.1,
     "weight": True, "reduction": "none", "z_loss": 1e-4, "softcap": 30.0},
    {"shape": (3, 262147), "target": "index", "ignore": "none", "label_smoothing": 0.0,
     "weight": False, "reduction": "mean", "softcap": 15.0},
]


def gpu_rule_case(backend, case, dtype, seed=0, scale=3.0):
    exact_x, target, weight, kwargs = make_case(case, device="cuda", seed=seed, scale=scale)
    grad_output = random_grad_output(
        reference.cross_entropy(exact_x, target, weight, **kwargs).shape, device="cuda")
    low_t = target.to(dtype) if target.is_floating_point() else target
    low_w = None if weight is None else weight.to(dtype)
    x = exact_x.to(dtype)
    ours = loss_and_grad(ours_fn(backend, low_t, low_w, kwargs), x, grad_output)
    plain = loss_and_grad(reference_fn(low_t, low_w, kwargs), x, grad_output)
    # exact: float64 on the same (rounded) values
    exact = loss_and_grad(reference_fn(low_t if target.is_floating_point() else target,
                                       low_w, kwargs, torch.float64), x.double(), grad_output)
    assert ours[0].dtype == dtype and ours[1].dtype == dtype
    assert_rule(ours, plain, exact, f"{backend} {dtype} {case_id(case)}")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", gpu_kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_gpu_low_precision_rule(backend, dtype, case):
    gpu_rule_case(backend, case, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", gpu_kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", EXTREME_OPTIONS,
                         ids=["plain", "smoothing", "z_loss", "softcap", "all"])
def test_gpu_extreme_logits(backend, dtype, options):
    x, target = extreme_logits(num_classes=4099)
    options = dict(options)
    weight = (torch.rand(4099, generator=torch.Generator().manual_seed(2),
                         dtype=torch.float64) + 0.5) if options.pop("weight", False) else None
    kwargs = {"reduction": "none", **options}
    x, target = x.cuda(), target.cuda()
    weight = None if weight is None else weight.cuda()
    low_w = None if weight is None else weight.to(dtype)
    grad_output = random_grad_output((7,), device="cuda")
    ours = loss_and_grad(ours_fn(backend, target, low_w, kwargs), x.to(dtype), grad_output)
    plain = loss_and_grad(reference_fn(target, low_w, kwargs), x.to(dtype), grad_output)
    exact = loss_and_grad(reference_fn(target, low_w, kwargs, torch.float64),
                          x.to(dtype).double(), grad_output)
    assert_rule(ours, plain, exact, f"{backend} {dtype} extreme {options}")
    assert torch.isfinite(ours[1]).all()
    if not options:
        assert ours[0][3] == 0 and ours[0][4] == 0 and not ours[1][3:5].any()


@pytest.mark.cuda
@pytest.mark.parametrize("backend", gpu_kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("chunk_size", [None, 1025], ids=["default_chunk", "one_chunk"])
def test_gpu_linear_cross_entropy_low_precision_rule(backend, dtype, reduction, chunk_size):
    n = 1025
    x, w, b, t, cw = make_lce(n, 256, 4099, bias=True, weight=True, ignore=True,
                              device="cuda", seed=31)
    opts = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-4)
    grad_output = random_grad_output((n,) if reduction == "none" else (), device="cuda")
    low = [v.to(dtype) for v in (x, w, b, cw)]
    ours = lce_grads(lambda x, w, b: pykernels.linear_cross_entropy(
        x, w, t, linear_bias=b, weight=low[3], chunk_size=chunk_size, backend=backend,
        **opts), *low[:3], grad_output)
    plain = lce_grads(lambda x, w, b: reference.linear_cross_entropy(
        x, w, t, b, low[3], **opts), *low[:3], grad_output)
    exact = lce_grads(lambda x, w, b: reference.linear_cross_entropy(
        x, w, t, b, low[3].double(), **opts), *[v.double() for v in low[:3]], grad_output)
    chunks = math.ceil(n / (chunk_size or lce_chunks.default_chunk_size(n, 256, 4099)))
    names = ["loss", "grad_input", "grad_linear_weight", "grad_linear_bias"]
    for name, a, p, e in zip(names, ours, plain, exact, strict=True):
        assert a.dtype == dtype, name
        # grad_linear_weight adds chunk by chunk in the weight's dtype (as torch's chunked
        # linear_cross_entropy does): one rounding per chunk where plain PyTorch rounds once.
        factor = 2.0 * math.sqrt(chunks) if name == "grad_linear_weight" else 2.0
        atol = loss_atol(e, dtype) if name == "loss" else None
        assert_low_precision_close(a, p, e, name=f"{backend} {dtype} {name}", factor=factor,
                                   atol=atol)


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize("backend", gpu_kernel_backends())
def test_gpu_logits_over_2_31_elements(backend):
    # 16384 x 131072 is exactly 2**31 elements; 64 more rows put whole rows past the int32
    # range, so an int32 row offset (row * C) overflows there, not only the last element.
    n, num_classes = 16384 + 64, 131072
    assert n * num_classes > 2**31
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, num_classes, device="cuda", dtype=torch.bfloat16, generator=g) * 2
    target = torch.randint(0, num_classes, (n,), device="cuda", generator=g)
    rows = torch.tensor([0, 1, 8191, 16383, 16384, 16400, n - 1], device="cuda")
    target[rows[-1]] = num_classes - 1  # the very last element of the tensor is a target
    grad_output = (torch.rand(n, device="cuda", generator=g) + 0.5).to(torch.bfloat16)
    x.requires_grad_()
    loss = pykernels.cross_entropy(x, target, reduction="none", backend=backend)
    (grad,) = torch.autograd.grad(loss, x, grad_output)
    x = x.detach()
    ours = (loss[rows].detach(), grad[rows])
    del grad
    go = grad_output[rows]
    fn = reference_fn(target[rows], None, {"reduction": "none"})
    plain = loss_and_grad(fn, x[rows], go)
    exact = loss_and_grad(fn, x[rows].double(), go.double())
    assert_rule(ours, plain, exact, f"{backend} rows past 2**31")
    del x, loss
    torch.cuda.empty_cache()


@pytest.mark.cuda
@pytest.mark.parametrize("backend", gpu_kernel_backends())
def test_gpu_linear_cross_entropy_peak_memory(backend):
    n, h, v = 8192, 1024, 65536
    dtype = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(0)

    def inputs():
        x = torch.randn(n, h, device="cuda", dtype=dtype, generator=g).requires_grad_()
        w = (torch.randn(v, h, device="cuda", dtype=dtype, generator=g) / 32).requires_grad_()
        t = torch.randint(0, v, (n,), device="cuda", generator=g)
        return x, w, t

    def step(x, w, t):
        loss = pykernels.linear_cross_entropy(x, w, t, backend=backend)
        return loss, *torch.autograd.grad(loss, (x, w))

    step(*inputs())  # warm-up: cuBLAS workspaces, Triton compilation
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    x, w, t = inputs()
    loss, gx, gw = step(x, w, t)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    tensors = 2 * (x.numel() + w.numel()) * x.element_size() + t.numel() * t.element_size()
    chunk = lce_chunks.default_chunk_size(n, h, v) * v * x.element_size()
    assert torch.isfinite(loss) and gx.shape == x.shape and gw.shape == w.shape
    assert peak < 1.2 * tensors + chunk, (
        f"peak {peak / 2**20:.0f} MiB over 1.2 x {tensors / 2**20:.0f} MiB (inputs, weight, "
        f"their gradients) + {chunk / 2**20:.0f} MiB (one chunk of logits)")


BAD_TARGET_SCRIPT = r"""
import sys
import torch
import pykernels
fn, backend = sys.argv[1], sys.argv[2]
x = torch.randn(64, 1000, device="cuda", requires_grad=True)
target = torch.randint(0, 1000, (64,), device="cuda")
target[17] = 1005  # out of range, not ignore_index
try:
    if fn == "cross_entropy":
        loss = pykernels.cross_entropy(x, target, backend=backend)
    else:
        w = torch.randn(1000, 1000, device="cuda", requires_grad=True)
        loss = pykernels.linear_cross_entropy(x, w, target, backend=backend)
    value = loss.item()  # the error surfaces at the latest when the loss is read
    torch.cuda.synchronize()
except RuntimeError as error:
    print("RAISED", str(error).splitlines()[0] if str(error) else type(error).__name__)
    sys.exit(0)
print("NO ERROR", value)
sys.exit(1)
"""


@pytest.mark.cuda
@pytest.mark.parametrize("backend", gpu_kernel_backends())
@pytest.mark.parametrize("fn", ["cross_entropy", "linear_cross_entropy"])
def test_gpu_bad_target_raises_by_the_time_the_loss_is_read(backend, fn):
    # A device-side assertion poisons the CUDA context: run it in its own process.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-c", BAD_TARGET_SCRIPT, fn, backend], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert "RAISED" in result.stdout and result.returncode == 0, (
        result.stdout + result.stderr)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", gpu_kernel_backends())
def test_gpu_opcheck_and_compile(backend):
    case = {"shape": (33, 1025), "target": "index", "ignore": "rows", "label_smoothing": 0.1,
            "weight": True, "reduction": "mean", "z_loss": 1e-4, "softcap": 20.0}
    x, target, weight, kwargs = make_case(case, dtype=torch.bfloat16, device="cuda", seed=40)
    opcheck(torch.ops.pykernels.cross_entropy_forward,
            (x, target, weight, -100, 0.1, 1e-4, 20.0, 1, False, backend))
    opcheck(torch.ops.pykernels.cross_entropy_forward,
            (x.detach().requires_grad_(), target, weight, -100, 0.1, 1e-4, 20.0, 1, True,
             backend), test_utils=NO_AOT)
    grad = torch.randn(33, 1025, device="cuda", dtype=torch.bfloat16)
    opcheck(torch.ops.pykernels.cross_entropy_scale_grad_,
            (grad, torch.randn(33, device="cuda"), backend))

    def fn(x):
        return pykernels.cross_entropy(x, target, weight, backend=backend, **kwargs)

    torch._dynamo.reset()
    grad_output = torch.tensor(1.5, device="cuda")
    compiled = loss_and_grad(torch.compile(fn, fullgraph=True), x, grad_output)
    eager = loss_and_grad(fn, x, grad_output)
    for c, e in zip(compiled, eager, strict=True):
        torch.testing.assert_close(c, e)


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_cpu_target_check_is_a_host_loop():
    """CPU index targets are checked by a loop in pykernels._C: no tensor operation (on a
    tiny loss each small ATen op costs about what the loss itself does), the same
    ValueError at every size and from every CPU backend."""
    target = torch.tensor([[0, 3], [-100, 2]])
    with _Recorder() as recorder:
        ce_common.check_targets(target, 4, -100)
    assert recorder.ops == []
    with pytest.raises(ValueError, match=r"class index 5"):  # a strided view: read in order
        ce_common.check_targets(torch.tensor([[0, 3], [5, 2]]).t(), 4, -100)
    for bad, ignore in ((4, -100), (-1, -100), (-100, 3)):
        with pytest.raises(ValueError, match=rf"class index {bad}, outside \[0, 4\) and not "
                                             rf"ignore_index \({ignore}\)"):
            ce_common.check_targets(torch.tensor([0, bad, 1]), 4, ignore)
    logits, target = torch.randn(3, 4), torch.tensor([0, 4, 1])
    for backend in cpu_kernel_backends() + ["torch", None]:
        with pytest.raises(ValueError, match=r"class index 4, outside \[0, 4\)"):
            pykernels.cross_entropy(logits, target, backend=backend)
        with pytest.raises(ValueError, match=r"class index 4, outside \[0, 4\)"):
            pykernels.linear_cross_entropy(logits, torch.randn(4, 4), target, backend=backend)
