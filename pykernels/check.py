"""``python -m pykernels check``: every fused op against plain PyTorch on every backend."""

import torch

from .backends import backends, supports
from . import reference
from .activations import ACTIVATIONS
from .ops.linear_act import linear_act
from .testing import within_low_precision_rule


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _dtypes(backend, device):
    wanted = (torch.float32, torch.bfloat16) if device == "cuda" else (torch.float32,)
    return [d for d in wanted if supports(backend, device, d)]


def _linear_act_case(backend, device, dtype, activation, generator):
    """Forward and all three gradients at an odd shape; returns (ok, worst error, tol)."""
    def make(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(device)

    exact_inputs = [make(3, 37, 96), make(80, 96) / 10, make(80)]
    grad_out = make(3, 37, 80)

    def run(fn, dtype):
        inputs = [t.to(dtype).requires_grad_() for t in exact_inputs]
        out = fn(*inputs)
        grads = torch.autograd.grad(out, inputs, grad_out.to(dtype))
        return [out, *grads]

    def fused(x, w, b):
        return linear_act(x, w, b, activation, backend=backend)

    def plain(x, w, b):
        return reference.linear_act(x, w, b, activation)

    results = zip(run(fused, dtype), run(plain, dtype), run(plain, torch.float64))
    checks = [within_low_precision_rule(a, p, e) for a, p, e in results]
    worst = max(checks, key=lambda c: c[1] / c[2])
    return all(c[0] for c in checks), worst[1], worst[2]


def run_checks(out=print):
    """Print one line per (op, backend, device, dtype, activation); True if all pass."""
    generator = torch.Generator().manual_seed(0)
    all_ok = True
    out(f"{'op':12s} {'backend':8s} {'device':6s} {'dtype':9s} {'activation':11s} "
        f"{'max err':>10s} {'tolerance':>10s}  result")
    for device in _devices():
        for backend in backends(device):
            if backend == "torch":
                continue
            for dtype in _dtypes(backend, device):
                for activation in ACTIVATIONS:
                    ok, err, tol = _linear_act_case(backend, device, dtype, activation,
                                                    generator)
                    all_ok &= ok
                    out(f"{'linear_act':12s} {backend:8s} {device:6s} "
                        f"{str(dtype).replace('torch.', ''):9s} {activation:11s} "
                        f"{err:10.2e} {tol:10.2e}  {'pass' if ok else 'FAIL'}")
    return all_ok
