"""``python -m pykernels check``: every fused op against plain PyTorch on every backend."""

import warnings

import torch

from .. import reference
from ..activations import ACTIVATIONS
from ..backends import backends, supports
from ..ops import attention
from ..ops.cross_entropy import cross_entropy, linear_cross_entropy
from ..ops.linear_act import linear_act
from ..testing import within_low_precision_rule

# cross-entropy variants: PyTorch's options alone, then with every extra at once.
_CE_OPTIONS = {
    "plain": {},
    "ls+z+cap": {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 30.0},
}


# attention variants: causal self-attention, then a boolean mask with grouped-query heads,
# a sliding window and a softcap at once (q, k, v shapes differ: GQA and cross-attention).
_ATTENTION_OPTIONS = {
    "causal": ({"is_causal": True}, (2, 3, 37, 16), (2, 3, 37, 16)),
    "mask+gqa+win+cap": ({"enable_gqa": True, "window": (20, 5), "softcap": 20.0},
                         (2, 4, 37, 16), (2, 2, 45, 16)),
}


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _dtypes(backend, device):
    wanted = (torch.float32, torch.bfloat16) if device == "cuda" else (torch.float32,)
    return [d for d in wanted if supports(backend, device, d)]


def _compare(fused, plain, exact_inputs, grad_out, dtype):
    """Output and gradients of ``fused`` in ``dtype`` against ``plain`` in float64, by
    the low-precision rule; returns (ok, worst error, its tolerance)."""
    def run(fn, dtype):
        inputs = [t.to(dtype).requires_grad_() if t.is_floating_point() else t
                  for t in exact_inputs]
        out = fn(*inputs)
        diff = [t for t in inputs if t.requires_grad]
        return [out, *torch.autograd.grad(out, diff, grad_out.to(dtype))]

    results = zip(run(fused, dtype), run(plain, dtype), run(plain, torch.float64), strict=True)
    checks = [within_low_precision_rule(a, p, e) for a, p, e in results]
    worst = max(checks, key=lambda c: c[1] / c[2])
    return all(c[0] for c in checks), worst[1], worst[2]


def _cases(backend, device, generator):
    """(op, variant, fused, plain, exact inputs, grad_out) at odd shapes."""
    def make(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(device)

    def targets(n, classes):
        t = torch.randint(0, classes, (n,), generator=generator)
        t[::7] = -100  # some ignored rows
        return t.to(device)

    for activation in ACTIVATIONS:
        yield ("linear_act", activation,
               lambda x, w, b, a=activation: linear_act(x, w, b, a, backend=backend),
               lambda x, w, b, a=activation: reference.linear_act(x, w, b, a),
               [make(3, 37, 96), make(80, 96, scale=0.1), make(80)], make(3, 37, 80))
    one = torch.ones((), dtype=torch.float64, device=device)  # loss.backward()
    for variant, options in _CE_OPTIONS.items():
        yield ("cross_entropy", variant,
               lambda x, t, o=options: cross_entropy(x, t, backend=backend, **o),
               lambda x, t, o=options: reference.cross_entropy(x, t, **o),
               [make(37, 1025, scale=3.0), targets(37, 1025)], one)
        yield ("linear_cross_entropy", variant,
               lambda x, w, b, t, o=options: linear_cross_entropy(
                   x, w, t, linear_bias=b, chunk_size=16, backend=backend, **o),
               lambda x, w, b, t, o=options: reference.linear_cross_entropy(
                   x, w, t, b, **o),
               [make(37, 96), make(1025, 96, scale=0.3), make(1025), targets(37, 1025)], one)
    for variant, (options, q_shape, kv_shape) in _ATTENTION_OPTIONS.items():
        mask = None
        if "window" in options:  # True: may attend; a few fully masked rows must give 0
            mask = torch.rand(q_shape[2], kv_shape[2], generator=generator) > 0.3
            mask[::11] = False
            mask = mask.to(device)
        yield ("attention", variant,
               lambda q, k, v, o=options, m=mask: attention.scaled_dot_product_attention(
                   q, k, v, m, backend=backend, **o),
               lambda q, k, v, o=options, m=mask: reference.scaled_dot_product_attention(
                   q, k, v, m, **o),
               [make(*q_shape), make(*kv_shape), make(*kv_shape)], make(*q_shape))


def run_checks(out=print):
    """Check every (op, backend, device, dtype, variant), printing one line each; return
    the results as dicts with ``max_err``, ``tolerance`` and ``result`` ("pass" or
    "FAIL")."""
    # Triton's interpreter evaluates masked-off lanes too, and numpy warns about their
    # log(0) and inf - inf; the kernels never use those lanes.
    warnings.filterwarnings("ignore", category=RuntimeWarning,
                            module="triton.runtime.interpreter")
    generator = torch.Generator().manual_seed(0)
    results = []
    out(f"{'op':20s} {'backend':8s} {'device':6s} {'dtype':9s} {'variant':16s} "
        f"{'max err':>10s} {'tolerance':>10s}  result")
    for device in _devices():
        for backend in backends(device):
            if backend == "torch":
                continue
            for dtype in _dtypes(backend, device):
                for op, variant, fused, plain, inputs, grad_out in _cases(backend, device,
                                                                         generator):
                    ok, err, tol = _compare(fused, plain, inputs, grad_out, dtype)
                    row = {"op": op, "backend": backend, "device": device,
                           "dtype": str(dtype).replace("torch.", ""), "variant": variant,
                           "max_err": err, "tolerance": tol, "result": "pass" if ok else "FAIL"}
                    results.append(row)
                    out(f"{op:20s} {backend:8s} {device:6s} {row['dtype']:9s} {variant:16s} "
                        f"{err:10.2e} {tol:10.2e}  {row['result']}")
    return results


def all_passed(results):
    return all(r["result"] == "pass" for r in results)
