"""pykernels.cross_entropy and linear_cross_entropy: every backend against plain PyTorch.

References are independent of the kernels: torch.nn.functional.cross_entropy (and
torch.nn.functional.linear_cross_entropy where torch has it) for everything PyTorch defines,
pykernels.reference for z_loss and softcap, itself checked here against the formulas written
out from the definitions. Exact references are float64; float32 and the half types follow the
low-precision rule of DESIGN.md section 4 (pykernels.testing).

The kernels write the gradient in the forward and the backward scales it in place, so a graph
can be backpropagated once (see pykernels/ops/cross_entropy.py). torch.autograd.gradcheck
runs every backward at least twice on the same graph (its reentrancy check), so the gradchecks
below go through ``fresh_graph``, which rebuilds the graph with the kernel for each backward:
the analytical gradient is still the kernel's forward-written gradient scaled by the kernel's
backward, checked against finite differences of the kernel's loss.

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
from torch.library import opcheck

import pykernels
from pykernels import reference
from pykernels.ops import cross_entropy as ce_ops  # MERGE: default_chunk_size's new module
from pykernels.testing import DEFAULT_ATOL, assert_low_precision_close

ROOT = Path(__file__).resolve().parents[2]
CPU_BACKENDS = cpu_kernel_backends()
INF = float("inf")
HAS_TORCH_LCE = hasattr(F, "linear_cross_entropy")
needs_torch_lce = pytest.mark.skipif(
    not HAS_TORCH_LCE, reason="torch.nn.functional.linear_cross_entropy needs torch >= 2.13")

# The interpreter evaluates masked-off lanes too (-inf - -inf, log 0) and numpy warns.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


# ---- helpers ----------------------------------------------------------------------------

class _FreshGraph(torch.autograd.Function):
    """fn(*inputs), with each backward running fn again on a fresh graph (see module doc)."""

    @staticmethod
    def forward(ctx, fn, *inputs):
        ctx.fn = fn
        ctx.save_for_backward(*inputs)
        with torch.enable_grad():  # the forward the kernels run when a gradient is wanted
            return fn(*[t.detach().requires_grad_(t.requires_grad) for t in inputs]).detach()

    @staticmethod
    def backward(ctx, grad_output):
        inputs = [t.detach().requires_grad_(need)
                  for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad[1:], strict=True)]
        with torch.enable_grad():
            out = ctx.fn(*inputs)
            wanted = [t for t in inputs if t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad_output))
        return (None,) + tuple(next(grads) if t.requires_grad else None for t in inputs)


def fresh_graph(fn):
    return lambda *inputs: _FreshGraph.apply(fn, *inputs)


def case_id(case):
    parts = ["x".join(map(str, case["shape"])), case["target"]]
    if case["target"] == "index":
        parts.append(f"ignore-{case['ignore']}")
    if case["label_smoothing"]:
        parts.append(f"ls{case['label_smoothing']}")
    if case["weight"]:
        parts.append("weight")
    parts.append(case["reduction"])
    if case.get("z_loss"):
        parts.append(f"z{case['z_loss']}")
    if case.get("softcap"):
        parts.append(f"cap{case['softcap']}")
    return "-".join(parts)


def class_dim(shape):
    return 0 if len(shape) == 1 else 1


def make_case(case, dtype=torch.float64, device="cpu", seed=0, scale=2.0):
    """(logits, target, weight, kwargs) for a case dict; fresh random values per seed.

    ignore: "none"; "rows": every third row's target is ignore_index=-100; "class": the
    ignore_index is the valid class 3, which every third row targets."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(case["shape"])
    cdim = class_dim(shape)
    num_classes = shape[cdim]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    kwargs = {"reduction": case["reduction"], "label_smoothing": case["label_smoothing"],
              "z_loss": case.get("z_loss", 0.0), "softcap": case.get("softcap")}
    if case["target"] == "prob":
        target = (torch.randn(shape, generator=g, dtype=torch.float64) * 2).softmax(cdim)
        target = target.to(dtype)
    else:
        target = torch.randint(0, num_classes, shape[:cdim] + shape[cdim + 1:], generator=g)
        flat = target.view(-1)
        if case["ignore"] == "rows":
            flat[1::3] = -100
        elif case["ignore"] == "class":
            kwargs["ignore_index"] = 3
            flat[1::3] = 3
    weight = (torch.rand(num_classes, generator=g, dtype=torch.float64) + 0.5
              if case["weight"] else None)
    x = x.to(device, dtype)
    target = target.to(device)
    weight = None if weight is None else weight.to(device, dtype)
    return x, target, weight, kwargs


def loss_and_grad(fn, x, grad_output):
    """(loss, d(loss . grad_output)/dx) of fn(x) for a fresh leaf copy of x."""
    x = x.detach().requires_grad_()
    loss = fn(x)
    (grad,) = torch.autograd.grad(loss, x, grad_output.to(loss.dtype))
    return loss.detach(), grad


def ours_fn(backend, target, weight, kwargs):
    return lambda x: pykernels.cross_entropy(x, target, weight, backend=backend, **kwargs)


def torch_fn(target, weight, kwargs):
    return lambda x: F.cross_entropy(x, target, weight, **kwargs)


def reference_fn(target, weight, kwargs, dtype=None):
    def fn(x):
        t = target.to(dtype) if dtype is not None and target.is_floating_point() else target
        w = weight if weight is None or dtype is None else weight.to(dtype)
        return reference.cross_entropy(x, t, w, **kwargs)
    return fn


def random_grad_output(shape, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 0.5).to(device)


def loss_atol(exact, dtype, ulps=4):
    """atol for losses: DEFAULT_ATOL plus a few units of rounding of the largest value (a
    reduced loss is one number whose last rounding either side may or may not match)."""
    scale = float(exact.detach().abs().nan_to_num(0, 0, 0).max()) if exact.numel() else 0.0
    return DEFAULT_ATOL[dtype] + ulps * torch.finfo(dtype).eps * scale


def assert_rule(ours, plain, exact, name):
    """The low-precision rule on (loss, grad) triples."""
    (loss, grad), (plain_loss, plain_grad), (exact_loss, exact_grad) = ours, plain, exact
    assert loss.dtype == plain_loss.dtype and loss.shape == exact_loss.shape, name
    assert_low_precision_close(loss, plain_loss, exact_loss, name=f"{name} loss",
                               atol=loss_atol(exact_loss, loss.dtype))
    assert_low_precision_close(grad, plain_grad, exact_grad, name=f"{name} grad")


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


# ---- option combinations ----------------------------------------------------------------

def _valid(case):
    return case["target"] == "index" or case["ignore"] == "none"


def _cases(shapes):
    return pairwise({
        "shape": shapes,
        "target": ["index", "prob"],
        "ignore": ["none", "rows", "class"],
        "label_smoothing": [0.0, 0.3],
        "weight": [False, True],
        "reduction": ["none", "mean", "sum"],
        "z_loss": [0.0, 0.01],
        "softcap": [None, 2.5],
    }, _valid)


# Every value of every option, and every pair of values of two options, at least once.
CPU_CASES = _cases([(97,), (6, 97), (3, 1025), (4, 97, 3)])
TRITON_CASES = _cases([(97,), (5, 97), (2, 1025), (2, 33, 3)])


def backend_cases(gradcheck=False):
    """(backend, case, seed) params. For gradcheck under the interpreter, one 1025-class case
    only (each costs seconds there); the others are still compared with the reference."""
    params = []
    for backend in CPU_BACKENDS:
        wide = 0
        for i, case in enumerate(TRITON_CASES if backend == "triton" else CPU_CASES):
            if backend == "triton" and gradcheck and 1025 in case["shape"]:
                wide += 1
                if wide > 1:
                    continue
            params.append(pytest.param(backend, case, i, id=f"{backend}-{case_id(case)}"))
    return params


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


# ---- gradcheck and float64 / float32 against the references ------------------------------

@pytest.mark.parametrize("backend, case, seed", backend_cases(gradcheck=True))
def test_gradcheck_float64(backend, case, seed):
    torch.manual_seed(seed)  # gradcheck's fast mode draws its random directions
    x, target, weight, kwargs = make_case(case, seed=seed)
    x.requires_grad_()
    # Slow mode (the whole Jacobian) where it is cheap; fast mode (random projections)
    # for the interpreter and the 1025-class rows.
    fast = backend == "triton" or x.numel() > 800
    fn = fresh_graph(ours_fn(backend, target, weight, kwargs))
    assert torch.autograd.gradcheck(fn, (x,), fast_mode=fast)


@pytest.mark.parametrize("backend, case, seed", backend_cases())
def test_float64_matches_reference(backend, case, seed):
    x, target, weight, kwargs = make_case(case, seed=seed + 100)
    grad_output = random_grad_output(reference.cross_entropy(x, target, weight, **kwargs).shape)
    ours = loss_and_grad(ours_fn(backend, target, weight, kwargs), x, grad_output)
    ref = loss_and_grad(reference_fn(target, weight, kwargs), x, grad_output)
    for a, e in zip(ours, ref, strict=True):
        assert a.dtype == torch.float64 and a.shape == e.shape
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    # The reference itself equals the formulas written out from the definitions.
    torch.testing.assert_close(ref[0], formula_cross_entropy(x, target, weight, **kwargs),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend, case, seed", backend_cases())
def test_float32_low_precision_rule(backend, case, seed):
    exact_x, target, weight, kwargs = make_case(case, seed=seed + 200)
    grad_output = random_grad_output(
        reference.cross_entropy(exact_x, target, weight, **kwargs).shape)
    x = exact_x.float()
    t32 = target.float() if target.is_floating_point() else target
    w32 = None if weight is None else weight.float()
    ours = loss_and_grad(ours_fn(backend, t32, w32, kwargs), x, grad_output)
    plain = loss_and_grad(reference_fn(t32, w32, kwargs), x, grad_output)
    exact = loss_and_grad(reference_fn(target, weight, kwargs), exact_x, grad_output)
    assert ours[1].dtype == torch.float32
    assert_rule(ours, plain, exact, f"{backend} {case_id(case)}")


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
_ALL_SEMANTICS = [c for c in _ALL_SEMANTICS if _valid(c)]


@pytest.mark.parametrize("backend, shape", backend_params(
    [(97,), (7, 97), (4, 33, 5), (3, 11, 2, 3)], [(97,), (4, 33, 5)], one_arg=True))
def test_equals_torch_cross_entropy(backend, shape):
    """z_loss=0 and no softcap is F.cross_entropy, option for option: every combination for
    the cpu backend's (N, C) and (N, C, d) inputs, all pairs for the others and triton."""
    every = backend == "cpu" and len(shape) in (2, 3)
    combos = _ALL_SEMANTICS if every else pairwise({"shape": [shape], **_SEMANTICS}, _valid)
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
    assert ce_ops.default_chunk_size(*shape) == gpu
    assert ce_ops.default_chunk_size(*shape, "cpu") == cpu


LCE_CASES = {
    # rows (None: a 1-D input), target kind, bias, class weight, ignored rows, smoothing, chunk
    "default_chunk": dict(rows=37, bias=True),
    "chunk5_of_37": dict(rows=37, chunk=5, weight=True, ignore=True),
    "chunk1": dict(rows=9, chunk=1, smoothing=0.2, bias=True),
    "chunk_over_rows": dict(rows=9, chunk=50, ignore=True, smoothing=0.1),
    "1d_input": dict(rows=None, bias=True, smoothing=0.2),
    "prob": dict(rows=21, target="prob", chunk=8, smoothing=0.1, bias=True),
    "1d_prob": dict(rows=None, target="prob", weight=True),
}
TRITON_LCE_CASES = ["chunk5_of_37", "1d_input", "prob"]


def make_lce(rows, in_features, num_classes, *, target="index", bias=False, weight=False,
             ignore=False, dtype=torch.float64, device="cpu", seed=0, **unused):
    g = torch.Generator().manual_seed(seed)
    lead = () if rows is None else (rows,)
    x = torch.randn(*lead, in_features, generator=g, dtype=torch.float64)
    w = torch.randn(num_classes, in_features, generator=g, dtype=torch.float64)
    w = w * (3 / in_features**0.5)
    b = torch.randn(num_classes, generator=g, dtype=torch.float64) if bias else None
    if target == "prob":
        t = (torch.randn(*lead, num_classes, generator=g, dtype=torch.float64) * 2).softmax(-1)
        t = t.to(device, dtype)
    else:
        t = torch.randint(0, num_classes, lead, generator=g)
        if ignore and rows:
            t[::4] = -100
        t = t.to(device)
    cw = (torch.rand(num_classes, generator=g, dtype=torch.float64) + 0.5) if weight else None
    x, w = x.to(device, dtype), w.to(device, dtype)
    b, cw = [None if v is None else v.to(device, dtype) for v in (b, cw)]
    return x, w, b, t, cw


def lce_grads(fn, x, w, b, grad_output):
    """(loss, grad_input, grad_linear_weight[, grad_linear_bias]) of fn(x, w, b)."""
    leaves = [None if t is None else t.detach().requires_grad_() for t in (x, w, b)]
    loss = fn(*leaves)
    inputs = [t for t in leaves if t is not None]
    return [loss.detach(), *torch.autograd.grad(loss, inputs, grad_output.to(loss.dtype))]


def _lce_params():
    params = []
    for backend in CPU_BACKENDS:
        names = TRITON_LCE_CASES if backend == "triton" else list(LCE_CASES)
        for name in names:
            for reduction in ["none", "mean", "sum"]:
                params.append(pytest.param(backend, name, reduction,
                                           id=f"{backend}-{name}-{reduction}"))
    return params


@needs_torch_lce
@pytest.mark.parametrize("backend, name, reduction", _lce_params())
def test_linear_cross_entropy_matches_torch(backend, name, reduction):
    spec = dict(LCE_CASES[name])
    rows = spec.pop("rows")
    if backend == "triton" and rows:
        rows = 13  # the interpreter pays per chunk
    x, w, b, t, cw = make_lce(rows, 13, 97, **spec, seed=len(name))
    smoothing, chunk = spec.get("smoothing", 0.0), spec.get("chunk")
    torch_kwargs = dict(linear_bias=b, weight=cw, reduction=reduction,
                        label_smoothing=smoothing)
    if not t.is_floating_point():  # torch refuses ignore_index with probabilities
        torch_kwargs["ignore_index"] = -100
    out_shape = () if reduction != "none" or rows is None else (rows,)
    grad_output = random_grad_output(out_shape)
    ours = lce_grads(lambda x, w, b: pykernels.linear_cross_entropy(
        x, w, t, linear_bias=b, weight=cw, reduction=reduction, label_smoothing=smoothing,
        chunk_size=chunk, backend=backend), x, w, b, grad_output)
    theirs = lce_grads(lambda x, w, b: F.linear_cross_entropy(
        x, w, t, **{**torch_kwargs, "linear_bias": b}), x, w, b, grad_output)
    ref = lce_grads(lambda x, w, b: reference.linear_cross_entropy(
        x, w, t, b, cw, reduction, -100, smoothing), x, w, b, grad_output)
    assert len(ours) == (4 if b is not None else 3)
    for a, e, r in zip(ours, theirs, ref, strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("target_kind", ["index", "prob"])
def test_linear_cross_entropy_z_loss_softcap(backend, reduction, target_kind):
    rows = 11 if backend == "triton" else 29
    x, w, b, t, cw = make_lce(rows, 7, 61, target=target_kind, bias=True, weight=True,
                              ignore=True, seed=9)
    opts = dict(label_smoothing=0.1, z_loss=1e-2, softcap=2.0)
    grad_output = random_grad_output((rows,) if reduction == "none" else ())
    ours = lce_grads(lambda x, w, b: pykernels.linear_cross_entropy(
        x, w, t, linear_bias=b, weight=cw, reduction=reduction, chunk_size=4,
        backend=backend, **opts), x, w, b, grad_output)
    ref = lce_grads(lambda x, w, b: reference.linear_cross_entropy(
        x, w, t, b, cw, reduction, **opts), x, w, b, grad_output)
    for a, e in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend, reduction, target_kind", backend_params(
    list(itertools.product(["none", "mean", "sum"], ["index", "prob"])),
    [("none", "index"), ("mean", "prob"), ("sum", "index")]))
def test_linear_cross_entropy_gradcheck_float64(backend, reduction, target_kind):
    torch.manual_seed(0)
    tiny = backend == "triton"
    x, w, b, t, cw = make_lce(4 if tiny else 7, 3 if tiny else 5, 9 if tiny else 11,
                              target=target_kind, bias=True, weight=True, ignore=True,
                              seed=12)
    opts = dict(label_smoothing=0.2, z_loss=0.05, softcap=1.5)

    def fn(x, w, b):
        return pykernels.linear_cross_entropy(x, w, t, linear_bias=b, weight=cw,
                                              reduction=reduction, chunk_size=3,
                                              backend=backend, **opts)

    inputs = tuple(v.requires_grad_() for v in (x, w, b))
    # reduction='none' recomputes in the backward, so its own graph takes repeated backwards.
    check = fn if reduction == "none" else fresh_graph(fn)
    assert torch.autograd.gradcheck(check, inputs, fast_mode=tiny)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_linear_cross_entropy_float32_low_precision_rule(reduction):
    x, w, b, t, cw = make_lce(257, 64, 1031, bias=True, weight=True, ignore=True, seed=13)
    grad_output = random_grad_output((257,) if reduction == "none" else ())
    opts = dict(reduction=reduction, label_smoothing=0.1)
    low = [None if v is None else v.float() for v in (x, w, b, cw)]
    ours = lce_grads(lambda x, w, b: pykernels.linear_cross_entropy(
        x, w, t, linear_bias=b, weight=low[3], chunk_size=100, backend="cpu", **opts),
        *low[:3], grad_output)
    plain = lce_grads(lambda x, w, b: reference.linear_cross_entropy(
        x, w, t, b, low[3], **opts), *low[:3], grad_output)
    exact = lce_grads(lambda x, w, b: reference.linear_cross_entropy(
        x, w, t, b, cw, **opts), x, w, b, grad_output)
    names = ["loss", "grad_input", "grad_linear_weight", "grad_linear_bias"]
    for name, a, p, e in zip(names, ours, plain, exact, strict=True):
        assert a.dtype == torch.float32
        atol = loss_atol(e, torch.float32) if name == "loss" else None
        assert_low_precision_close(a, p, e, name=name, atol=atol)


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

# test_aot_dispatch_* fails for the forward ops whose backward scales a saved output in place
# (inplace_backward; see the xfail below).
NO_AOT = ("test_schema", "test_autograd_registration", "test_faketensor")
REDUCTION_IDS = {"none": 0, "mean": 1, "sum": 2}


def _ce_op_args(backend, reduction, compute_grad, target_kind="index", seed=20):
    case = {"shape": (5, 11, 3), "target": target_kind, "ignore": "rows",
            "label_smoothing": 0.1, "weight": target_kind == "index", "reduction": reduction}
    x, target, weight, _ = make_case(case, dtype=torch.float32, seed=seed)
    x.requires_grad_(compute_grad)
    return (x, target, weight, -100, 0.1, 1e-3, 5.0, REDUCTION_IDS[reduction], compute_grad,
            backend)


def _lce_op_args(backend, reduction, compute_grad, bias=True, seed=21, inplace=False):
    x, w, b, t, cw = make_lce(9, 6, 11, bias=bias, weight=True, ignore=True,
                              dtype=torch.float32, seed=seed)
    requires = compute_grad or reduction == "none"  # 'none' differentiates in its backward
    for v in (x, w, b):
        if v is not None:
            v.requires_grad_(requires)
    return (x, w, t, b, cw, -100, 0.1, 1e-3, 5.0, REDUCTION_IDS[reduction], 4, compute_grad,
            inplace, backend)


@pytest.mark.parametrize("backend, reduction, target_kind", backend_params(
    list(itertools.product(["none", "mean", "sum"], ["index", "prob"])),
    [("mean", "index"), ("none", "prob")]))
def test_opcheck_cross_entropy_forward_without_grad(backend, reduction, target_kind):
    opcheck(torch.ops.pykernels.cross_entropy_forward,
            _ce_op_args(backend, reduction, False, target_kind))


@pytest.mark.parametrize("backend, reduction", backend_params(["none", "mean", "sum"],
                                                                ["none", "mean"], one_arg=True))
def test_opcheck_cross_entropy_forward_with_grad(backend, reduction):
    opcheck(torch.ops.pykernels.cross_entropy_forward, _ce_op_args(backend, reduction, True),
            test_utils=NO_AOT)


@pytest.mark.xfail(strict=True, reason=(
    "inplace_backward by design: opcheck's test_aot_dispatch fails ('Node getitem_N was "
    "invalid, but is output') when the forward op returns the gradient it saves for "
    "backward and the backward mutates that saved output in place "
    "(cross_entropy_scale_grad_); the public functions compile because they do not return "
    "the gradient (test_torch_compile_*), and the default mode passes (tests above)"))
@pytest.mark.parametrize("op", ["cross_entropy_forward", "linear_cross_entropy_forward"])
def test_opcheck_inplace_backward_aot_dispatch(op):
    args = (_ce_op_args("cpu", "mean", True) if op == "cross_entropy_forward"
            else _lce_op_args("cpu", "mean", True, inplace=True))
    opcheck(getattr(torch.ops.pykernels, op), args,
            test_utils=("test_aot_dispatch_static", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("backend, reduction, target_kind", backend_params(
    list(itertools.product(["none", "mean", "sum"], ["index", "prob"])),
    [("none", "index"), ("mean", "prob")]))
def test_opcheck_cross_entropy_backward(backend, reduction, target_kind):
    x, target, weight, *options, _, _ = _ce_op_args(backend, reduction, False, target_kind)
    loss_shape = (5, 3) if reduction == "none" else ()
    grad_loss = torch.randn(loss_shape, generator=torch.Generator().manual_seed(25))
    opcheck(torch.ops.pykernels.cross_entropy_backward,
            (grad_loss, x, target, weight, *options, backend))


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


@pytest.mark.parametrize("backend, reduction, bias", backend_params(
    list(itertools.product(["none", "mean", "sum"], [True, False])),
    [("none", True), ("mean", True)]))
def test_opcheck_linear_cross_entropy_forward(backend, reduction, bias):
    # 'none' (compute_grad False, inputs requiring grad): the whole opcheck; mean and sum
    # (compute_grad True): the whole opcheck by default, all but aot_dispatch with
    # inplace_backward (xfail above), and the whole opcheck without gradients.
    if reduction == "none":
        opcheck(torch.ops.pykernels.linear_cross_entropy_forward,
                _lce_op_args(backend, reduction, False, bias))
    else:
        opcheck(torch.ops.pykernels.linear_cross_entropy_forward,
                _lce_op_args(backend, reduction, True, bias))
        opcheck(torch.ops.pykernels.linear_cross_entropy_forward,
                _lce_op_args(backend, reduction, True, bias, inplace=True), test_utils=NO_AOT)
        opcheck(torch.ops.pykernels.linear_cross_entropy_forward,
                _lce_op_args(backend, reduction, False, bias))


@pytest.mark.parametrize("backend, bias", backend_params([True, False], [True],
                                                              one_arg=True))
def test_opcheck_linear_cross_entropy_backward(backend, bias):
    x, w, b, t, cw = make_lce(9, 6, 11, bias=bias, weight=True, ignore=True,
                              dtype=torch.float32, seed=23)
    grad_loss = torch.randn(9, generator=torch.Generator().manual_seed(23))
    opcheck(torch.ops.pykernels.linear_cross_entropy_backward,
            (grad_loss, x, w, t, b, cw, -100, 0.1, 1e-3, 5.0, 4, backend))


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


# ---- bad input --------------------------------------------------------------------------

CE_BAD = {
    "target_int32": (TypeError, "target must be int64 class indices"),
    "target_shape": (ValueError, r"class-index target must have shape \(4,\)"),
    "target_extra_dim": (ValueError, r"class-index target must have shape \(4,\)"),
    "prob_shape": (ValueError, r"probability target must have the logits' shape \(4, 7\)"),
    "prob_dtype": (TypeError, "probability target has dtype torch.float64"),
    "target_not_tensor": (TypeError, "target must be a torch.Tensor"),
    "index_too_large": (ValueError, r"target contains class index 7, outside \[0, 7\)"),
    "index_negative": (ValueError, r"target contains class index -1, outside \[0, 7\)"),
    "default_ignore_not_ignored": (ValueError, r"class index -100.*not ignore_index \(3\)"),
    "weight_length": (ValueError, r"weight must have shape \(7,\)"),
    "weight_2d": (ValueError, r"weight must have shape \(7,\)"),
    "weight_int": (TypeError, "weight must be a floating-point tensor"),
    "reduction": (ValueError, "reduction must be one of none, mean, sum"),
    "label_smoothing_low": (ValueError, r"label_smoothing must be in \[0.0, 1.0\]"),
    "label_smoothing_high": (ValueError, r"label_smoothing must be in \[0.0, 1.0\]"),
    "label_smoothing_nan": (ValueError, "label_smoothing must be in"),
    "label_smoothing_str": (TypeError, "label_smoothing must be a real number"),
    "softcap_zero": (ValueError, r"softcap must be in \(0.0, inf\)"),
    "softcap_negative": (ValueError, r"softcap must be in \(0.0, inf\)"),
    "z_loss_negative": (ValueError, r"z_loss must be finite and in \[0.0, inf\), got -0.1"),
    "z_loss_inf": (ValueError, "z_loss must be finite"),
    "ignore_index_float": (TypeError, "ignore_index must be an int"),
    "target_other_device": (ValueError, "target is on meta but input is on cpu"),
    "weight_other_device": (ValueError, "weight is on meta but input is on cpu"),
    "int_logits": (TypeError, "input must be a floating-point tensor"),
    "logits_not_tensor": (TypeError, "input must be a torch.Tensor"),
    "scalar_logits": (ValueError, r"input must be \(C,\), \(N, C\)"),
    "no_classes": (ValueError, r"with C >= 1, got shape \(4, 0\)"),
    "weight_requires_grad": (ValueError, "weight requires grad, but gradients with respect "
                                         "to class weights are not supported"),
    "inplace_backward_int": (TypeError, "inplace_backward must be a bool, got 1"),
    "backend_unknown": (ValueError, "backend must be one of"),
    "backend_unavailable": (RuntimeError, "backend 'cuda' is not available for cpu tensors"),
    "backend_dtype": (TypeError, "backend 'cpu' on cpu supports dtypes float32, float64"),
}


@pytest.mark.parametrize("case", list(CE_BAD))
def test_cross_entropy_bad_input(case):
    error, pattern = CE_BAD[case]
    x, t = torch.randn(4, 7), torch.randint(0, 7, (4,))
    args, kwargs = [x, t], {"backend": "cpu"}
    if case == "target_int32":
        args[1] = t.int()
    elif case == "target_shape":
        args[1] = t[:3]
    elif case == "target_extra_dim":
        args[1] = t[:, None]
    elif case == "prob_shape":
        args[1] = torch.rand(4, 6)
    elif case == "prob_dtype":
        args[1] = torch.rand(4, 7, dtype=torch.float64)
    elif case == "target_not_tensor":
        args[1] = [1, 2, 3, 4]
    elif case == "index_too_large":
        args[1] = torch.tensor([0, 7, 1, 2])
    elif case == "index_negative":
        args[1] = torch.tensor([0, -1, 1, 2])
    elif case == "default_ignore_not_ignored":
        args[1], kwargs["ignore_index"] = torch.tensor([0, -100, 1, 2]), 3
    elif case == "weight_length":
        args.append(torch.rand(6))
    elif case == "weight_2d":
        args.append(torch.rand(1, 7))
    elif case == "weight_int":
        args.append(torch.ones(7, dtype=torch.long))
    elif case == "reduction":
        kwargs["reduction"] = "avg"
    elif case.startswith("label_smoothing"):
        kwargs["label_smoothing"] = {"low": -0.1, "high": 1.5, "nan": float("nan"),
                                     "str": "0.1"}[case.rsplit("_", 1)[1]]
    elif case == "softcap_zero":
        kwargs["softcap"] = 0.0
    elif case == "softcap_negative":
        kwargs["softcap"] = -1.0
    elif case == "z_loss_negative":
        kwargs["z_loss"] = -0.1
    elif case == "z_loss_inf":
        kwargs["z_loss"] = INF
    elif case == "ignore_index_float":
        kwargs["ignore_index"] = 1.5
    elif case == "target_other_device":
        args[1] = t.to("meta")
    elif case == "weight_other_device":
        args.append(torch.rand(7, device="meta"))
    elif case == "int_logits":
        args[0] = torch.ones(4, 7, dtype=torch.long)
    elif case == "logits_not_tensor":
        args[0] = x.tolist()
    elif case == "scalar_logits":
        args = [torch.tensor(1.0), torch.tensor(0)]
    elif case == "no_classes":
        args[0] = torch.randn(4, 0)
    elif case == "weight_requires_grad":
        args.append(torch.rand(7, requires_grad=True))
    elif case == "inplace_backward_int":
        kwargs["inplace_backward"] = 1
    elif case == "backend_unknown":
        kwargs["backend"] = "xla"
    elif case == "backend_unavailable":
        kwargs["backend"] = "cuda"
    elif case == "backend_dtype":
        args[0] = x.half()
    with pytest.raises(error, match=pattern):
        pykernels.cross_entropy(*args, **kwargs)


LCE_BAD = {
    "chunk_zero": (ValueError, "chunk_size must be an int >= 1, got 0"),
    "chunk_negative": (ValueError, "chunk_size must be an int >= 1, got -3"),
    "chunk_float": (TypeError, "chunk_size must be an int, got 2.0"),
    "chunk_bool": (TypeError, "chunk_size must be an int, got True"),
    "linear_weight_dtype": (TypeError, "linear_weight has dtype torch.float64"),
    "linear_weight_1d": (ValueError, "linear_weight must be 2-D"),
    "no_classes": (ValueError, "linear_weight must be 2-D"),
    "in_features": (ValueError, r"in_features = linear_weight.shape\[1\] = 5"),
    "input_3d": (ValueError, r"input must be \(N, in_features\) or \(in_features,\)"),
    "bias_shape": (ValueError, r"linear_bias must have shape \(9,\)"),
    "bias_dtype": (TypeError, "linear_bias has dtype torch.float64"),
    "index_out_of_range": (ValueError, r"target contains class index 9, outside \[0, 9\)"),
    "weight_length": (ValueError, r"weight must have shape \(9,\)"),
    "target_shape": (ValueError, r"class-index target must have shape \(6,\)"),
    "target_dtype": (TypeError, "target must be int64 class indices"),
    "weight_requires_grad": (ValueError, "weight requires grad, but gradients with respect "
                                         "to class weights are not supported"),
    "linear_weight_other_device": (ValueError, "linear_weight is on meta but input is on cpu"),
    "bias_other_device": (ValueError, "linear_bias is on meta but input is on cpu"),
    "int_input": (TypeError, "input must be a floating-point tensor"),
    "reduction": (ValueError, "reduction must be one of none, mean, sum"),
    "softcap": (ValueError, r"softcap must be in \(0.0, inf\)"),
    "label_smoothing": (ValueError, r"label_smoothing must be in \[0.0, 1.0\]"),
}


@pytest.mark.parametrize("case", list(LCE_BAD))
def test_linear_cross_entropy_bad_input(case):
    error, pattern = LCE_BAD[case]
    x, w, t = torch.randn(6, 5), torch.randn(9, 5), torch.randint(0, 9, (6,))
    args, kwargs = [x, w, t], {"backend": "cpu"}
    if case.startswith("chunk"):
        kwargs["chunk_size"] = {"zero": 0, "negative": -3, "float": 2.0,
                                "bool": True}[case.split("_")[1]]
    elif case == "linear_weight_dtype":
        args[1] = w.double()
    elif case == "linear_weight_1d":
        args[1] = w[0]
    elif case == "no_classes":
        args[1] = w[:0]
    elif case == "in_features":
        args[0] = x[:, :4]
    elif case == "input_3d":
        args[0] = x[None]
    elif case == "bias_shape":
        kwargs["linear_bias"] = torch.randn(8)
    elif case == "bias_dtype":
        kwargs["linear_bias"] = torch.randn(9, dtype=torch.float64)
    elif case == "index_out_of_range":
        args[2] = torch.tensor([0, 1, 2, 9, 3, 4])
    elif case == "weight_length":
        kwargs["weight"] = torch.rand(5)
    elif case == "target_shape":
        args[2] = t[:5]
    elif case == "target_dtype":
        args[2] = t.to(torch.int16)
    elif case == "weight_requires_grad":
        kwargs["weight"] = torch.rand(9, requires_grad=True)
    elif case == "linear_weight_other_device":
        args[1] = w.to("meta")
    elif case == "bias_other_device":
        kwargs["linear_bias"] = torch.randn(9, device="meta")
    elif case == "int_input":
        args[0] = x.long()
    elif case == "reduction":
        kwargs["reduction"] = "batchmean"
    elif case == "softcap":
        kwargs["softcap"] = 0
    elif case == "label_smoothing":
        kwargs["label_smoothing"] = 2
    with pytest.raises(error, match=pattern):
        pykernels.linear_cross_entropy(*args, **kwargs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("fn", ["cross_entropy", "linear_cross_entropy"])
def test_out_of_range_target_raises_before_any_kernel_runs(monkeypatch, backend, fn):
    def kernel_ran(*args):
        raise AssertionError("a kernel ran before the target check")

    monkeypatch.setattr(ce_ops, "_kernels", lambda name: (kernel_ran, kernel_ran))
    monkeypatch.setattr(torch, "addmm", kernel_ran)  # linear_cross_entropy's chunk GEMM
    x = torch.randn(6, 9, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3, 9, -100])
    with pytest.raises(ValueError, match=r"class index 9, outside \[0, 9\)"):
        if fn == "cross_entropy":
            pykernels.cross_entropy(x, target, backend=backend)
        else:
            pykernels.linear_cross_entropy(x, torch.randn(9, 9), target,
                                           linear_bias=torch.randn(9), backend=backend)


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
    chunks = math.ceil(n / (chunk_size or ce_ops.default_chunk_size(n, 256, 4099)))
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
    chunk = ce_ops.default_chunk_size(n, h, v) * v * x.element_size()
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
