"""The ways into an op (docs/ARCHITECTURE.md, "Two ways into an op").

A plain eager call takes ops/_route.py's eager way; the dispatcher's way gives the same
bits. Every op runs on tensors without data: FakeTensorMode (what torch.compile traces with)
and the meta device. A call that read a value on the host (``.item()``, ``bool(tensor)``,
data-dependent Python branching) would raise here; on a GPU each such read is a host
synchronisation that stalls the stream and breaks CUDA-graph capture.

CPU fake tensors go forward and backward through each kernel backend's route (the custom
ops' fake kernels and the registered backward). Fake CUDA tensors (no GPU needed) go
through the public functions' GPU route for the cuda and triton backends, forward only:
a CPU build of torch cannot record autograd on CUDA tensors. On a GPU (cuda-marked) each
op's forward and backward are captured in a CUDA graph and replayed.
"""

import importlib

import pytest
import torch
from conftest import cpu_kernel_backends, gpu_kernel_backends
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

import pykernels
from pykernels.ops import _route

backends_module = importlib.import_module("pykernels.backends")


def _calls(make, backend):
    """{op: (call, differentiable inputs)} on tensors from ``make(*shape, index=False)``."""
    x, w, b = make(6, 16), make(12, 16), make(12)
    glu_w, glu_b = make(24, 16), make(24)
    target = make(6, index=True)
    q, k, v = make(2, 3, 9, 8), make(2, 3, 7, 8), make(2, 3, 7, 8)
    return {
        "linear_act": (lambda: pykernels.linear_act(x, w, b, "gelu", backend=backend),
                       (x, w, b)),
        "linear_glu": (lambda: pykernels.linear_glu(x, glu_w, glu_b, backend=backend),
                       (x, glu_w, glu_b)),
        "cross_entropy": (lambda: pykernels.cross_entropy(
            x, target, ignore_index=3, label_smoothing=0.1, backend=backend), (x,)),
        "linear_cross_entropy": (lambda: pykernels.linear_cross_entropy(
            x, w, target, backend=backend), (x, w)),
        "attention": (lambda: pykernels.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=0.2, backend=backend), (q, k, v)),
    }


def _real_shapes(backend):
    def make(*shape, index=False):
        if index:
            return torch.randint(0, 12, shape)
        return torch.randn(*shape, dtype=torch.float64).requires_grad_()
    return {op: tuple(call().shape) for op, (call, _) in _calls(make, "torch").items()}


OPS = ["linear_act", "linear_glu", "cross_entropy", "linear_cross_entropy", "attention"]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", cpu_kernel_backends() + ["torch"])
def test_cpu_fake_tensors_forward_and_backward(op, backend):
    expected = _real_shapes(backend)[op]
    with FakeTensorMode():
        def make(*shape, index=False):
            if index:
                return torch.randint(0, 12, shape)
            return torch.randn(*shape, dtype=torch.float64).requires_grad_()
        call, inputs = _calls(make, backend)[op]
        out = call()
        grads = torch.autograd.grad(out.sum(), inputs)
    assert isinstance(out, FakeTensor) and tuple(out.shape) == expected
    assert [tuple(g.shape) for g in grads] == [tuple(t.shape) for t in inputs]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_route_reads_no_data(op, backend, monkeypatch):
    """The public functions' CUDA path (argument checks, backend choice, shape logic, the
    custom op's fake kernel) on fake CUDA tensors: it must not need a value."""
    available = backends_module._available
    monkeypatch.setattr(backends_module, "_available", lambda name, device_type: (
        True if device_type == "cuda" else available(name, device_type)))
    mode = FakeTensorMode()

    def make(*shape, index=False):
        dtype = torch.long if index else torch.bfloat16
        return FakeTensor(mode, torch.empty(*shape, dtype=dtype, device="meta"),
                          torch.device("cuda"))

    with mode:
        call, _ = _calls(make, backend)[op]
        out = call()
    assert out.device.type == "cuda" and out.dtype == torch.bfloat16
    assert tuple(out.shape) == _real_shapes("torch")[op]


@pytest.mark.cuda
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", gpu_kernel_backends())
def test_cuda_graph_captures_forward_and_backward(op, backend):
    """On a GPU a call and its backward are captured in one CUDA graph (torch.cuda.graph):
    a host synchronisation anywhere in either (an .item(), a data-dependent branch) raises
    during capture. A replay gives what the same call computes eagerly (same dropout seed;
    bf16 tolerances, as reductions may be ordered differently)."""
    def make(*shape, index=False):
        if index:
            return torch.randint(0, 12, shape, device="cuda")
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16).requires_grad_()

    torch.manual_seed(0)
    call, inputs = _calls(make, backend)[op]

    def step():
        out = call()
        return (out, *torch.autograd.grad(out, inputs, torch.ones_like(out)))

    torch.manual_seed(1)
    expected = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as PyTorch asks
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    torch.manual_seed(1)  # the dropout seed is drawn on the host while capturing
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, expected, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("op", OPS)
def test_meta_tensors(op):
    def make(*shape, index=False):
        if index:
            return torch.empty(shape, dtype=torch.long, device="meta")
        return torch.empty(*shape, device="meta").requires_grad_()
    call, inputs = _calls(make, None)[op]
    out = call()
    grads = torch.autograd.grad(out.sum(), inputs)
    assert out.device.type == "meta" and tuple(out.shape) == _real_shapes("torch")[op]
    assert [g.shape for g in grads] == [t.shape for t in inputs]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", cpu_kernel_backends())
def test_eager_way_equals_the_dispatcher_way(op, backend, monkeypatch):
    """Outputs and gradients bitwise equal, the eager way against the custom op's."""
    def run():
        g = torch.Generator().manual_seed(5)

        def make(*shape, index=False):
            if index:
                return torch.randint(0, 12, shape, generator=g)
            return torch.randn(*shape, dtype=torch.float64, generator=g).requires_grad_()
        call, inputs = _calls(make, backend)[op]
        torch.manual_seed(6)  # attention's dropout
        out = call()
        return (out, *torch.autograd.grad(out.sum(), inputs))

    taken = []
    is_plain = _route.is_plain
    monkeypatch.setattr(_route, "is_plain", lambda *a: taken.append(is_plain(*a)) or taken[-1])
    eager = run()
    assert taken and all(taken), "a plain call went through the dispatcher"
    monkeypatch.setattr(_route, "is_plain", lambda *a: False)
    dispatcher = run()
    for a, b in zip(eager, dispatcher, strict=True):
        assert torch.equal(a, b)


def test_plain_only_for_ordinary_eager_tensors():
    x = torch.randn(3)
    assert _route.is_plain(x, None, 1.0, "cpu")
    assert not _route.is_plain(x.to("meta"))
    with FakeTensorMode() as mode:
        assert not _route.is_plain(mode.from_tensor(x))
        assert not _route.is_plain(torch.ones(1))  # any tensor while a mode is active

    class Sub(torch.Tensor):
        pass
    assert not _route.is_plain(x.as_subclass(Sub))


@pytest.mark.skipif("cpu" not in cpu_kernel_backends(), reason="needs pykernels._C")
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_and_saved_tensor_hooks(use_reentrant):
    """torch.utils.checkpoint (recomputing the ops in the backward) and saved-tensor hooks
    (offloading-style pack/unpack) give the gradients of a plain run, bitwise."""
    from torch.utils.checkpoint import checkpoint

    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(12, 16, dtype=torch.float64, generator=g, requires_grad=True)
    target = torch.randint(0, 12, (6,), generator=g)

    def block(x, w):
        h = pykernels.linear_act(x, w, None, "gelu", backend="cpu")
        q = h.view(1, 2, 3, 12)
        a = pykernels.scaled_dot_product_attention(q, q, q, is_causal=True, backend="cpu")
        return pykernels.cross_entropy(a.reshape(6, 12), target, backend="cpu")

    def grads(run):
        x.grad = w.grad = None
        run().backward()
        return x.grad, w.grad

    plain = grads(lambda: block(x, w))
    checkpointed = grads(lambda: checkpoint(block, x, w, use_reentrant=use_reentrant))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        hooked = grads(lambda: block(x, w))
    for a, b, c in zip(plain, checkpointed, hooked, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
