"""Side-by-side timings for the demo: each fused op and one training step against eager
PyTorch (and torch.compile of it on GPU), measured in the same run.

The variants of one comparison are timed in interleaved rounds (``timing.py``: a block of
calls of each in turn, each block's per-call time one sample); a row reports the median
of the rounds and, for each speed-up, the median and interquartile range of the per-round
ratios, and with a target the verdict that spread allows. Every call takes the next of a
few fresh random input sets (never zeros, never one fixed input). The demo's numbers are
a summary; ``python -m pykernels bench`` is the full benchmark.
"""

import itertools
import time

import torch
import torch.nn.functional as F

from ..ops.attention import scaled_dot_product_attention
from ..ops.cross_entropy import cross_entropy, linear_cross_entropy
from ..ops.linear_act import linear_act
from . import timing

INPUT_SETS = 3


def time_variants(variants, device, rounds, block_s, budget_s=None):
    """{name: per-call seconds of each round} of the zero-argument callables in
    ``variants``; each block of calls lasts about ``block_s`` (warm-up and compilation come
    first and do not count against ``budget_s``)."""
    sync = timing.sync_for(device)
    calls = {}
    for name, call in variants.items():
        call()  # warm up (and compile)
        sync()
        t0 = time.perf_counter()
        call()
        sync()
        calls[name] = max(1, int(block_s / max(time.perf_counter() - t0, 1e-6)))
    return timing.interleaved(variants, rounds, repeats=calls, sync=sync, budget_s=budget_s)


def _fwd_bwd(fn, make_inputs, scalar):
    """A call running ``fn`` forward and backward on the next input set."""
    sets = []
    for _ in range(INPUT_SETS):
        inputs = make_inputs()
        for t in inputs:
            if t.is_floating_point():
                t.requires_grad_(True)
        out = fn(*inputs)  # for the gradient's shape; made here, outside the timed calls
        grad = torch.ones_like(out) if scalar else torch.randn_like(out)  # as loss.backward()
        sets.append((inputs, [t for t in inputs if t.requires_grad], grad.detach()))
    rotation = itertools.cycle(sets)

    def call():
        inputs, diff, grad = next(rotation)
        torch.autograd.grad(fn(*inputs), diff, grad)

    return call


def op_cases(sizes, device, dtype, backend):
    """(op, shape label, fused fn, eager fn, make_inputs, scalar output)."""
    def randn(*shape, scale=1.0):
        return torch.randn(*shape, device=device, dtype=dtype) * scale

    def labels(n, classes):
        return torch.randint(0, classes, (n,), device=device)

    m, k, n = sizes["linear"]
    yield ("linear_act(gelu)", f"{m}x{k}->{n}",
           lambda x, w, b: linear_act(x, w, b, "gelu", backend=backend),
           lambda x, w, b: F.gelu(F.linear(x, w, b)),
           lambda: (randn(m, k), randn(n, k, scale=k**-0.5), randn(n)), False)
    rows, classes = sizes["cross_entropy"]
    yield ("cross_entropy", f"{rows}x{classes}",
           lambda x, t: cross_entropy(x, t, backend=backend), F.cross_entropy,
           lambda: (randn(rows, classes, scale=3.0), labels(rows, classes)), True)
    rows, hidden, classes = sizes["linear_cross_entropy"]
    yield ("linear_cross_entropy", f"{rows}x{hidden}->{classes}",
           lambda h, w, t: linear_cross_entropy(h, w, t, backend=backend),
           lambda h, w, t: F.cross_entropy(F.linear(h, w), t),
           lambda: (randn(rows, hidden), randn(classes, hidden, scale=hidden**-0.5),
                    labels(rows, classes)), True)
    b, h, length, e = sizes["attention"]
    yield ("attention(causal)", f"{b}x{h}x{length}x{e}",
           lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=True,
                                                        backend=backend),
           lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
           lambda: tuple(randn(b, h, length, e) for _ in range(3)), False)


def time_ops(sizes, device, dtype, backend, timing_args, target=None, out=print):
    """Rows {op, shape, fused_ms, eager_ms[, compile_ms], speedup...} for every op,
    forward + backward; torch.compile of the eager composition on GPU only (on CPU its
    compile time would not fit the demo's budget). ``timing_args``: time_variants'
    rounds, block_s and budget_s; ``target``: the speed-up vs eager each row is judged by."""
    results = []
    for op, shape, fused, eager, make_inputs, scalar in op_cases(sizes, device, dtype,
                                                                 backend):
        variants = {"fused": _fwd_bwd(fused, make_inputs, scalar),
                    "eager": _fwd_bwd(eager, make_inputs, scalar)}
        if torch.device(device).type == "cuda":
            variants["compile"] = _fwd_bwd(torch.compile(eager, dynamic=False), make_inputs,
                                           scalar)
        results.append(_row(op, shape, time_variants(variants, device, **timing_args),
                            target, out))
    return results


def _row(op, shape, samples, target, out):
    """The row of one comparison (JSON-ready), printed as one line."""
    ms = {name: timing.spread(s).scaled(1e3) for name, s in samples.items()}
    rounds = ms["fused"].rounds
    row = {"op": op, "shape": shape, "rounds": rounds,
           **{f"{name}_ms": t.median for name, t in ms.items()},
           **{f"{name}_ms_iqr": [t.lo, t.hi] for name, t in ms.items()}}
    ratios = []
    for base in ("eager", "compile"):
        if base in samples:
            speedup = timing.ratio(samples[base], samples["fused"])
            row[f"speedup_vs_{base}"] = speedup.median
            row[f"speedup_vs_{base}_iqr"] = [speedup.lo, speedup.hi]
            ratios.append(f"{speedup.median:.2f}x vs {base} "
                          f"(IQR {speedup.lo:.2f}-{speedup.hi:.2f})")
            if base == "eager" and target is not None:
                row["target"] = target
                row["verdict"] = timing.verdict(speedup, target)
                ratios[-1] += f" {row['verdict']}"
    times = "  ".join(f"{name} {t.median:8.3f} ms" for name, t in ms.items())
    out(f"{op:22s} {shape:18s} {times}  fused: {', '.join(ratios)}  "
        f"({rounds} round{'s' * (rounds != 1)})")
    return row


def time_train_steps(models, make_batch, device, timing_args, target=None,
                     autocast_dtype=None, out=print, label="train step"):
    """One AdamW training step (forward, backward, update) of each model in ``models``
    ({"fused": ..., "eager": ...[, "compile": ...]}), side by side on the same batches."""
    batches = [make_batch() for _ in range(INPUT_SETS)]
    device_type = torch.device(device).type

    def stepper(model):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        rotation = itertools.cycle(batches)

        def call():
            inputs, targets = next(rotation)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type, dtype=autocast_dtype,
                                enabled=autocast_dtype is not None):
                _, loss = model(inputs, targets)
            loss.backward()
            optimizer.step()

        return call

    samples = time_variants({name: stepper(model) for name, model in models.items()}, device,
                            **timing_args)
    shape = "x".join(map(str, batches[0][0].shape))
    return _row(label, shape, samples, target, out)
