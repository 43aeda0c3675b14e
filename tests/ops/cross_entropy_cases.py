"""pykernels.cross_entropy and linear_cross_entropy's inputs for the generic op checks
(checks.py): option combinations, shapes and backends, the call and its reference
(pykernels.reference; torch.nn.functional.linear_cross_entropy where torch has it).

The kernels write the gradient in the forward and the backward scales it in place, so a graph
can be backpropagated once (see pykernels/ops/cross_entropy.py). torch.autograd.gradcheck
runs every backward at least twice on the same graph (its reentrancy check), so the gradchecks
go through ``fresh_graph``, which rebuilds the graph with the kernel for each backward: the
analytical gradient is still the kernel's forward-written gradient scaled by the kernel's
backward, checked against finite differences of the kernel's loss.

Triton runs on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py) and is slow there:
its cases are small and few.
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from checks import BadInput, Case, OpCheck, present
from conftest import cpu_kernel_backends, pairwise

import pykernels
from pykernels import reference
from pykernels.ops import cross_entropy as ce_ops
from pykernels.ops import linear_cross_entropy_chunks as lce_chunks
from pykernels.testing import DEFAULT_ATOL, assert_low_precision_close

CPU_BACKENDS = cpu_kernel_backends()
INF = float("inf")
needs_torch_lce = pytest.mark.skipif(
    not hasattr(F, "linear_cross_entropy"),
    reason="torch.nn.functional.linear_cross_entropy needs torch >= 2.13")


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


# ---- option combinations ----------------------------------------------------------------

def valid_case(case):
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
    }, valid_case)


# Every value of every option, and every pair of values of two options, at least once.
CPU_CASES = _cases([(97,), (6, 97), (3, 1025), (4, 97, 3)])
TRITON_CASES = _cases([(97,), (5, 97), (2, 1025), (2, 33, 3)])

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


# ---- registration: opcheck, torch.compile -----------------------------------------------

# test_aot_dispatch_* fails for the forward ops whose backward scales a saved output in place
# (inplace_backward; see the xfail below).
NO_AOT = ("test_schema", "test_autograd_registration", "test_faketensor")
REDUCTION_IDS = {"none": 0, "mean": 1, "sum": 2}


def ce_op_args(backend, reduction, compute_grad, target_kind="index", seed=20):
    case = {"shape": (5, 11, 3), "target": target_kind, "ignore": "rows",
            "label_smoothing": 0.1, "weight": target_kind == "index", "reduction": reduction}
    x, target, weight, _ = make_case(case, dtype=torch.float32, seed=seed)
    x.requires_grad_(compute_grad)
    return (x, target, weight, -100, 0.1, 1e-3, 5.0, REDUCTION_IDS[reduction], compute_grad,
            backend)


def lce_op_args(backend, reduction, compute_grad, bias=True, seed=21, inplace=False):
    x, w, b, t, cw = make_lce(9, 6, 11, bias=bias, weight=True, ignore=True,
                              dtype=torch.float32, seed=seed)
    requires = compute_grad or reduction == "none"  # 'none' differentiates in its backward
    for v in (x, w, b):
        if v is not None:
            v.requires_grad_(requires)
    return (x, w, t, b, cw, -100, 0.1, 1e-3, 5.0, REDUCTION_IDS[reduction], 4, compute_grad,
            inplace, backend)




# ---- what the generic checks run ------------------------------------------------------------

def backend_combos(cpu, triton):
    """(backend, combo): every combo of ``cpu`` on the cpu backend, the fewer of ``triton``
    under the (slow) interpreter."""
    return [(b, c) for b in CPU_BACKENDS for c in (triton if b == "triton" else cpu)]


def _rule_atol(name, exact, dtype):
    return loss_atol(exact, dtype) if name == "loss" else None


def ce_case(backend, case, seed, checks, gradcheck=False):
    """A Case of cross_entropy(x, target[, weight]) with a case dict's options; ``inputs()``
    gives (x, target[, weight]), only x requiring grad."""
    _, _, _, kwargs = make_case(case)

    def ours(x, target, weight=None):
        return pykernels.cross_entropy(x, target, weight, backend=backend, **kwargs)

    def inputs():
        x, target, weight, _ = make_case(case, seed=seed)
        return present(x.requires_grad_(), target, weight)

    options = {}
    if gradcheck:
        # Slow mode (the whole Jacobian) where it is cheap; fast mode (random projections)
        # for the interpreter and the 1025-class rows.
        fast = backend == "triton" or math.prod(case["shape"]) > 800
        ours, options = fresh_graph(ours), dict(seed=seed, gradcheck={"fast_mode": fast})
    return Case(id=f"{backend}-{case_id(case)}", inputs=inputs, ours=ours,
                reference=lambda x, target, weight=None: reference.cross_entropy(
                    x, target, weight, **kwargs),
                checks=checks, tol=1e-10, atol=1e-12, rule_atol=_rule_atol,
                names=("loss", "grad_input"), **options)


def _lce_call(fn, bias, weight):
    """fn(x, w, target, linear_bias, weight) as a function of the present inputs
    (x, w, target[, linear_bias][, weight])."""
    def call(x, w, target, *rest):
        rest = iter(rest)
        return fn(x, w, target, next(rest) if bias else None, next(rest) if weight else None)
    return call


def lce_case(id, backend, make, reference, checks=("float64",), chunk_size=None, marks=(),
             **options):
    """A Case of linear_cross_entropy; ``make()`` gives make_lce's (x, w, b, t, cw),
    ``reference(x, w, t, b, cw)``; ``options`` go to both calls."""
    x, w, b, t, cw = make()

    def inputs():
        x, w, b, t, cw = make()
        return present(x.requires_grad_(), w.requires_grad_(), t,
                        None if b is None else b.requires_grad_(), cw)

    def ours(x, w, t, b, cw):
        return pykernels.linear_cross_entropy(x, w, t, linear_bias=b, weight=cw,
                                              chunk_size=chunk_size, backend=backend, **options)

    return Case(id=f"{backend}-{id}", inputs=inputs,
                ours=_lce_call(ours, b is not None, cw is not None),
                reference=_lce_call(reference, b is not None, cw is not None), checks=checks,
                tol=1e-10, atol=1e-12, rule_atol=_rule_atol,
                names=("loss", "grad_input", "grad_linear_weight", "grad_linear_bias"),
                marks=marks)


def _torch_lce(reduction, smoothing):
    def fn(x, w, t, b, cw):
        # torch refuses ignore_index with probabilities
        ignore = {} if t.is_floating_point() else {"ignore_index": -100}
        return F.linear_cross_entropy(x, w, t, linear_bias=b, weight=cw, reduction=reduction,
                                      label_smoothing=smoothing, **ignore)
    return fn


def _lce_reference(**options):
    return lambda x, w, t, b, cw: reference.linear_cross_entropy(x, w, t, b, cw, **options)


def cases():
    out = []
    for backend in CPU_BACKENDS:
        wide = 0
        for i, case in enumerate(TRITON_CASES if backend == "triton" else CPU_CASES):
            out.append(ce_case(backend, case, i + 100, ("float64",)))
            out.append(ce_case(backend, case, i + 200, ("float32",)))
            # gradcheck under the interpreter: one 1025-class case only (each costs seconds
            # there); the others are still compared with the reference.
            if backend == "triton" and 1025 in case["shape"]:
                wide += 1
                if wide > 1:
                    continue
            out.append(ce_case(backend, case, i, ("gradcheck",), gradcheck=True))
    out += _lce_cases()
    return out


def _lce_cases():
    out = []
    for backend, name in backend_combos(list(LCE_CASES), TRITON_LCE_CASES):
        spec = dict(LCE_CASES[name])
        rows, chunk = spec.pop("rows"), spec.pop("chunk", None)
        if backend == "triton" and rows:
            rows = 13  # the interpreter pays per chunk
        smoothing = spec.get("smoothing", 0.0)
        for reduction in ["none", "mean", "sum"]:
            out.append(lce_case(
                f"{name}-{reduction}-torch", backend,
                lambda rows=rows, spec=spec, name=name: make_lce(rows, 13, 97, **spec,
                                                                 seed=len(name)),
                _torch_lce(reduction, smoothing), chunk_size=chunk, reduction=reduction,
                label_smoothing=smoothing, marks=(needs_torch_lce,)))
    opts = dict(label_smoothing=0.1, z_loss=1e-2, softcap=2.0)
    for backend in CPU_BACKENDS:
        rows = 11 if backend == "triton" else 29
        for reduction in ["none", "mean", "sum"]:
            for target in ["index", "prob"]:
                out.append(lce_case(
                    f"{target}-{reduction}-z_loss-softcap", backend,
                    lambda rows=rows, target=target: make_lce(
                        rows, 7, 61, target=target, bias=True, weight=True, ignore=True,
                        seed=9),
                    _lce_reference(reduction=reduction, **opts), chunk_size=4,
                    reduction=reduction, **opts))
    opts = dict(label_smoothing=0.2, z_loss=0.05, softcap=1.5)
    for backend, (reduction, target) in backend_combos(
            list(itertools.product(["none", "mean", "sum"], ["index", "prob"])),
            [("none", "index"), ("mean", "prob"), ("sum", "index")]):
        tiny = backend == "triton"
        case = lce_case(
            f"{target}-{reduction}-gradcheck", backend,
            lambda tiny=tiny, target=target: make_lce(
                4 if tiny else 7, 3 if tiny else 5, 9 if tiny else 11, target=target,
                bias=True, weight=True, ignore=True, seed=12),
            _lce_reference(reduction=reduction, **opts), checks=("gradcheck",), chunk_size=3,
            reduction=reduction, **opts)
        # reduction='none' recomputes in the backward, so its own graph takes repeated
        # backwards.
        if reduction != "none":
            case.ours = fresh_graph(case.ours)
        case.gradcheck = {"fast_mode": tiny}
        out.append(case)
    for reduction in ["none", "mean"]:
        out.append(lce_case(
            f"257x64x1031-{reduction}", "cpu",
            lambda: make_lce(257, 64, 1031, bias=True, weight=True, ignore=True, seed=13),
            _lce_reference(reduction=reduction, label_smoothing=0.1), checks=("float32",),
            chunk_size=100, reduction=reduction, label_smoothing=0.1))
    return out


def opchecks():
    ops = torch.ops.pykernels
    out = []
    for backend, (reduction, target) in backend_combos(
            list(itertools.product(["none", "mean", "sum"], ["index", "prob"])),
            [("mean", "index"), ("none", "prob")]):
        out.append(OpCheck(f"ce_forward-nograd-{backend}-{reduction}-{target}",
                           ops.cross_entropy_forward,
                           lambda b=backend, r=reduction, t=target: ce_op_args(b, r, False, t)))
    for backend, reduction in backend_combos(["none", "mean", "sum"], ["none", "mean"]):
        out.append(OpCheck(f"ce_forward-grad-{backend}-{reduction}", ops.cross_entropy_forward,
                           lambda b=backend, r=reduction: ce_op_args(b, r, True),
                           test_utils=NO_AOT))
    for backend, (reduction, target) in backend_combos(
            list(itertools.product(["none", "mean", "sum"], ["index", "prob"])),
            [("none", "index"), ("mean", "prob")]):
        out.append(OpCheck(f"ce_backward-{backend}-{reduction}-{target}",
                           ops.cross_entropy_backward,
                           lambda b=backend, r=reduction, t=target: _ce_backward_args(b, r, t)))
    for backend, (reduction, bias) in backend_combos(
            list(itertools.product(["none", "mean", "sum"], [True, False])),
            [("none", True), ("mean", True)]):
        name = f"{backend}-{reduction}-{'bias' if bias else 'nobias'}"
        # 'none' (compute_grad False, inputs requiring grad): the whole opcheck; mean and sum
        # (compute_grad True): the whole opcheck by default, all but aot_dispatch with
        # inplace_backward (xfail in test_cross_entropy.py), and the whole opcheck without
        # gradients.
        out.append(OpCheck(f"lce_forward-{name}", ops.linear_cross_entropy_forward,
                           lambda b=backend, r=reduction, bias=bias: lce_op_args(
                               b, r, r != "none", bias)))
        if reduction != "none":
            out += [
                OpCheck(f"lce_forward-inplace-{name}", ops.linear_cross_entropy_forward,
                        lambda b=backend, r=reduction, bias=bias: lce_op_args(
                            b, r, True, bias, inplace=True), test_utils=NO_AOT),
                OpCheck(f"lce_forward-nograd-{name}", ops.linear_cross_entropy_forward,
                        lambda b=backend, r=reduction, bias=bias: lce_op_args(
                            b, r, False, bias)),
            ]
    for backend, bias in backend_combos([True, False], [True]):
        out.append(OpCheck(f"lce_backward-{backend}-{'bias' if bias else 'nobias'}",
                           ops.linear_cross_entropy_backward,
                           lambda b=backend, bias=bias: _lce_backward_args(b, bias)))
    return out


def _ce_backward_args(backend, reduction, target_kind):
    x, target, weight, *options, _, _ = ce_op_args(backend, reduction, False, target_kind)
    loss_shape = (5, 3) if reduction == "none" else ()
    grad_loss = torch.randn(loss_shape, generator=torch.Generator().manual_seed(25))
    return (grad_loss, x, target, weight, *options, backend)


def _lce_backward_args(backend, bias):
    x, w, b, t, cw = make_lce(9, 6, 11, bias=bias, weight=True, ignore=True,
                              dtype=torch.float32, seed=23)
    grad_loss = torch.randn(9, generator=torch.Generator().manual_seed(23))
    return (grad_loss, x, w, t, b, cw, -100, 0.1, 1e-3, 5.0, 4, backend)


def _ce(input=None, target=None, *weight, **kwargs):
    """cross_entropy on (4, 7) logits and (4,) class indices, with any argument replaced."""
    x = torch.randn(4, 7) if input is None else input
    t = torch.randint(0, 7, (4,)) if target is None else target
    return lambda: pykernels.cross_entropy(x, t, *weight, **{"backend": "cpu", **kwargs})


def _lce(input=None, linear_weight=None, target=None, **kwargs):
    """linear_cross_entropy on (6, 5) x (9, 5) and (6,) class indices, with any argument
    replaced."""
    x = torch.randn(6, 5) if input is None else input
    w = torch.randn(9, 5) if linear_weight is None else linear_weight
    t = torch.randint(0, 9, (6,)) if target is None else target
    return lambda: pykernels.linear_cross_entropy(x, w, t, **{"backend": "cpu", **kwargs})


def _no_kernel_runs(monkeypatch):
    def kernel_ran(*args):
        raise AssertionError("a kernel ran before the target check")

    for module in (ce_ops, lce_chunks):
        monkeypatch.setattr(module, "row_kernels", lambda name: (kernel_ran, kernel_ran))
    monkeypatch.setattr(torch, "addmm", kernel_ran)  # linear_cross_entropy's chunk GEMM


def bad_inputs():
    out = [BadInput(f"ce-{id}", call, error, pattern) for id, error, pattern, call in [
        ("target_int32", TypeError, "target must be int64 class indices",
         _ce(target=torch.randint(0, 7, (4,), dtype=torch.int32))),
        ("target_shape", ValueError, r"class-index target must have shape \(4,\)",
         _ce(target=torch.randint(0, 7, (3,)))),
        ("target_extra_dim", ValueError, r"class-index target must have shape \(4,\)",
         _ce(target=torch.randint(0, 7, (4, 1)))),
        ("prob_shape", ValueError, r"probability target must have the logits' shape \(4, 7\)",
         _ce(target=torch.rand(4, 6))),
        ("prob_dtype", TypeError, "probability target has dtype torch.float64",
         _ce(target=torch.rand(4, 7, dtype=torch.float64))),
        ("target_not_tensor", TypeError, "target must be a torch.Tensor",
         _ce(target=[1, 2, 3, 4])),
        ("index_too_large", ValueError, r"target contains class index 7, outside \[0, 7\)",
         _ce(target=torch.tensor([0, 7, 1, 2]))),
        ("index_negative", ValueError, r"target contains class index -1, outside \[0, 7\)",
         _ce(target=torch.tensor([0, -1, 1, 2]))),
        ("default_ignore_not_ignored", ValueError, r"class index -100.*not ignore_index \(3\)",
         _ce(target=torch.tensor([0, -100, 1, 2]), ignore_index=3)),
        ("weight_length", ValueError, r"weight must have shape \(7,\)",
         _ce(None, None, torch.rand(6))),
        ("weight_2d", ValueError, r"weight must have shape \(7,\)",
         _ce(None, None, torch.rand(1, 7))),
        ("weight_int", TypeError, "weight must be a floating-point tensor",
         _ce(None, None, torch.ones(7, dtype=torch.long))),
        ("reduction", ValueError, "reduction must be one of none, mean, sum",
         _ce(reduction="avg")),
        ("label_smoothing_low", ValueError, r"label_smoothing must be in \[0.0, 1.0\]",
         _ce(label_smoothing=-0.1)),
        ("label_smoothing_high", ValueError, r"label_smoothing must be in \[0.0, 1.0\]",
         _ce(label_smoothing=1.5)),
        ("label_smoothing_nan", ValueError, "label_smoothing must be in",
         _ce(label_smoothing=float("nan"))),
        ("label_smoothing_str", TypeError, "label_smoothing must be a real number",
         _ce(label_smoothing="0.1")),
        ("softcap_zero", ValueError, r"softcap must be in \(0.0, inf\)", _ce(softcap=0.0)),
        ("softcap_negative", ValueError, r"softcap must be in \(0.0, inf\)", _ce(softcap=-1.0)),
        ("z_loss_negative", ValueError, r"z_loss must be finite and in \[0.0, inf\), got -0.1",
         _ce(z_loss=-0.1)),
        ("z_loss_inf", ValueError, "z_loss must be finite", _ce(z_loss=INF)),
        ("ignore_index_float", TypeError, "ignore_index must be an int",
         _ce(ignore_index=1.5)),
        ("target_other_device", ValueError, "target is on meta but input is on cpu",
         _ce(target=torch.randint(0, 7, (4,)).to("meta"))),
        ("weight_other_device", ValueError, "weight is on meta but input is on cpu",
         _ce(None, None, torch.rand(7, device="meta"))),
        ("int_logits", TypeError, "input must be a floating-point tensor",
         _ce(torch.ones(4, 7, dtype=torch.long))),
        ("logits_not_tensor", TypeError, "input must be a torch.Tensor",
         _ce(torch.randn(4, 7).tolist())),
        ("scalar_logits", ValueError, r"input must be \(C,\), \(N, C\)",
         _ce(torch.tensor(1.0), torch.tensor(0))),
        ("no_classes", ValueError, r"with C >= 1, got shape \(4, 0\)", _ce(torch.randn(4, 0))),
        ("weight_requires_grad", ValueError, "weight requires grad, but gradients with respect "
                                             "to class weights are not supported",
         _ce(None, None, torch.rand(7, requires_grad=True))),
        ("inplace_backward_int", TypeError, "inplace_backward must be a bool, got 1",
         _ce(inplace_backward=1)),
        ("backend_unknown", ValueError, "backend must be one of", _ce(backend="xla")),
        ("backend_unavailable", RuntimeError, "backend 'cuda' is not available for cpu tensors",
         _ce(backend="cuda")),
        ("backend_dtype", TypeError, "backend 'cpu' on cpu supports dtypes float32, float64",
         _ce(torch.randn(4, 7).half())),
    ]]
    out += [BadInput(f"lce-{id}", call, error, pattern) for id, error, pattern, call in [
        ("chunk_zero", ValueError, "chunk_size must be an int >= 1, got 0", _lce(chunk_size=0)),
        ("chunk_negative", ValueError, "chunk_size must be an int >= 1, got -3",
         _lce(chunk_size=-3)),
        ("chunk_float", TypeError, "chunk_size must be an int, got 2.0", _lce(chunk_size=2.0)),
        ("chunk_bool", TypeError, "chunk_size must be an int, got True",
         _lce(chunk_size=True)),
        ("linear_weight_dtype", TypeError, "linear_weight has dtype torch.float64",
         _lce(linear_weight=torch.randn(9, 5, dtype=torch.float64))),
        ("linear_weight_1d", ValueError, "linear_weight must be 2-D",
         _lce(linear_weight=torch.randn(5))),
        ("no_classes", ValueError, "linear_weight must be 2-D",
         _lce(linear_weight=torch.randn(0, 5))),
        ("in_features", ValueError, r"in_features = linear_weight.shape\[1\] = 5",
         _lce(torch.randn(6, 4))),
        ("input_3d", ValueError, r"input must be \(N, in_features\) or \(in_features,\)",
         _lce(torch.randn(1, 6, 5))),
        ("bias_shape", ValueError, r"linear_bias must have shape \(9,\)",
         _lce(linear_bias=torch.randn(8))),
        ("bias_dtype", TypeError, "linear_bias has dtype torch.float64",
         _lce(linear_bias=torch.randn(9, dtype=torch.float64))),
        ("index_out_of_range", ValueError, r"target contains class index 9, outside \[0, 9\)",
         _lce(target=torch.tensor([0, 1, 2, 9, 3, 4]))),
        ("weight_length", ValueError, r"weight must have shape \(9,\)",
         _lce(weight=torch.rand(5))),
        ("target_shape", ValueError, r"class-index target must have shape \(6,\)",
         _lce(target=torch.randint(0, 9, (5,)))),
        ("target_dtype", TypeError, "target must be int64 class indices",
         _lce(target=torch.randint(0, 9, (6,), dtype=torch.int16))),
        ("weight_requires_grad", ValueError, "weight requires grad, but gradients with respect "
                                             "to class weights are not supported",
         _lce(weight=torch.rand(9, requires_grad=True))),
        ("linear_weight_other_device", ValueError,
         "linear_weight is on meta but input is on cpu",
         _lce(linear_weight=torch.randn(9, 5, device="meta"))),
        ("bias_other_device", ValueError, "linear_bias is on meta but input is on cpu",
         _lce(linear_bias=torch.randn(9, device="meta"))),
        ("int_input", TypeError, "input must be a floating-point tensor",
         _lce(torch.ones(6, 5, dtype=torch.long))),
        ("reduction", ValueError, "reduction must be one of none, mean, sum",
         _lce(reduction="batchmean")),
        ("softcap", ValueError, r"softcap must be in \(0.0, inf\)", _lce(softcap=0)),
        ("label_smoothing", ValueError, r"label_smoothing must be in \[0.0, 1.0\]",
         _lce(label_smoothing=2)),
    ]]
    # The target is checked before any kernel (or linear_cross_entropy's chunk GEMM) runs.
    target = torch.tensor([0, 1, 2, 3, 9, -100])
    pattern = r"class index 9, outside \[0, 9\)"
    for backend in CPU_BACKENDS:
        out += [
            BadInput(f"ce-target_before_kernels-{backend}",
                     _ce(torch.randn(6, 9, requires_grad=True), target, backend=backend),
                     ValueError, pattern, guard=_no_kernel_runs),
            BadInput(f"lce-target_before_kernels-{backend}",
                     _lce(torch.randn(6, 9, requires_grad=True), torch.randn(9, 9), target,
                          linear_bias=torch.randn(9), backend=backend),
                     ValueError, pattern, guard=_no_kernel_runs),
        ]
    return out
