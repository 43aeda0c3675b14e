"""torch.autocast: the fused functions cast their matmul operands as autocast casts those of
F.linear / F.scaled_dot_product_attention, so the backend is chosen for (and runs in) the
autocast dtype, and gradients reach the float32 leaves in float32."""

import pytest
import torch
import torch.nn.functional as F
from conftest import gpu_kernel_backends

import pykernels


def _inputs(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(37, 24, generator=g)
    w = torch.randn(11, 24, generator=g) / 5
    b = torch.randn(11, generator=g)
    q = torch.randn(2, 3, 19, 16, generator=g)
    target = torch.randint(0, 11, (37,), generator=g)
    leaves = [t.to(device).requires_grad_() for t in (x, w, b, q)]
    return leaves, target.to(device)


def _fused(x, w, b, q, target, backend=None):
    return (pykernels.linear_act(x, w, b, "gelu", backend=backend),
            pykernels.scaled_dot_product_attention(q, q, q, is_causal=True, backend=backend),
            pykernels.linear_cross_entropy(x, w, target, linear_bias=b, backend=backend))


def _torch(x, w, b, q, target):
    return (F.gelu(F.linear(x, w, b)), F.scaled_dot_product_attention(q, q, q, is_causal=True),
            F.cross_entropy(F.linear(x, w, b), target))


def _run(fn, device, dtype, backend=()):
    leaves, target = _inputs(device)
    with torch.autocast(device, dtype=dtype):
        outs = fn(*leaves, target, *backend)
    sum(o.float().sum() for o in outs).backward()
    return outs, [t.grad for t in leaves]


def _assert_like_torch(device, dtype, backend=()):
    outs, grads = _run(_fused, device, dtype, backend)
    ref_outs, ref_grads = _run(_torch, device, dtype)
    for out, ref in zip(outs[:2], ref_outs[:2], strict=True):
        assert out.dtype == ref.dtype == dtype
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    # The loss: fp32 accumulation inside the fused kernel; torch's autocast runs
    # cross-entropy in float32 on the half-precision logits.
    torch.testing.assert_close(outs[2].float(), ref_outs[2].float(), atol=2e-2, rtol=2e-2)
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, ref, atol=5e-2, rtol=5e-2)


def test_cpu_autocast_matches_torch():
    _assert_like_torch("cpu", torch.bfloat16)


def test_autocast_operands_reach_the_backend():
    """Under CPU autocast the operands are bfloat16 by the time the backend is chosen: the cpu
    backend (float32/float64 only) then refuses them, naming the dtype."""
    leaves, target = _inputs("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for call in (
            lambda: pykernels.linear_act(leaves[0], leaves[1], leaves[2], backend="cpu"),
            lambda: pykernels.linear_cross_entropy(leaves[0], leaves[1], target, backend="cpu"),
            lambda: pykernels.scaled_dot_product_attention(*leaves[3:] * 3, backend="cpu"),
        ):
            with pytest.raises(TypeError, match="got bfloat16"):
                call()


def test_float64_is_not_cast():
    x = torch.randn(5, 8, dtype=torch.float64)
    w = torch.randn(3, 8, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert pykernels.linear_act(x, w, None, "relu").dtype == torch.float64


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", gpu_kernel_backends())
def test_gpu_autocast_matches_torch(backend, dtype):
    _assert_like_torch("cuda", dtype, (backend,))
