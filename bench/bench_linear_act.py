"""Benchmark of pykernels.linear_act: act(x @ W.T + b), forward and backward.

    python -m bench.bench_linear_act [--quick] [--activation gelu|all|NAME,...] [--out DIR]

Every available pykernels backend ("auto" is the default choice; "torch" is left out, it
is the eager composition itself) against eager PyTorch (F.linear, then the activation,
with torch's own autograd), torch.compile of that same function (GPU only) and the bare
GEMMs (torch.matmul: cuBLAS on GPU), in bf16 on GPU and float32 on CPU. Prints a table
and the speed targets as PASS/FAIL lines, and writes linear_act_<device>.csv/.md/.png.
"""

import functools
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

import pykernels
from bench import common
from pykernels.activations import ACTIVATIONS

FAMILY = "linear_act"
ACT_FNS = {
    "none": lambda z: z,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "leaky_relu": functools.partial(F.leaky_relu, negative_slope=0.01),
}
# (M, K, N): M tokens, K input features, N output features.
GPU_SHAPES = [(8192, 768, 3072), (8192, 1024, 4096), (8192, 4096, 16384), (8192, 16384, 4096)]
CPU_SHAPES = [(4096, 512, 512), (4096, 1024, 1024)]
QUICK_SHAPES = [(256, 128, 256)]


def eager_fn(activation):
    act = ACT_FNS[activation]
    return lambda x, w, b: act(F.linear(x, w, b))


def shape_label(m, k, n):
    return f"{m}x{k}x{n}"


def implementations(machine, activation, op=pykernels.linear_act, eager=None):
    """(label, function) pairs for one activation: ``eager`` (default: eager_fn), its
    torch.compile (GPU only), and ``op`` on each pykernels backend ("auto" first)."""
    eager = eager or eager_fn(activation)
    impls = [("eager", eager)]
    if machine.is_cuda:
        # dynamic=False: one specialised graph per shape, as a training run would get.
        impls.append(("compile", torch.compile(eager, dynamic=False)))
    # Benchmark the cpu backend on CPU (Triton there is only the slow interpreter).
    ours = [b for b in pykernels.backends(machine.device)
            if b != "torch" and (machine.is_cuda or b == "cpu")]
    for backend in [None] + ours:
        fn = functools.partial(op, activation=activation, backend=backend)
        impls.append((backend or "auto", fn))
    return impls


def run_shape(machine, shape, activations, quick):
    """Yield the rows of one (M, K, N): the bare GEMMs, then each activation's cases."""
    m, k, n = shape
    dtype = torch.bfloat16 if machine.is_cuda else torch.float32
    dev = machine.device

    def randn(*size):
        return torch.randn(*size, device=dev, dtype=dtype)

    def linear_inputs():
        return randn(m, k), randn(n, k) / k**0.5, randn(n)

    # Linear FLOPs: 2·M·N·K forward, twice that backward.
    flops = {"fwd": 2 * m * n * k, "bwd": 4 * m * n * k, "fwd+bwd": 6 * m * n * k}
    where = dict(shape=shape_label(*shape), dtype=dtype, flops=flops, quick=quick)
    gemm = [("matmul", "gemm", lambda x, w: x @ w.t(), lambda: linear_inputs()[:2])]
    yield from common.measure_cases(machine, gemm, **where)
    for activation in activations:
        torch.compiler.reset()  # a fresh compile cache, so no graph hits the recompile limit
        cases = [(f"linear_act({activation})", name, fn, linear_inputs)
                 for name, fn in implementations(machine, activation)]
        yield from common.measure_cases(machine, cases, **where)


def targets(rows, machine):
    """The speed targets, as common.report_checks wants them, over what was measured."""
    def ratios(backend, mode, keep=lambda r: True):
        return {f"{r['op']} {r['shape']}": r["ratio_vs_eager"] for r in rows
                if r["backend"] == backend and r["mode"] == mode and keep(r)
                and r.get("ratio_vs_eager") is not None}

    if not machine.is_cuda:
        small = shape_label(4096, 512, 512)
        return [("cpu backend fwd+bwd >= eager at M=4096 K=N=512 fp32 (x eager)",
                 ratios("cpu", "fwd+bwd", lambda r: r["shape"] == small), 1.0)]
    small_k = {shape_label(*s) for s in GPU_SHAPES if s[1] <= 1024}
    big = shape_label(8192, 4096, 16384)
    best_core = {}  # per op: the best of our backends' forward as a fraction of cuBLAS
    for r in rows:
        if (r["shape"] == big and r["mode"] == "fwd" and r["op"].startswith("linear_act")
                and r["backend"] not in ("eager", "compile") and r.get("frac_of_gemm")):
            best_core[r["op"]] = max(best_core.get(r["op"], 0.0), r["frac_of_gemm"])
    return [
        ("default backend fwd+bwd >= eager on every shape (x eager)",
         ratios("auto", "fwd+bwd"), 1.0),
        ("default backend fwd+bwd >= 1.2x eager at K <= 1024 (x eager)",
         ratios("auto", "fwd+bwd", lambda r: r["shape"] in small_k), 1.2),
        ("best forward GEMM core >= 90% of cuBLAS at K=4096 N=16384 (fraction)",
         best_core, 0.9),
    ]


def main(argv=None):
    parser = common.parser_for(__doc__)
    parser.add_argument("--activation", default=None,
                        help="a name, a comma-separated list, or 'all' "
                             "(default: gelu on GPU, relu,gelu on CPU)")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if args.activation == "all":
        activations = ACTIVATIONS
    else:
        activations = (args.activation or ("gelu" if on_gpu else "relu,gelu")).split(",")
    unknown = [a for a in activations if a not in ACTIVATIONS]
    if unknown:
        parser.error(f"unknown activation {unknown}; choose from {', '.join(ACTIVATIONS)} or all")

    machine, notes = common.start([
        "shape is MxKxN; ratios are baseline_ms / ms (> 1: faster); frac_of_gemm compares "
        "with the bare GEMMs (op matmul, backend gemm) of the same shape and mode"])
    shapes = QUICK_SHAPES if args.quick else (GPU_SHAPES if machine.is_cuda else CPU_SHAPES)
    common.run_benchmark(FAMILY, machine, notes, shapes,
                         lambda shape: run_shape(machine, shape, activations, args.quick),
                         lambda rows: targets(rows, machine), args.out, args.quick)


if __name__ == "__main__":
    main()
