"""Benchmark of pykernels.cross_entropy and pykernels.linear_cross_entropy.

    python -m bench.bench_cross_entropy [--quick] [--out DIR]

cross_entropy: every available pykernels backend ("auto" is the default choice) against
eager F.cross_entropy, torch.compile of it (GPU) and Liger-Kernel's cross entropy where
it is installed; GB/s count the logits read once plus the gradient written once,
as a fraction of the measured copy bandwidth.
linear_cross_entropy: against eager (F.linear then F.cross_entropy), torch.compile of
that (GPU), torch's own chunked F.linear_cross_entropy where torch has it, and Liger's
fused linear cross entropy where installed; TFLOP/s of the three GEMMs, and peak memory
as a multiple of (input + weight + their gradients).

Losses are backpropagated with grad_output = 1, as loss.backward() does. bf16 on GPU,
float32 on CPU. Writes cross_entropy_<device>.csv/.md/.png and prints the targets.

Both autograd modes of the fused losses are measured side by side: the default (PyTorch's
contract: nothing saved is modified; cross_entropy recomputes the gradient from the kept
logits in the backward, linear_cross_entropy scales its chunk-wise gradients into new
tensors) and ``inplace_backward=True`` (backend label "<backend>-inplace": the gradient is
written by the forward and scaled in place). Peak memory: on GPU the allocator's peak; on
CPU the peak resident memory one fwd+bwd adds above its inputs, each case measured once in
a fresh process (CPU cross_entropy only).
"""

import functools
import multiprocessing
import sys
import types
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

import pykernels
from bench import common

FAMILY = "cross_entropy"
# ("ce", N, V) and ("lce", N, H, V).
GPU_SHAPES = [("ce", 16384, 32768), ("ce", 16384, 131072), ("ce", 16384, 262144),
              ("lce", 16384, 4096, 131072)]
CPU_SHAPES = [("ce", 4096, 32000), ("lce", 2048, 256, 8192)]
QUICK_SHAPES = [("ce", 256, 1000), ("lce", 256, 64, 1000)]
TARGET_CE_GPU = "16384x131072"
# No "bwd" alone: the common harness re-runs backward on a retained graph, and the fused
# ops consume the gradient they saved in the forward (a second backward raises).
MODES = ("fwd", "fwd+bwd")
TARGET_CE_CPU = "4096x32000"


def _ones_like(t):
    return torch.ones_like(t)


def _liger():
    """Liger-Kernel's (cross_entropy, fused_linear_cross_entropy) functions, or None."""
    try:
        from liger_kernel.transformers.functional import (
            liger_cross_entropy,
            liger_fused_linear_cross_entropy,
        )
    except ImportError:
        return None
    return liger_cross_entropy, liger_fused_linear_cross_entropy


def _our_backends(machine):
    # On CPU only the cpu backend (Triton there is the slow interpreter).
    ours = [b for b in pykernels.backends(machine.device)
            if b != "torch" and (machine.is_cuda or b == "cpu")]
    return [None] + ours


def ce_cases(machine):
    eager = F.cross_entropy
    cases = [("eager", eager)]
    if machine.is_cuda:
        cases.append(("compile", torch.compile(eager, dynamic=False)))
        liger = _liger()
        if liger:
            cases.append(("liger", lambda x, t: liger[0](x, t)))
    for backend in _our_backends(machine):
        for inplace in (False, True):
            cases.append((_label(backend, inplace), functools.partial(
                pykernels.cross_entropy, backend=backend, inplace_backward=inplace)))
    return cases


def _label(backend, inplace):
    return (backend or "auto") + ("-inplace" if inplace else "")


def lce_eager(x, w, t):
    return F.cross_entropy(F.linear(x, w), t)


def lce_cases(machine):
    cases = [("eager", lce_eager)]
    if machine.is_cuda:
        cases.append(("compile", torch.compile(lce_eager, dynamic=False)))
        liger = _liger()
        if liger:
            cases.append(("liger", lambda x, w, t: liger[1](x, w, t)))
    if hasattr(F, "linear_cross_entropy"):
        from torch.nn import LinearCrossEntropyOptions

        options = LinearCrossEntropyOptions()  # torch's chunked path, default policy
        cases.append(("torch_chunked", lambda x, w, t: F.linear_cross_entropy(
            x, w, t, options=options)))
    for backend in _our_backends(machine):
        for inplace in (False, True):
            cases.append((_label(backend, inplace), functools.partial(
                pykernels.linear_cross_entropy, backend=backend, inplace_backward=inplace)))
    return cases


def _peak_rss_child(backend, n, v, queue):
    """In a fresh process: the peak resident memory (MB) one fwd+bwd of cross_entropy case
    ``backend`` adds above its live inputs. Linux's VmHWM of this process, reset to the
    current VmRSS once the inputs exist (/proc/self/clear_refs); large blocks are mmapped and
    returned on free, so the high-water mark tracks live tensors. (getrusage's ru_maxrss
    would not do: it carries the parent's high-water mark across exec.)"""
    torch.manual_seed(0)
    # filled in place: a temporary as large as x would count in the baseline
    x = torch.empty(n, v).normal_(0.0, 4.0).requires_grad_()
    t = torch.randint(0, v, (n,))
    cpu = types.SimpleNamespace(device=torch.device("cpu"), is_cuda=False)
    fn = dict(ce_cases(cpu))[backend]
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_kib("VmRSS")
    fn(x, t).backward()
    queue.put((_status_kib("VmHWM") - base) / 1024)


def _status_kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def cpu_peak_rss_mb(labels, n, v):
    """{label: MB} of _peak_rss_child, one spawned process per case."""
    context = multiprocessing.get_context("spawn")
    peaks = {}
    for label in labels:
        queue = context.Queue()
        child = context.Process(target=_peak_rss_child, args=(label, n, v, queue))
        child.start()
        peaks[label] = queue.get(timeout=600)
        child.join()
    return peaks


def run_shape(machine, shape, quick):
    dtype = torch.bfloat16 if machine.is_cuda else torch.float32
    dev = machine.device
    size = dtype.itemsize
    where = dict(dtype=dtype, quick=quick, grad_like=_ones_like)
    torch.compiler.reset()
    if shape[0] == "ce":
        _, n, v = shape

        def inputs():
            return (torch.randn(n, v, device=dev, dtype=dtype) * 4,
                    torch.randint(0, v, (n,), device=dev))

        nbytes = {"fwd": n * v * size, "fwd+bwd": 2 * n * v * size}
        cases = [("cross_entropy", name, fn, inputs) for name, fn in ce_cases(machine)]
        rows = common.measure_cases(machine, cases, shape=f"{n}x{v}", nbytes=nbytes,
                                    modes=MODES, **where)
        if machine.is_cuda or quick:
            yield from rows
            return
        rows = list(rows)
        peaks = cpu_peak_rss_mb([name for _, name, _, _ in cases], n, v)
        for row in rows:
            if row["mode"] == "fwd+bwd":
                row["peak_mem_mb"] = peaks[row["backend"]]
                print(f"  peak memory of one fwd+bwd, {row['backend']}: "
                      f"{row['peak_mem_mb']:.0f} MB", flush=True)
            yield row
        return
    _, n, h, v = shape

    def inputs():
        return (torch.randn(n, h, device=dev, dtype=dtype),
                torch.randn(v, h, device=dev, dtype=dtype) / h**0.5,
                torch.randint(0, v, (n,), device=dev))

    flops = {"fwd": 2 * n * h * v, "fwd+bwd": 6 * n * h * v}
    cases = [("linear_cross_entropy", name, fn, inputs) for name, fn in lce_cases(machine)]
    for row in common.measure_cases(machine, cases, shape=f"{n}x{h}x{v}", flops=flops,
                                    modes=MODES, **where):
        if row.get("peak_mem_mb") is not None:
            # Live before the call: input and weight; the bound counts them and their
            # gradients, i.e. twice (n*h + v*h) elements.
            base_mb = (n * h + v * h) * size / 2**20
            row["mem_ratio"] = (base_mb + row["peak_mem_mb"]) / (2 * base_mb)
        yield row


def targets(rows, machine):
    def values(op, backend, mode, key, shape=None):
        return {f"{r['shape']} {r['mode']}": r[key] for r in rows
                if r["op"] == op and r["backend"] == backend and r["mode"] == mode
                and (shape is None or r["shape"] == shape) and r.get(key) is not None}

    if not machine.is_cuda:
        return [("cpu backend cross_entropy fwd+bwd >= 1.5x eager at 4096x32000 fp32",
                 values("cross_entropy", "cpu", "fwd+bwd", "ratio_vs_eager", TARGET_CE_CPU),
                 1.5)]
    ce = functools.partial(values, "cross_entropy", "auto", "fwd+bwd", shape=TARGET_CE_GPU)
    lce = functools.partial(values, "linear_cross_entropy", "auto", "fwd+bwd")
    return [
        ("cross_entropy fwd+bwd >= 85% of copy bandwidth at 16k x 128k (fraction)",
         ce("frac_of_ceiling"), 0.85),
        ("cross_entropy fwd+bwd >= 2x eager at 16k x 128k (x eager)", ce("ratio_vs_eager"), 2.0),
        ("cross_entropy fwd+bwd >= 1.2x torch.compile at 16k x 128k (x compile)",
         ce("ratio_vs_compile"), 1.2),
        ("linear_cross_entropy peak memory <= 1.2x (input + weight + grads) (multiple)",
         lce("mem_ratio"), 1.2, "at_most"),
        ("linear_cross_entropy time <= 1.1x eager (x eager, so >= 1/1.1)",
         lce("ratio_vs_eager"), 1 / 1.1),
    ]


def main(argv=None):
    args = common.parser_for(__doc__).parse_args(argv)
    machine, notes = common.start(
        ["shape is NxV (cross_entropy) or NxHxV (linear_cross_entropy); ratios are "
         "baseline_ms / ms (> 1: faster); backward with grad_output = 1",
         "GB/s: logits read once + gradient written once; linear_cross_entropy mem_ratio: "
         "(input + weight + peak extra) / (2 * (input + weight))"],
        f", liger={'yes' if _liger() else 'no'}")
    shapes = QUICK_SHAPES if args.quick else (GPU_SHAPES if machine.is_cuda else CPU_SHAPES)
    common.run_benchmark(FAMILY, machine, notes, shapes,
                         lambda shape: run_shape(machine, shape, args.quick),
                         lambda rows: targets(rows, machine), args.out, args.quick)


if __name__ == "__main__":
    main()
