"""On the CPU "auto" weighs the size of a call (issue 15): below a family's measured
crossover (pykernels.backends.CPU_CROSSOVER) it runs the torch composition, eager's own
operators, whose host cost is eager's; from the crossover on, the fused kernels. Explicit
backends and CUDA tensors are not affected."""

import importlib

import pytest
import torch
import torch.nn.functional as F

import pykernels
from pykernels import reference

backends = importlib.import_module("pykernels.backends")

FAMILIES = ["linear_act", "linear_glu", "cross_entropy", "linear_cross_entropy", "attention"]
CAPABILITIES = ["AVX512", "AVX2"]
KERNELS = "cpu" if backends.extension() is not None else "torch"


def test_every_family_has_a_crossover_per_capability():
    for capability in CAPABILITIES:
        assert sorted(backends.CPU_CROSSOVER[capability]) == sorted(FAMILIES)


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("family", FAMILIES)
def test_crossover_splits_auto(monkeypatch, capability, family):
    monkeypatch.setattr(backends, "_CPU_KERNELS_FROM", backends.crossovers(capability))
    crossover = backends.CPU_CROSSOVER[capability][family]
    if crossover is None:  # never measured faster: the composition at every size
        assert backends.resolve(None, "cpu", torch.float32, family, 1 << 62) == "torch"
    else:
        assert backends.resolve(None, "cpu", torch.float32, family, crossover - 1) == "torch"
        assert backends.resolve(None, "cpu", torch.float32, family, crossover) == KERNELS
        assert backends.resolve(None, "cpu", torch.float64, family, crossover) == KERNELS
    # A request by name is kept whatever the size; without a family, no size rule.
    assert backends.resolve(KERNELS, "cpu", torch.float32, family, 1) == KERNELS
    with backends.use_backend(KERNELS):
        assert backends.resolve(None, "cpu", torch.float32, family, 1) == KERNELS
    assert backends.resolve(None, "cpu", torch.float32) == KERNELS


def test_cpu_without_simd_kernels_keeps_the_composition(monkeypatch):
    monkeypatch.setattr(backends, "_CPU_KERNELS_FROM", backends.crossovers("DEFAULT"))
    for family in FAMILIES:
        assert backends.resolve(None, "cpu", torch.float32, family, 1 << 62) == "torch"


def test_cuda_auto_does_not_look_at_the_size(monkeypatch):
    monkeypatch.setattr(backends, "_available", lambda name, device_type: True)
    monkeypatch.setattr(backends, "_AUTO_ORDER", dict(backends._EVIDENCE_FREE_ORDER))
    for family in FAMILIES:
        assert backends.resolve(None, "cuda", torch.bfloat16, family, 1) == "triton"


def _calls():
    """{family: (call, expected size)}: each public function on small tensors, with the
    size its docstring in pykernels.backends defines; ``call(**kw)`` passes kw on."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, generator=g)
    w, glu_w = torch.randn(6, 5, generator=g), torch.randn(12, 5, generator=g)
    logits = torch.randn(12, 7, generator=g)
    target = torch.randint(0, 6, (12,), generator=g)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for n in (5, 9, 9))
    return {
        "linear_act": (lambda **kw: pykernels.linear_act(x, w, None, "gelu", **kw),
                       3 * 4 * 5 * 6),
        "linear_glu": (lambda **kw: pykernels.linear_glu(x, glu_w, **kw), 3 * 4 * 5 * 6),
        "cross_entropy": (lambda **kw: pykernels.cross_entropy(logits, target, **kw), 12 * 7),
        "linear_cross_entropy": (lambda **kw: pykernels.linear_cross_entropy(
            x.reshape(12, 5), w, target, **kw), 12 * 5 * 6),
        "attention": (lambda **kw: pykernels.scaled_dot_product_attention(q, k, v, **kw),
                      2 * 3 * 5 * 9 * 8),
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_public_functions_pass_their_family_and_size(monkeypatch, family):
    """The full way (backend="auto" by name: small calls with the default backend take
    the shortcut of pykernels/ops/_shortcut.py, tested in tests/ops/test_shortcut.py)."""
    seen = []
    module = importlib.import_module(f"pykernels.ops.{family}")

    def spy(backend, device, dtype, *args):
        seen.append(args)
        return "torch"
    monkeypatch.setattr(module, "resolve", spy)
    call, size = _calls()[family]
    call(backend="auto")
    assert seen == [(family, size)]


def _same(run, eager, inputs):
    """run(*inputs) and eager(*inputs) give the same bits, forward and backward."""
    leaves = [[t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
              for _ in range(2)]
    outputs = [f(*ts) for f, ts in zip((run, eager), leaves, strict=True)]
    assert torch.equal(outputs[0], outputs[1])
    grads = [torch.autograd.grad(o, [t for t in ts if t.requires_grad], torch.ones_like(o))
             for o, ts in zip(outputs, leaves, strict=True)]
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_small_calls_run_eagers_own_operators():
    """Below the crossover auto computes exactly what eager PyTorch computes, bit for bit:
    the same operators (F.scaled_dot_product_attention for attention without a mask)."""
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(8, 16, generator=g), torch.randn(24, 16, generator=g), None
    target = torch.randint(0, 24, (8,), generator=g)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=g) for _ in range(3))
    _same(lambda x, w: pykernels.linear_act(x, w, b, "gelu"),
          lambda x, w: F.gelu(F.linear(x, w)), (x, w))
    _same(lambda x, w: pykernels.linear_glu(x, w, b, "silu"),
          lambda x, w: reference.linear_glu(x, w, b, "silu"), (x, w))
    _same(lambda z, t: pykernels.cross_entropy(z, t, label_smoothing=0.1),
          lambda z, t: F.cross_entropy(z, t, label_smoothing=0.1), (F.linear(x, w), target))
    _same(lambda x, w, t: pykernels.linear_cross_entropy(x, w, t),
          lambda x, w, t: F.cross_entropy(F.linear(x, w), t), (x, w, target))
    for causal in (False, True):
        _same(lambda q, k, v, c=causal: pykernels.scaled_dot_product_attention(
                  q, k, v, is_causal=c),
              lambda q, k, v, c=causal: F.scaled_dot_product_attention(q, k, v, is_causal=c),
              (q, k, v))


def test_small_masked_attention_keeps_the_contract():
    """With a mask a row may have nothing to attend to: auto's torch path then runs the
    composition, which returns 0 there and passes zero gradient (PyTorch's kernels need
    not)."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 4, 8, generator=g).requires_grad_() for _ in range(3))
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[1] = False
    out = pykernels.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(out[:, :, 1], torch.zeros(1, 2, 8))
    out.sum().backward()
    assert torch.equal(q.grad[:, :, 1], torch.zeros(1, 2, 8))
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()
