"""Benchmark of pykernels.scaled_dot_product_attention, forward and backward.

    python -m bench.bench_attention [--quick] [--out DIR]

Every available pykernels backend ("auto" is the default choice) against PyTorch's
F.scaled_dot_product_attention with its default choice and with each backend it offers
here (flash, cuDNN, memory-efficient, math; via torch.nn.attention.sdpa_kernel), and
torch.compile of the math composition (GPU). TFLOP/s count 4·B·H·L·S·E forward (halved when
causal) and 2.5x that backward, as a fraction of the measured matmul
rate. bf16 on GPU: B·L = 16384 tokens, H·E = 2048, E in {64, 128}, L from 512 to 16k;
float32 on CPU: B=4, H=8, L=512, E=64. Writes attention_<device>.csv/.md/.png.
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

FAMILY = "attention"
# (B, H, L, E, causal)
GPU_SHAPES = [(16384 // length, 2048 // e, length, e, causal)
              for e in (64, 128) for length in (512, 1024, 2048, 4096, 8192, 16384)
              for causal in (False, True)]
CPU_SHAPES = [(4, 8, 512, 64, False), (4, 8, 512, 64, True)]
QUICK_SHAPES = [(2, 2, 64, 16, False)]


def _sdpa_backends(machine):
    """(label, torch.nn.attention.SDPBackend or None for PyTorch's default choice)."""
    from torch.nn.attention import SDPBackend

    labels = [("sdpa", None)]
    if machine.is_cuda:
        labels += [("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                   ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
                   ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION)]
    labels.append(("sdpa_math", SDPBackend.MATH))
    return labels


def _sdpa(backend, causal):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


def cases(machine, causal):
    out = [(label, _sdpa(backend, causal)) for label, backend in _sdpa_backends(machine)]
    if machine.is_cuda:
        composed = functools.partial(pykernels.reference.scaled_dot_product_attention,
                                     is_causal=causal)
        out.append(("compile", torch.compile(composed, dynamic=False)))
    ours = [b for b in pykernels.backends(machine.device)
            if b != "torch" and (machine.is_cuda or b == "cpu")]
    for backend in [None] + ours:
        out.append((backend or "auto", functools.partial(
            pykernels.scaled_dot_product_attention, is_causal=causal, backend=backend)))
    return out


def run_shape(machine, shape, quick):
    b, h, length, e, causal = shape
    dtype = torch.bfloat16 if machine.is_cuda else torch.float32
    dev = machine.device

    def inputs():
        return tuple(torch.randn(b, h, length, e, device=dev, dtype=dtype) for _ in range(3))

    fwd = 4 * b * h * length * length * e / (2 if causal else 1)
    flops = {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}
    label = f"{b}x{h}x{length}x{e}{'c' if causal else ''}"
    torch.compiler.reset()
    rows = [("sdpa", name, fn, inputs) for name, fn in cases(machine, causal)]
    yield from common.measure_cases(machine, rows, shape=label, dtype=dtype, flops=flops,
                                    quick=quick)


def targets(rows, machine):
    def ours(mode, keep):
        return {f"{r['shape']} {r['mode']}": r for r in rows
                if r["backend"] == "auto" and r["mode"] == mode and keep(r["shape"])}

    def vs_sdpa(selected):
        by_key = {(r["shape"], r["mode"]): r for r in rows if r["backend"] == "sdpa"}
        out = {}
        for label, r in selected.items():
            base = by_key.get((r["shape"], r["mode"]))
            if base:
                out[label] = base["ms"] / r["ms"]
        return out

    if not machine.is_cuda:
        def cpu(shape):
            return {f"{r['shape']} {r['mode']}": r for r in rows
                    if r["backend"] == "cpu" and r["mode"] == "fwd+bwd" and r["shape"] == shape}

        return [("cpu backend fwd+bwd >= F.scaled_dot_product_attention at B=4 H=8 L=512 "
                 "E=64 fp32 (x sdpa)", vs_sdpa(cpu("4x8x512x64")), 1.0),
                ("cpu backend fwd+bwd >= F.scaled_dot_product_attention at B=4 H=8 L=512 "
                 "E=64 fp32, causal (x sdpa)", vs_sdpa(cpu("4x8x512x64c")), 1.0)]

    def long_e128(shape):
        _, _, length, e = shape.rstrip("c").split("x")
        return int(e) == 128 and int(length) >= 4096

    def frac(mode):
        return {k: r["frac_of_ceiling"] for k, r in ours(mode, long_e128).items()
                if r.get("frac_of_ceiling") is not None}

    return [
        ("default backend forward >= 50% of the matmul rate at E=128, L >= 4k", frac("fwd"),
         0.5),
        ("default backend backward >= 40% of the matmul rate at E=128, L >= 4k", frac("bwd"),
         0.4),
        ("default backend fwd+bwd >= PyTorch SDPA's default at E=128, L >= 4k (x sdpa)",
         vs_sdpa(ours("fwd+bwd", long_e128)), 1.0),
    ]


def main(argv=None):
    args = common.parser_for(__doc__).parse_args(argv)
    machine, notes = common.start([
        "shape is BxHxLxE (c: causal); ratios are baseline_ms / ms (> 1: faster); "
        "frac_of_ceiling is TFLOP/s over the measured matmul rate"])
    shapes = QUICK_SHAPES if args.quick else (GPU_SHAPES if machine.is_cuda else CPU_SHAPES)
    common.run_benchmark(FAMILY, machine, notes, shapes,
                         lambda shape: run_shape(machine, shape, args.quick),
                         lambda rows: targets(rows, machine), args.out, args.quick)


if __name__ == "__main__":
    main()
