"""Host overhead of one pykernels call, and the speed of ``auto`` from tiny to large sizes,
on CPU tensors against eager PyTorch.

    python -m bench.bench_overhead [--quick] [--rounds R] [--calls N] [--out DIR]

Per op the same computation runs three ways, interleaved in every round: eager PyTorch (the
composition a user would write), pykernels with the default backend (``auto``, which on the
CPU sends calls below a measured crossover to the torch composition: pykernels.backends)
and pykernels with its fused C++ kernels forced (``backend="cpu"``); in the tiny-tensor
table also the forced kernels' call made to go through the dispatcher as under
torch.compile (``via dispatcher``: what ops/_route.py's eager way saves). Verdicts judge
``auto``, what a call gets by default; the forced kernels' ratios are printed beside it.

1. Tiny tensors, one thread: the kernels cost almost nothing, so a call's time is what the
   host spends around them (argument checks, backend resolution, custom-op dispatch,
   autograd bookkeeping, the small tensor ops an op issues besides its kernel). Two modes:
   the forward with inputs that require grad, and forward + backward
   (``torch.autograd.grad``: no ``.grad`` accumulation is timed). Printed: median
   microseconds per call, the ratio to eager (median of the per-round ratios and their
   interquartile range), a verdict against the target (at most 2x eager, by
   pykernels.app.timing's rule; for auto), and the operators one call dispatches (counted with a
   TorchDispatchMode, also inside a pykernels op's body: a proxy for the launches the
   call makes on a GPU) with the host synchronisations among them.
2. Size sweep (not with --quick), fwd+bwd, the machine's threads: the speed-up over eager
   of ``auto`` and of the forced kernels from the tiny size through the crossover to the
   large benchmark shape; ``auto`` must reach 0.95x eager at every size. Calls under 1 ms,
   whose rounds vary most on a shared machine, get three times the rounds.

Writes overhead_cpu.md; exits 1 when a verdict is FAIL.
"""

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import pykernels
from pykernels.app import timing
from pykernels.ops import _route

TARGET = 2.0  # pykernels' host time on tiny tensors at most this multiple of eager's
SWEEP_TARGET = 0.95  # auto's speed at every size at least this fraction of eager's


def _ops():
    """{op: (make_inputs(size, generator), {variant: fn}, sizes)}: fn(*inputs) returns the
    output to differentiate; the first size is the tiny one of the overhead table, the
    rest sweep through the CPU crossover up to the large benchmark shape."""

    def linear_inputs(size, g, glu=False):
        m, k, n = size
        return (torch.randn(m, k, generator=g), torch.randn(n * (1 + glu), k, generator=g)
                / k**0.5, torch.randn(n * (1 + glu), generator=g))

    def ce_inputs(size, g):
        n, v = size
        return torch.randn(n, v, generator=g), torch.randint(0, v, (n,), generator=g)

    def lce_inputs(size, g):
        n, d, v = size
        return (torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) / d**0.5,
                torch.randint(0, v, (n,), generator=g))

    def attn_inputs(size, g):
        return tuple(torch.randn(*size, generator=g) for _ in range(3))

    def eager_glu(x, w, b):
        gate, up = F.linear(x, w, b).chunk(2, dim=-1)
        return F.silu(gate) * up

    def variants(eager, auto, cpu):
        # Each variant is one lambda around one call, so that no variant pays for an extra
        # Python layer (keyword forwarding costs ~0.3 us of a 5 us call).
        return {"eager": eager, "pykernels": auto, "pykernels cpu": cpu}

    linear_sizes = [(8, 64, 64), (64, 128, 128), (256, 256, 256), (512, 256, 256),
                    (1024, 512, 512), (4096, 512, 512)]
    return {
        "linear_act(gelu)": (linear_inputs, variants(
            lambda x, w, b: F.gelu(F.linear(x, w, b)),
            lambda x, w, b: pykernels.linear_act(x, w, b, "gelu"),
            lambda x, w, b: pykernels.linear_act(x, w, b, "gelu", backend="cpu")),
            linear_sizes),
        "linear_glu(silu)": (lambda size, g: linear_inputs(size, g, glu=True), variants(
            eager_glu,
            lambda x, w, b: pykernels.linear_glu(x, w, b, "silu"),
            lambda x, w, b: pykernels.linear_glu(x, w, b, "silu", backend="cpu")),
            linear_sizes),
        "cross_entropy": (ce_inputs, variants(
            lambda x, t: F.cross_entropy(x, t),
            lambda x, t: pykernels.cross_entropy(x, t),
            lambda x, t: pykernels.cross_entropy(x, t, backend="cpu")),
            [(8, 64), (64, 512), (256, 4096), (512, 8192), (1024, 8192), (4096, 32000)]),
        "linear_cross_entropy": (lce_inputs, variants(
            lambda h, w, t: F.cross_entropy(F.linear(h, w), t),
            lambda h, w, t: pykernels.linear_cross_entropy(h, w, t),
            lambda h, w, t: pykernels.linear_cross_entropy(h, w, t, backend="cpu")),
            [(8, 64, 64), (64, 128, 512), (256, 256, 8192), (512, 256, 8192), (2048, 256, 8192)]),
        "attention(causal)": (attn_inputs, variants(
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            lambda q, k, v: pykernels.scaled_dot_product_attention(q, k, v, is_causal=True),
            lambda q, k, v: pykernels.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                   backend="cpu")),
            [(1, 2, 16, 16), (1, 2, 64, 32), (2, 4, 128, 64), (2, 4, 256, 64), (4, 8, 512, 64)]),
    }


def _step(fn, inputs, mode):
    """One call of ``fn`` in ``mode`` ("fwd" or "fwd+bwd") as a no-argument function."""
    leaves = [t.requires_grad_() if t.is_floating_point() else t for t in inputs]
    grad_leaves = [t for t in leaves if t.requires_grad]
    if mode == "fwd":
        return lambda: fn(*leaves)
    grad_out = torch.ones_like(fn(*leaves))

    def fwd_bwd():
        return torch.autograd.grad(fn(*leaves), grad_leaves, grad_out)
    return fwd_bwd


def _time(calls, rounds, n):
    """{name: [us per call, one entry per round]}, after a warm-up (caches, lazy imports)."""
    for call in calls.values():
        for _ in range(max(3, n // 10)):
            call()
    samples = timing.interleaved(calls, rounds, repeats=dict.fromkeys(calls, n))
    return {name: [t * 1e6 for t in times] for name, times in samples.items()}


# Operators that read device data on the host: each one is a synchronisation on a GPU.
_HOST_SYNCS = {"aten.is_nonzero", "aten.item", "aten._local_scalar_dense", "aten.equal"}


class _OpCounter(TorchDispatchMode):
    """Counts every operator dispatched, also those a pykernels op issues inside its own
    body (the small tensor ops around its kernel), by running the op's CPU implementation
    with this mode still active."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        if func.namespace == "pykernels":
            with self:
                return func.redispatch(_CPU_KEYS, *args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


_CPU_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


def count_ops(call):
    """The operators one call dispatches below autograd, with how often each."""
    with _OpCounter() as counter:
        call()
    return counter.ops


def _calls_per_round(call, seconds):
    start = time.perf_counter()
    call()
    return max(1, min(200, round(seconds / max(time.perf_counter() - start, 1e-7))))


DISPATCHER = "via dispatcher"


def _through_dispatcher(step):
    """``step`` with every pykernels op run through the dispatcher (the custom op), the way
    torch.compile and dispatch modes take, instead of ops/_route.py's eager way: the same
    kernels, so the difference is the dispatcher's host cost."""
    def call():
        plain = _route.is_plain
        _route.is_plain = lambda *args: False
        try:
            return step()
        finally:
            _route.is_plain = plain
    return call


def overhead(rounds, n, out=print):
    """The tiny-tensor table: host time per call in both modes, and the operators counted."""
    rows = []
    for op, (make_inputs, variants, sizes) in _ops().items():
        for mode in ("fwd", "fwd+bwd"):
            inputs = make_inputs(sizes[0], torch.Generator().manual_seed(0))
            calls = {name: _step(fn, inputs, mode) for name, fn in variants.items()}
            calls[DISPATCHER] = _through_dispatcher(calls["pykernels cpu"])
            times = _time(calls, rounds, n)
            for name in calls:
                ops = count_ops(calls[name])
                row = {"op": op, "size": "x".join(map(str, sizes[0])), "mode": mode,
                       "variant": name, "us": statistics.median(times[name]),
                       "aten_ops": sum(ops.values()),
                       "host_syncs": sum(ops[k] for k in _HOST_SYNCS),
                       "ops": " ".join(f"{k.removeprefix('aten.')}x{v}" if v > 1
                                       else k.removeprefix("aten.") for k, v in ops.items())}
                if name != "eager":
                    host = timing.ratio(times[name], times["eager"])
                    row.update(ratio=host.median, low=host.lo, high=host.hi,
                               verdict=(timing.verdict(host, TARGET, at_most=True)
                                        if name == "pykernels" else "-"))
                rows.append(row)
                out(_format_overhead(row))
    return rows


def _format_overhead(row):
    text = f"{row['op']:21s} {row['mode']:8s} {row['variant']:14s} {row['us']:8.1f} us"
    if "ratio" in row:
        text += (f"  {row['ratio']:5.2f}x [{row['low']:.2f}-{row['high']:.2f}]"
                 f" {row['verdict']:12s}")
    else:
        text += " " * 34
    return text + f"  {row['aten_ops']:2d} ops, {row['host_syncs']} syncs"


def sweep(rounds, out=print):
    """fwd+bwd speed against eager from the tiny size to the large benchmark shape."""
    rows = []
    for op, (make_inputs, variants, sizes) in _ops().items():
        for size in sizes:
            inputs = make_inputs(size, torch.Generator().manual_seed(0))
            calls = {name: _step(fn, inputs, "fwd+bwd") for name, fn in variants.items()}
            per_round = _calls_per_round(calls["eager"], 0.02)
            # Sub-millisecond calls vary most from round to round on a shared machine and
            # cost little: three times the rounds there.
            times = _time(calls, rounds * 3 if per_round > 20 else rounds, per_round)
            row = {"op": op, "size": "x".join(map(str, size)),
                   "eager_ms": statistics.median(times["eager"]) / 1e3}
            for name in variants:
                if name == "eager":
                    continue
                speedup = timing.ratio(times["eager"], times[name])
                row[name] = (statistics.median(times[name]) / 1e3, speedup)
            row["verdict"] = timing.verdict(row["pykernels"][1], SWEEP_TARGET)
            rows.append(row)
            out(_format_sweep(row))
    return rows


def _format_sweep(row):
    cells = [f"{row['op']:21s} {row['size']:>14s}  eager {row['eager_ms']:9.3f} ms"]
    for name in ("pykernels", "pykernels cpu"):
        ms, speedup = row[name]
        cells.append(f"{name} {ms:9.3f} ms {speedup.median:5.2f}x "
                     f"[{speedup.lo:.2f}-{speedup.hi:.2f}]")
    return "  ".join(cells) + f"  {row['verdict']}"


def write(overhead_rows, sweep_rows, out_dir, rounds, n):
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    lines = [f"# Host overhead and small shapes on CPU (torch {torch.__version__})", "",
             f"## Tiny tensors, one thread: {rounds} interleaved rounds of {n} calls", "",
             "Host time per call; `x eager` is pykernels' time over eager's, the median of "
             "the rounds' ratios (IQR); target at most "
             f"{TARGET}x. Operators: every ATen/pykernels operator one call dispatches, "
             "including those inside a pykernels op's body; syncs are the ones that read "
             "device data on the host.", "",
             "| op | size | mode | variant | us/call | x eager (IQR) | verdict | ops | "
             "syncs | operators |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in overhead_rows:
        ratio = f"{r['ratio']:.2f} ({r['low']:.2f}-{r['high']:.2f})" if "ratio" in r else ""
        lines.append(f"| {r['op']} | {r['size']} | {r['mode']} | {r['variant']} | "
                     f"{r['us']:.1f} | {ratio} | {r.get('verdict', '')} | {r['aten_ops']} | "
                     f"{r['host_syncs']} | {r['ops']} |")
    if sweep_rows:
        lines += ["", f"## Size sweep, fwd+bwd, {threads} threads, {rounds} interleaved "
                  f"rounds ({3 * rounds} for calls under 1 ms)", "",
                  "Speed-up = eager time / pykernels time (median of the rounds, "
                  f"IQR); `auto` (the default backend) must be at least {SWEEP_TARGET}x.",
                  "", "| op | size | eager ms | auto ms | auto speed-up | cpu kernels ms | "
                  "cpu speed-up | verdict |", "|---|---|---|---|---|---|---|---|"]
        for r in sweep_rows:
            cells = [f"{r['op']}", r["size"], f"{r['eager_ms']:.3f}"]
            for name in ("pykernels", "pykernels cpu"):
                ms, speedup = r[name]
                cells += [f"{ms:.3f}", f"{speedup.median:.2f} ({speedup.lo:.2f}-{speedup.hi:.2f})"]
            lines.append("| " + " | ".join(cells + [r["verdict"]]) + " |")
    (out_dir / "overhead_cpu.md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="5 rounds of 50 calls, no size sweep")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    rounds, n = (5, 50) if args.quick else (args.rounds, args.calls)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # host time of one call, not the thread pool's wake-ups
    overhead_rows = overhead(rounds, n)
    torch.set_num_threads(threads)
    sweep_rows = [] if args.quick else sweep(rounds)
    write(overhead_rows, sweep_rows, args.out, rounds, n)
    judged = [r for r in overhead_rows + sweep_rows if "verdict" in r]
    failed = [r for r in judged if r["verdict"] == "FAIL"]
    print(f"{len(failed)} of {len(judged)} cases FAIL "
          f"(host time over {TARGET}x eager, or auto under {SWEEP_TARGET}x eager's speed)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
