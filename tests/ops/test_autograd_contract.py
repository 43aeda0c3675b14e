"""PyTorch's autograd contract, for every fused op on every backend that runs on CPU here.

Each case below is one op with a representative set of options, in float64: the pykernels
call on a backend, its plain-PyTorch twin (pykernels.reference, or torch's own function), and
the inputs (those requiring grad are differentiated). The same checks run on all of them:
gradcheck and gradgradcheck with default arguments, a repeated backward with retain_graph,
in-place changes to the output, a gradient-penalty step with create_graph, jvp and
forward_ad tangents, torch.func.grad and vmap, each against the twin. Then PyTorch's own
OpInfo samples, the errors that stand where a result cannot be given, and the edge inputs.
"""

import math

import linear_act_cases
import linear_glu_cases
import pytest
import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from attention_cases import make_qkv
from conftest import cpu_kernel_backends

import pykernels
from pykernels import reference

BACKENDS = cpu_kernel_backends()
F64 = torch.float64


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed, scale=1.0, grad=True):
    return (torch.randn(shape, dtype=F64, generator=_generator(seed)) * scale).requires_grad_(
        grad)


# ---- cases: name -> (ours(backend) -> fn, twin fn, inputs(seed) -> tuple) ---------------------

def _linear_act(activation, bias=True):
    def inputs(seed):
        return tuple(t for t in linear_act_cases.make_inputs((2, 3), 5, 4, bias, seed=seed)
                     if t is not None)

    def ours(backend):
        return lambda x, w, b=None: pykernels.linear_act(x, w, b, activation, backend=backend)

    return ours, lambda x, w, b=None: reference.linear_act(x, w, b, activation), inputs


def _linear_glu(activation):
    def inputs(seed):
        return tuple(linear_glu_cases.make_inputs((2, 3), 5, 4, True, seed=seed))

    def ours(backend):
        return lambda x, w, b: pykernels.linear_glu(x, w, b, activation, backend=backend)

    return ours, lambda x, w, b: reference.linear_glu(x, w, b, activation), inputs


def _class_targets(shape, classes, seed):
    target = torch.randint(0, classes, shape, generator=_generator(seed))
    target.view(-1)[::3] = -100  # some ignored rows
    return target


def _cross_entropy(kind):
    options = {"index": dict(reduction="mean", label_smoothing=0.1, z_loss=1e-2, softcap=3.0),
               "prob": dict(reduction="none", label_smoothing=0.2),
               "spatial": dict(reduction="sum")}[kind]

    def inputs(seed):
        if kind == "prob":  # a differentiable probability target
            return (_randn(4, 6, seed=seed, scale=2.0),
                    torch.softmax(_randn(4, 6, seed=seed + 1, grad=False), 1).requires_grad_())
        shape = (3, 5, 2) if kind == "spatial" else (5, 6)
        return (_randn(*shape, seed=seed, scale=2.0),)

    target = (_class_targets((3, 2), 5, 3) if kind == "spatial"
              else _class_targets((5,), 6, 4))
    weight = torch.rand(5, dtype=F64, generator=_generator(5)) + 0.5

    def bind(fn, **extra):
        if kind == "prob":
            return lambda x, t: fn(x, t, **extra, **options)
        if kind == "spatial":
            return lambda x: fn(x, target, weight, **extra, **options)
        return lambda x: fn(x, target, **extra, **options)

    return (lambda backend: bind(pykernels.cross_entropy, backend=backend),
            bind(reference.cross_entropy), inputs)


def _linear_cross_entropy(kind):
    options = {"index": dict(reduction="mean", label_smoothing=0.1, z_loss=1e-2),
               "prob": dict(reduction="sum"), "none": dict(reduction="none", softcap=4.0)}[kind]

    def inputs(seed):
        x, w, b = _randn(7, 4, seed=seed), _randn(9, 4, seed=seed + 1), _randn(9, seed=seed + 2)
        if kind == "prob":
            return x, w, b, torch.softmax(_randn(7, 9, seed=seed + 3, grad=False),
                                          1).requires_grad_()
        return x, w, b

    target = _class_targets((7,), 9, 6)

    def bind(fn, **extra):
        if kind == "prob":
            return lambda x, w, b, t: fn(x, w, t, linear_bias=b, **extra, **options)
        return lambda x, w, b: fn(x, w, target, linear_bias=b, **extra, **options)

    return (lambda backend: bind(pykernels.linear_cross_entropy, chunk_size=3,
                                 backend=backend),
            bind(reference.linear_cross_entropy), inputs)


def _attention(kind):
    options = {"causal_gqa": dict(is_causal=True, enable_gqa=True),
               "mask_window_softcap": dict(window=(2, 1), softcap=2.5),
               "broadcast": dict(), "float_mask": dict()}[kind]
    bool_mask = (torch.rand(3, 4, generator=_generator(7), dtype=F64) > 0.3
                 if kind == "mask_window_softcap" else None)

    def inputs(seed):
        # broadcast: a 3-D query against 4-D key/value (PyTorch's OpInfo)
        lead_q, lead_kv = ((2,), (2, 2)) if kind == "broadcast" else (
            (1, 2), (1, 1 if kind == "causal_gqa" else 2))
        qkv = tuple(t.requires_grad_() for t in make_qkv(lead_q, lead_kv, 3, 4, 4, 3,
                                                         seed=seed))
        # a differentiable additive mask, broadcast over the heads
        return (*qkv, _randn(1, 1, 3, 4, seed=seed + 3)) if kind == "float_mask" else qkv

    return (lambda backend: lambda q, k, v, mask=bool_mask: (
                pykernels.scaled_dot_product_attention(q, k, v, mask, backend=backend,
                                                       **options)),
            lambda q, k, v, mask=bool_mask: reference.scaled_dot_product_attention(
                q, k, v, mask, **options),
            inputs)


CASES = {
    "linear_act-gelu": _linear_act("gelu"),
    "linear_act-relu": _linear_act("relu"),
    "linear_act-leaky_relu-nobias": _linear_act("leaky_relu", bias=False),
    "linear_act-none": _linear_act("none"),
    "linear_glu-silu": _linear_glu("silu"),
    "linear_glu-gelu_tanh": _linear_glu("gelu_tanh"),
    "cross_entropy-index": _cross_entropy("index"),
    "cross_entropy-prob": _cross_entropy("prob"),
    "cross_entropy-spatial-weight": _cross_entropy("spatial"),
    "linear_cross_entropy-index": _linear_cross_entropy("index"),
    "linear_cross_entropy-prob": _linear_cross_entropy("prob"),
    "linear_cross_entropy-none": _linear_cross_entropy("none"),
    "attention-causal_gqa": _attention("causal_gqa"),
    "attention-mask_window_softcap": _attention("mask_window_softcap"),
    "attention-broadcast": _attention("broadcast"),
    "attention-float_mask": _attention("float_mask"),
}
# The interpreter is slow: the triton backend gets one case per family.
TRITON_CASES = ("linear_act-gelu", "cross_entropy-prob", "linear_cross_entropy-index",
                "attention-causal_gqa")


def case_params():
    return [pytest.param(name, backend, id=f"{name}-{backend}")
            for backend in BACKENDS for name in CASES
            if backend != "triton" or name in TRITON_CASES]


def setup(name, backend, seed=0):
    ours, twin, inputs = CASES[name]
    return ours(backend), twin, inputs(seed)


def differentiable(inputs):
    return [t for t in inputs if t.requires_grad]


def grads(fn, inputs, grad_output_seed=11, create_graph=False, retain_graph=None):
    out = fn(*inputs)
    grad_output = torch.randn(out.shape, dtype=F64, generator=_generator(grad_output_seed))
    return out, torch.autograd.grad(out, differentiable(inputs), grad_output,
                                    create_graph=create_graph, retain_graph=retain_graph)


def assert_close_all(actual, expected):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-11)


# ---- the checks, once for every case -----------------------------------------------------------

@pytest.mark.parametrize("name, backend", case_params())
def test_gradcheck(name, backend):
    ours, _, inputs = setup(name, backend)
    assert torch.autograd.gradcheck(ours, inputs)


@pytest.mark.parametrize("name, backend", case_params())
def test_gradgradcheck(name, backend):
    ours, _, inputs = setup(name, backend)
    assert torch.autograd.gradgradcheck(ours, inputs)


@pytest.mark.parametrize("name, backend", case_params())
def test_retain_graph_second_backward_equals_first(name, backend):
    # Fails if a backward consumes what it saved (e.g. scales a saved gradient in place).
    ours, twin, inputs = setup(name, backend)
    out, first = grads(ours, inputs, retain_graph=True)
    grad_output = torch.randn(out.shape, dtype=F64, generator=_generator(11))
    second = torch.autograd.grad(out, differentiable(inputs), grad_output)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    assert_close_all(first, grads(twin, inputs)[1])


def _inplace_then_backward(fn, inputs):
    out = fn(*inputs)
    out.mul_(0.5).add_(1.0)
    return torch.autograd.grad(out.sum(), differentiable(inputs))


@pytest.mark.parametrize("name, backend", [p for p in case_params()
                                           if not p.values[0].startswith("attention")])
def test_inplace_change_of_the_output(name, backend):
    """In-place ops on the output work as on the torch composition: the same gradients, or
    autograd's version-counter error where the composition raises it too (relu, sigmoid
    and tanh keep their output for the backward, in torch and here). Attention: the test
    after this one."""
    ours, twin, inputs = setup(name, backend)
    try:
        expected = _inplace_then_backward(twin, inputs)
    except RuntimeError as error:
        assert "modified by an inplace operation" in str(error)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            _inplace_then_backward(ours, inputs)
        return
    assert_close_all(_inplace_then_backward(ours, inputs), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_change_of_attention_output(backend):
    """The backward needs the output (Delta = rowsum(dO * O)), as the flash and efficient
    kernels of F.scaled_dot_product_attention do: changing it in place raises autograd's
    version-counter error, never a wrong gradient, exactly as F's fused CPU path does."""
    q, k, v = (_randn(1, 2, 3, 4, seed=s).float() for s in (1, 2, 3))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _inplace_then_backward(lambda q, k, v: pykernels.scaled_dot_product_attention(
            q, k, v, backend=backend), (q, k, v))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _inplace_then_backward(F.scaled_dot_product_attention, (q, k, v))
    # A copy, or any op before the in-place one, leaves the saved output alone.
    out = pykernels.scaled_dot_product_attention(q, k, v, backend=backend)
    changed = out.clone().mul_(0.5)
    (dq,) = torch.autograd.grad(changed.sum(), q)
    (expected,) = torch.autograd.grad(
        (reference.scaled_dot_product_attention(q, k, v) * 0.5).sum(), q)
    torch.testing.assert_close(dq, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, backend", case_params())
def test_create_graph_gradient_penalty(name, backend):
    """A gradient-penalty step: the gradient of |d out / d inputs|^2 equals PyTorch's."""
    def penalty_grads(fn, inputs):
        _, first = grads(fn, inputs, create_graph=True)
        penalty = sum((g * g).sum() for g in first)
        return torch.autograd.grad(penalty, differentiable(inputs), allow_unused=True,
                                   materialize_grads=True)

    ours, twin, inputs = setup(name, backend)
    assert_close_all(penalty_grads(ours, inputs), penalty_grads(twin, inputs))


def _tangents(inputs, seed=12):
    return tuple(torch.randn(t.shape, dtype=F64, generator=_generator(seed + i))
                 for i, t in enumerate(inputs))


@pytest.mark.parametrize("name, backend", case_params())
def test_jvp(name, backend):
    ours, twin, inputs = setup(name, backend)
    primals = tuple(t.detach() for t in inputs)
    tangents = _tangents(primals)
    out, tangent = torch.func.jvp(ours, primals, tangents)
    expected_out, expected_tangent = torch.func.jvp(twin, primals, tangents)
    assert_close_all((out, tangent), (expected_out, expected_tangent))
    assert tangent.abs().max() > 0  # a zero tangent would pass against a zero reference


@pytest.mark.parametrize("name, backend", case_params())
def test_forward_ad(name, backend):
    ours, twin, inputs = setup(name, backend)
    primals = tuple(t.detach() for t in inputs)
    tangents = _tangents(primals)
    results = []
    for fn in (ours, twin):
        with forward_ad.dual_level():
            duals = [forward_ad.make_dual(p, t) for p, t in zip(primals, tangents, strict=True)]
            unpacked = forward_ad.unpack_dual(fn(*duals))
            assert unpacked.tangent is not None
            results.append((unpacked.primal, unpacked.tangent))
    assert_close_all(*results)


@pytest.mark.parametrize("name, backend", case_params())
def test_func_grad_and_vmap(name, backend):
    ours, twin, inputs = setup(name, backend)
    primals = tuple(t.detach() for t in inputs)
    weights = torch.randn(ours(*primals).shape, dtype=F64, generator=_generator(13))

    def weighted(fn):
        return lambda *args: (fn(*args) * weights).sum()

    assert_close_all(torch.func.grad(weighted(ours), argnums=tuple(range(len(primals))))(
        *primals), torch.func.grad(weighted(twin), argnums=tuple(range(len(primals))))(*primals))
    batch = tuple(torch.stack([p, p * 0.5 + 0.25]) for p in primals)
    torch.testing.assert_close(torch.func.vmap(ours)(*batch), torch.func.vmap(twin)(*batch),
                               rtol=1e-9, atol=1e-11)


# ---- PyTorch's OpInfo samples -----------------------------------------------------------------

def _op_info(name):
    pytest.importorskip("expecttest")  # torch's OpInfo database imports it
    from torch.testing._internal.common_methods_invocations import op_db

    return next(op for op in op_db if op.name == name and op.variant_test_name == "")


OPINFO = {
    "nn.functional.linear": lambda backend: (
        lambda input, weight, bias=None: pykernels.linear_act(input, weight, bias,
                                                              backend=backend)),
    "nn.functional.cross_entropy": lambda backend: (
        lambda input, target, **kw: pykernels.cross_entropy(input, target, backend=backend,
                                                            **kw)),
    "nn.functional.scaled_dot_product_attention": lambda backend: (
        lambda q, k, v, **kw: pykernels.scaled_dot_product_attention(q, k, v, backend=backend,
                                                                     **kw)),
}


def _outputs_and_grads(fn, sample):
    inputs = [sample.input, *sample.args]
    out = fn(*inputs, **sample.kwargs)
    leaves = [t for t in (*inputs, *sample.kwargs.values())
              if isinstance(t, torch.Tensor) and t.requires_grad]
    grad_output = torch.randn(out.shape, dtype=out.dtype, generator=_generator(14))
    return out, torch.autograd.grad(out, leaves, grad_output, allow_unused=True)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("op_name", list(OPINFO))
def test_opinfo_samples(op_name, backend):
    op = _op_info(op_name)
    ours = OPINFO[op_name](backend)
    compared = 0
    for sample in op.sample_inputs("cpu", F64, requires_grad=True):
        if sample.kwargs.get("dropout_p", 0.0) > 0:
            # A random keep mask: PyTorch's and ours differ; shapes and finiteness agree.
            out, grads_ = _outputs_and_grads(ours, sample)
            assert out.shape == op.op(sample.input, *sample.args, **sample.kwargs).shape
            assert all(g is None or torch.isfinite(g).all() for g in grads_)
            continue
        out, grads_ = _outputs_and_grads(ours, sample)
        expected, expected_grads = _outputs_and_grads(op.op, sample)
        torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-11)
        for g, e in zip(grads_, expected_grads, strict=True):
            assert (g is None) == (e is None)
            if g is not None:
                torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11)
        compared += 1
    assert compared >= 10


# ---- what raises, and how ----------------------------------------------------------------------

@pytest.mark.parametrize("fn", ["cross_entropy", "linear_cross_entropy"])
def test_inplace_backward_trades_the_contract_for_memory(fn, auto_runs_kernels):
    x = _randn(5, 4, seed=20)
    w = _randn(6, 4, seed=21)
    target = _class_targets((5,), 6, 22)
    call = ((lambda: pykernels.cross_entropy(x @ w.T, target, inplace_backward=True))
            if fn == "cross_entropy" else
            (lambda: pykernels.linear_cross_entropy(x, w, target, inplace_backward=True)))
    loss = call()
    (first,) = torch.autograd.grad(loss, x, retain_graph=True)
    (expected,) = torch.autograd.grad(reference.cross_entropy(x @ w.T, target), x)
    torch.testing.assert_close(first, expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, x)
    with pytest.raises(RuntimeError, match=rf"pykernels.{fn}\(inplace_backward=True\).*"
                                           r"create_graph=True"):
        torch.autograd.grad(call(), x, create_graph=True)


def test_create_graph_with_dropout_raises():
    q = _randn(1, 1, 3, 4, seed=23)
    out = pykernels.scaled_dot_product_attention(q, q, q, dropout_p=0.5, backend="cpu")
    with pytest.raises(RuntimeError, match="no graph of the gradient.*dropout_p > 0.*"
                                           "backend='torch'"):
        torch.autograd.grad(out.sum(), q, create_graph=True)
    (plain,) = torch.autograd.grad(
        pykernels.scaled_dot_product_attention(q, q, q, dropout_p=0.5, backend="cpu").sum(), q)
    assert torch.isfinite(plain).all()


@pytest.mark.parametrize("fn", ["cross_entropy", "linear_cross_entropy"])
def test_class_weight_requiring_grad_raises(fn):
    # PyTorch does not differentiate class weights either: it raises in the backward.
    x, w = torch.randn(4, 3), torch.randn(5, 3)
    target = torch.tensor([0, 1, 4, 2])
    weight = torch.rand(5, requires_grad=True)
    with pytest.raises(ValueError, match="weight requires grad, but gradients with respect "
                                         "to class weights are not supported"):
        if fn == "cross_entropy":
            pykernels.cross_entropy(x @ w.T, target, weight)
        else:
            pykernels.linear_cross_entropy(x, w, target, weight=weight)
    with torch.no_grad():  # nothing to differentiate: fine
        pykernels.cross_entropy(x @ w.T, target, weight)
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument "
                                           "'weight'"):
        F.cross_entropy((x @ w.T).requires_grad_(), target, weight).backward()


CALLS = {
    "linear_act": lambda **kw: pykernels.linear_act(torch.randn(2, 3), torch.randn(4, 3),
                                                    **kw),
    "cross_entropy": lambda **kw: pykernels.cross_entropy(torch.randn(2, 3),
                                                          torch.tensor([0, 2]), **kw),
    "linear_cross_entropy": lambda **kw: pykernels.linear_cross_entropy(
        torch.randn(2, 3), torch.randn(4, 3), torch.tensor([0, 2]), **kw),
    "scaled_dot_product_attention": lambda **kw: pykernels.scaled_dot_product_attention(
        torch.randn(1, 2, 3), torch.randn(1, 2, 3), torch.randn(1, 2, 3), **kw),
}
# (op, one of its float options)
FLOAT_OPTIONS = [("linear_act", "negative_slope"), ("cross_entropy", "label_smoothing"),
                 ("cross_entropy", "softcap"), ("linear_cross_entropy", "z_loss"),
                 ("scaled_dot_product_attention", "dropout_p"),
                 ("scaled_dot_product_attention", "scale"),
                 ("scaled_dot_product_attention", "softcap")]


@pytest.mark.parametrize("op, option", FLOAT_OPTIONS)
def test_the_same_mistake_gets_the_same_error_on_every_op(op, option):
    for wrong_type in ("0.1", True):
        with pytest.raises(TypeError, match=rf"^{option} must be a real number, got "):
            CALLS[op](**{option: wrong_type})
    if option not in ("negative_slope", "scale"):  # these take any finite number
        with pytest.raises(ValueError, match=rf"^{option} must be .*in [\[(].*, got -5.0$"):
            CALLS[op](**{option: -5.0})
    if option != "negative_slope":
        with pytest.raises(ValueError, match=rf"^{option} must be .*, got nan$"):
            CALLS[op](**{option: math.nan})


@pytest.mark.parametrize("op", list(CALLS))
def test_a_non_tensor_operand_is_a_type_error_on_every_op(op):
    first = "query" if op == "scaled_dot_product_attention" else "input"
    call = {
        "linear_act": lambda: pykernels.linear_act([1.0, 2.0], torch.randn(4, 2)),
        "cross_entropy": lambda: pykernels.cross_entropy([1.0, 2.0], torch.tensor(0)),
        "linear_cross_entropy": lambda: pykernels.linear_cross_entropy(
            [1.0, 2.0], torch.randn(4, 2), torch.tensor(0)),
        "scaled_dot_product_attention": lambda: pykernels.scaled_dot_product_attention(
            [[1.0]], torch.randn(1, 1), torch.randn(1, 1)),
    }[op]
    with pytest.raises(TypeError, match=f"^{first} must be a torch.Tensor, got list$"):
        call()


# ---- edge inputs -------------------------------------------------------------------------------

ATTENTION_BROADCASTS = [  # (query, key, value shapes, enable_gqa), as F accepts them
    ((2, 5, 4), (3, 2, 6, 4), (3, 2, 6, 3), False),     # 3-D query, 4-D key/value
    ((3, 2, 5, 4), (1, 2, 6, 4), (1, 2, 6, 3), False),  # key/value batch 1
    ((3, 4, 5, 4), (3, 1, 6, 4), (3, 1, 6, 3), False),  # one key/value head, no enable_gqa
    ((3, 4, 5, 4), (3, 2, 6, 4), (3, 2, 6, 3), True),   # GQA
    ((5, 4), (2, 6, 4), (2, 6, 3), False),              # 2-D query, 3-D key/value
    ((2, 1, 5, 4), (2, 3, 6, 4), (2, 3, 6, 3), False),  # one query head, three kv heads
    ((0, 2, 5, 4), (0, 2, 6, 4), (0, 2, 6, 3), False),  # empty batch
    ((2, 0, 5, 4), (2, 0, 6, 4), (2, 0, 6, 3), False),  # no heads
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shapes", ATTENTION_BROADCASTS, ids=str)
def test_attention_broadcasts_like_torch(backend, shapes):
    *dims, enable_gqa = shapes
    q, k, v = (_randn(*shape, seed=30 + i) for i, shape in enumerate(dims))
    mask = torch.rand(dims[0][-2], dims[1][-2], generator=_generator(33)) > 0.2

    def ours(q, k, v):
        return pykernels.scaled_dot_product_attention(q, k, v, mask, enable_gqa=enable_gqa,
                                                      backend=backend)

    def torch_(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, mask, enable_gqa=enable_gqa)

    out, ours_grads = grads(ours, (q, k, v))
    expected, expected_grads = grads(torch_, (q, k, v))
    assert out.shape == expected.shape
    assert_close_all((out, *ours_grads), (expected, *expected_grads))


def test_linear_cross_entropy_transposed_weight_and_empty_probabilities():
    x = _randn(6, 4, seed=40)
    w = _randn(4, 9, seed=41).detach().t().requires_grad_()  # a non-contiguous view
    target = _class_targets((6,), 9, 42)
    for inplace in (False, True):
        _, ours = grads(lambda x, w, inplace=inplace: pykernels.linear_cross_entropy(
            x, w, target, inplace_backward=inplace, backend="cpu").reshape(1), (x, w))
        _, expected = grads(lambda x, w: reference.linear_cross_entropy(x, w, target)
                            .reshape(1), (x, w))
        assert_close_all(ours, expected)
    empty = torch.zeros(0, 9, dtype=F64)
    ours = pykernels.linear_cross_entropy(x[:0], w, empty, backend="cpu")
    expected = reference.linear_cross_entropy(x[:0], w, empty)
    assert ours.isnan() and expected.isnan()  # PyTorch's 0 / 0 for an empty mean


def test_meta_tensors_infer_shapes_without_data():
    x = torch.empty(3, 7, 5, device="meta")
    out = pykernels.linear_act(x, torch.empty(4, 5, device="meta"), None, "gelu")
    assert out.device.type == "meta" and out.shape == (3, 7, 4)
    q = torch.empty(2, 3, 6, 8, device="meta")
    out = pykernels.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert out.device.type == "meta" and out.shape == (2, 3, 6, 8)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the Triton interpreter")
@pytest.mark.parametrize("scale", [1e-50, 3e-39, 1e50])
def test_triton_float64_scale_outside_float32_range(scale):
    q = _randn(1, 1, 3, 4, seed=50)
    k = _randn(1, 1, 4, 4, seed=51, scale=1 / (scale * 2)).detach()  # scores of order 1
    v = _randn(1, 1, 4, 3, seed=52).detach()
    out, (dq,) = grads(lambda q: pykernels.scaled_dot_product_attention(
        q, k, v, scale=scale, backend="triton"), (q,))
    expected, (expected_dq,) = grads(lambda q: reference.scaled_dot_product_attention(
        q, k, v, scale=scale), (q,))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dq, expected_dq, rtol=1e-10, atol=1e-12)


def test_compiled_training_step_keeps_the_contract():
    """torch.compile traces the registered ops: a compiled step matches eager pykernels."""
    torch._dynamo.reset()
    x, w, b = _randn(4, 5, seed=60), _randn(6, 5, seed=61), _randn(6, seed=62)
    target = _class_targets((4,), 6, 63)

    def step(x, w, b):
        hidden = pykernels.linear_act(x, w, b, "silu", backend="cpu")
        return pykernels.cross_entropy(hidden, target, backend="cpu")

    eager_grads = torch.autograd.grad(step(x, w, b), (x, w, b))
    compiled = torch.compile(step, fullgraph=True)
    compiled_grads = torch.autograd.grad(compiled(x, w, b), (x, w, b))
    assert_close_all(compiled_grads, eager_grads)


def _train_step_grads(model, x, seed):
    torch.manual_seed(seed)  # the same dropout masks for the fused and the torch model
    model(x).square().sum().backward()
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_modules_followed_by_inplace_layers(backend):
    """In-place layers after fused ones work as after torch's: Linear then
    ReLU(inplace=True), and a fused MLP with Dropout(inplace=True) after its layers. (Where
    torch raises, e.g. Dropout(inplace=True) right after ReLU, whose backward keeps its
    output, the fused layer raises the same error: test_inplace_change_of_the_output.)"""
    torch.manual_seed(70)
    plain = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(inplace=True),
                                torch.nn.Linear(8, 6), torch.nn.GELU(),
                                torch.nn.Dropout(0.3, inplace=True), torch.nn.Linear(6, 3),
                                torch.nn.Dropout(0.3, inplace=True))
    plain = plain.double()
    fused = pykernels.fuse(plain, inplace=False)
    swapped = [type(m).__name__ for m in fused.modules()]
    assert "ReLU" not in swapped and "GELU" not in swapped  # fused into their Linears
    x = _randn(5, 4, seed=71, grad=False)
    with pykernels.use_backend(backend):
        ours = _train_step_grads(fused, x, seed=72)
    assert_close_all(ours, _train_step_grads(plain, x, seed=72))
    layer = torch.nn.Sequential(pykernels.nn.Linear(4, 8, dtype=F64),
                                torch.nn.ReLU(inplace=True))
    twin = torch.nn.Sequential(torch.nn.Linear(4, 8, dtype=F64), torch.nn.ReLU(inplace=True))
    twin.load_state_dict(layer.state_dict())
    with pykernels.use_backend(backend):
        ours = _train_step_grads(layer, x, 0)
    assert_close_all(ours, _train_step_grads(twin, x, 0))
