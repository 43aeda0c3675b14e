"""Benchmark of pykernels.linear_glu: act(x @ Wg.T) * (x @ Wu.T), forward and backward.

    python -m bench.bench_linear_glu [--quick] [--activation silu|all|NAME,...] [--out DIR]

The fused op (every pykernels backend available; "torch" is left out, it is the eager
composition itself) against eager PyTorch on separate gate and up weights, as a Llama MLP
computes it (act(x @ Wg.T) * (x @ Wu.T), torch's own autograd), torch.compile of that
function (GPU only) and the bare GEMM x @ [Wg; Wu].T (torch.matmul), without biases as in
Llama. float32 on CPU, a bf16 sweep on GPU. Prints a table and the targets as PASS/FAIL
lines, and writes linear_glu_<device>.csv/.md/.png.

Targets: on CPU, float32 at 4096 x 1024 -> 2 x 2816, the cpu backend's fwd+bwd at least
1.0x eager (silu); on GPU, the default backend's fwd+bwd at least 1.0x eager at every shape.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import pykernels
from bench import bench_linear_act, common
from bench.bench_linear_act import ACT_FNS
from pykernels.activations import ACTIVATIONS

FAMILY = "linear_glu"
# (M, K, N): M tokens, K = d_model, N = the hidden size (the weight stacks 2 N rows).
GPU_SHAPES = [(8192, 1024, 2816), (8192, 2048, 5632), (8192, 4096, 11008)]
CPU_SHAPES = [(4096, 1024, 2816)]
QUICK_SHAPES = [(256, 128, 256)]
CPU_TARGET_SHAPE = (4096, 1024, 2816)


def eager_fn(activation):
    act = ACT_FNS[activation]
    return lambda x, w_gate, w_up: act(x @ w_gate.t()) * (x @ w_up.t())


def shape_label(m, k, n):
    return f"{m}x{k}x2x{n}"


def run_shape(machine, shape, activations, quick):
    """Yield the rows of one (M, K, N): the bare GEMM, then each activation's cases."""
    m, k, n = shape
    dtype = torch.bfloat16 if machine.is_cuda else torch.float32
    dev = machine.device

    def randn(*size):
        return torch.randn(*size, device=dev, dtype=dtype)

    def separate():
        return randn(m, k), randn(n, k) / k**0.5, randn(n, k) / k**0.5

    def stacked():
        return randn(m, k), randn(2 * n, k) / k**0.5

    # The two GEMMs of 2·M·N·K each forward, twice that backward.
    flops = {"fwd": 4 * m * n * k, "bwd": 8 * m * n * k, "fwd+bwd": 12 * m * n * k}
    where = dict(shape=shape_label(*shape), dtype=dtype, flops=flops, quick=quick)
    gemm = [("matmul", "gemm", lambda x, w: x @ w.t(), stacked)]
    yield from common.measure_cases(machine, gemm, **where)
    for activation in activations:
        torch.compiler.reset()  # a fresh compile cache, so no graph hits the recompile limit
        impls = bench_linear_act.implementations(machine, activation, pykernels.linear_glu,
                                                 eager_fn(activation))
        # eager and compile take Wg and Wu, pykernels the stacked [Wg; Wu]
        cases = [(f"linear_glu({activation})", name, fn,
                  separate if name in ("eager", "compile") else stacked)
                 for name, fn in impls]
        yield from common.measure_cases(machine, cases, **where)


def targets(rows, machine):
    """The speed targets, as common.report_checks wants them, over what was measured."""
    def ratios(backend, keep=lambda r: True):
        return {f"{r['op']} {r['shape']}": r["ratio_vs_eager"] for r in rows
                if r["backend"] == backend and r["mode"] == "fwd+bwd" and keep(r)
                and r.get("ratio_vs_eager") is not None}

    if not machine.is_cuda:
        target = shape_label(*CPU_TARGET_SHAPE)
        return [("cpu backend fwd+bwd >= eager at M=4096 K=1024 N=2x2816 fp32, silu (x eager)",
                 ratios("cpu", lambda r: r["shape"] == target and "silu" in r["op"]), 1.0)]
    return [("default backend fwd+bwd >= eager on every bf16 shape (x eager)",
             ratios("auto"), 1.0)]


def main(argv=None):
    parser = common.parser_for(__doc__)
    parser.add_argument("--activation", default="silu",
                        help="a name, a comma-separated list, or 'all' (default: silu)")
    args = parser.parse_args(argv)
    activations = ACTIVATIONS if args.activation == "all" else args.activation.split(",")
    unknown = [a for a in activations if a not in ACTIVATIONS]
    if unknown:
        parser.error(f"unknown activation {unknown}; choose from {', '.join(ACTIVATIONS)} or all")

    machine, notes = common.start([
        "shape is MxKx2xN (weight [Wg; Wu] of 2N x K); ratios are baseline_ms / ms (> 1: "
        "faster); eager takes separate Wg and Wu, as a Llama MLP; frac_of_gemm compares with "
        "the bare x @ [Wg; Wu].T (op matmul, backend gemm) of the same shape and mode"])
    shapes = QUICK_SHAPES if args.quick else (GPU_SHAPES if machine.is_cuda else CPU_SHAPES)
    common.run_benchmark(FAMILY, machine, notes, shapes,
                         lambda shape: run_shape(machine, shape, activations, args.quick),
                         lambda rows: targets(rows, machine), args.out, args.quick)


if __name__ == "__main__":
    main()
