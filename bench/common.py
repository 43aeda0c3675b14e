"""Shared machinery for every family's benchmark.

A benchmark builds *cases*: a function, a maker of fresh random inputs, and a mode
(``fwd``, ``bwd`` or ``fwd+bwd``). This module times a case (median, warmed up, rotating
through input sets larger than the cache), measures its peak memory, measures the
machine's own ceilings in the same run, and writes the rows as CSV, Markdown and, when
matplotlib is installed, a PNG bar plot. The CPU timing is pykernels.app.timing's
interleaved rounds, the demo's; so is the verdict on each target.
"""

import csv
import datetime
import itertools
import math
import re
import time
from pathlib import Path

import torch

from pykernels.app import timing

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODES = ("fwd", "bwd", "fwd+bwd")
COLUMNS = (
    "op", "backend", "shape", "dtype", "mode", "ms", "tflops", "gbps",
    "frac_of_ceiling", "frac_of_gemm", "ratio_vs_eager", "ratio_vs_compile",
    "peak_mem_mb", "mem_ratio", "device", "torch", "date",
)
# Rotation: on CUDA the input sets together span twice the L2 (so no timed call finds
# its inputs cache-hot); on CPU a size past the L2 and most last-level caches.
CPU_ROTATION_BYTES = 64 << 20
MAX_SETS = 8  # tiny shapes would otherwise need thousands of sets
CPU_INTERLEAVE_BYTES = 2 << 30  # input sets held at once by a group of interleaved CPU cases


class Machine:
    """Where the benchmark runs, and the names its results are filed under."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        self.name = torch.cuda.get_device_name(self.device) if self.is_cuda else "cpu"
        # H100 and H200 results must not overwrite each other: file them by GPU name.
        self.kind = re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")
        self.rotation_bytes = (
            2 * torch.cuda.get_device_properties(self.device).L2_cache_size
            if self.is_cuda else CPU_ROTATION_BYTES
        )
        self.stamp = {
            "device": self.name,
            "torch": torch.__version__,
            "date": datetime.date.today().isoformat(),
        }

    def sync(self):
        if self.is_cuda:
            torch.cuda.synchronize(self.device)


def _nbytes(tensors):
    unique = {id(t): t for t in tensors}  # fwd+bwd sets hold the inputs twice
    return sum(t.nbytes for t in unique.values())


def make_case(fn, make_inputs, mode, machine, grad_like=torch.randn_like):
    """Input sets and a call that runs ``fn`` in ``mode`` on one of them.

    ``make_inputs()`` returns a fresh tuple of random inputs (never zeros). For the
    backward modes every floating-point input requires grad and ``grad_out`` is
    ``grad_like(out)`` (random by default; a loss passes ones, as loss.backward() does);
    ``bwd`` runs the forward here, outside the timed region, and the call
    times ``torch.autograd.grad`` alone (the graph is retained for the next repeat).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")

    def one_set():
        inputs = make_inputs()
        if mode == "fwd":
            return (inputs,)
        for t in inputs:
            if t.is_floating_point():
                t.requires_grad_(True)
        diff = tuple(t for t in inputs if t.requires_grad)
        out = fn(*inputs)  # also warms up (and compiles) the training graph
        grad_out = grad_like(out)
        return (out if mode == "bwd" else inputs, diff, grad_out)

    if mode == "fwd":
        def call(s):
            with torch.no_grad():
                return fn(*s[0])
    elif mode == "bwd":
        def call(s):
            return torch.autograd.grad(s[0], s[1], s[2], retain_graph=True)
    else:
        def call(s):
            return torch.autograd.grad(fn(*s[0]), s[1], s[2])

    first = one_set()
    set_bytes = max(1, _nbytes(_leaves([first])))
    count = min(MAX_SETS, max(2, math.ceil(machine.rotation_bytes / set_bytes)))
    return call, [first] + [one_set() for _ in range(count - 1)]


def _rep_ms(quick):
    return 20 if quick else 100


def _warm_up(call, sets, quick):
    """A pass over the sets, and at least the warm-up time; the mean ms of one call."""
    warmup_ms = 5 if quick else 25
    rotation = itertools.cycle(sets)
    start, calls = time.perf_counter(), 0
    while calls < len(sets) or (time.perf_counter() - start) * 1e3 < warmup_ms:
        call(next(rotation))
        calls += 1
    return (time.perf_counter() - start) * 1e3 / calls


def time_ms(call, sets, machine, quick=False):
    """Median milliseconds of ``call(s)``, cycling ``s`` through ``sets``, after warm-up."""
    rotation = itertools.cycle(sets)
    if machine.is_cuda:
        import triton.testing  # CUDA events around each call; it also flushes L2 between calls

        return triton.testing.do_bench(
            lambda: call(next(rotation)), warmup=25 if not quick else 5, rep=_rep_ms(quick),
            return_mode="median"
        )
    estimate_ms = _warm_up(call, sets, quick)
    repeats = min(200, max(5, int(_rep_ms(quick) / max(estimate_ms, 1e-3))))
    times = timing.interleaved({"call": lambda: call(next(rotation))}, repeats)["call"]
    return timing.spread(times).median * 1e3


def peak_mem_mb(call, sets, machine):
    """Device memory one warm call allocates beyond what is already live (CUDA only)."""
    if not machine.is_cuda:
        return None
    machine.sync()
    torch.cuda.reset_peak_memory_stats(machine.device)
    base = torch.cuda.memory_allocated(machine.device)
    call(sets[0])
    machine.sync()
    return (torch.cuda.max_memory_allocated(machine.device) - base) / 2**20


def _row(machine, ms, peak_mb, *, op, backend, shape, dtype, mode, flops, nbytes):
    row = dict(
        op=op, backend=backend, shape=shape, dtype=str(dtype).replace("torch.", ""),
        mode=mode, ms=ms, peak_mem_mb=peak_mb, **machine.stamp,
    )
    if flops is not None:
        row["tflops"] = flops / ms / 1e9
    if nbytes is not None:
        row["gbps"] = nbytes / ms / 1e6
    return row


def measure(machine, fn, make_inputs, mode, *, op, backend, shape, dtype,
            flops=None, nbytes=None, quick=False, grad_like=torch.randn_like):
    """Time one case and return its row; ``flops``/``nbytes`` give TFLOP/s and GB/s."""
    call, sets = make_case(fn, make_inputs, mode, machine, grad_like)
    ms = time_ms(call, sets, machine, quick)
    return _row(machine, ms, peak_mem_mb(call, sets, machine), op=op, backend=backend,
                shape=shape, dtype=dtype, mode=mode, flops=flops, nbytes=nbytes)


def _failed(what, e):
    print(f"{what} FAILED {type(e).__name__}: {(str(e) or ' ').splitlines()[0]}")


def measure_cases(machine, cases, *, shape, dtype, flops=None, nbytes=None, quick=False,
                  grad_like=torch.randn_like, modes=MODES):
    """Yield a row for each ``(op, backend, fn, make_inputs)`` case in every mode, printed
    as it comes (a generator, so a run cut short keeps what it measured).

    ``flops`` and ``nbytes`` map each mode to its count. A case that raises is printed
    and left out: one failing backend must not cost the whole run. On CPU the cases of
    one call are timed in interleaved rounds (each case once per round, median per case):
    on a shared machine a slow phase then hits every case alike, where timing them one
    after another would charge it to whichever case ran then.
    """
    labels = [(op, backend, fn, make_inputs, mode, f"  {op:22} {backend:8} {shape:16} {mode:8}")
              for op, backend, fn, make_inputs in cases for mode in modes
              if backend != "compile" or _compile_here]

    def row_of(label, ms, peak_mb, rounds_s=None):
        op, backend, _, _, mode, what = label
        spread = rounds_s and timing.spread(rounds_s).scaled(1e3)
        print(f"{what} {ms:.4g} ms" + (f" ({timing.format_spread(spread, '{:.4g}')})"
                                       if spread else ""), flush=True)
        row = _row(machine, ms, peak_mb, op=op, backend=backend, shape=shape, dtype=dtype,
                   mode=mode, flops=(flops or {}).get(mode), nbytes=(nbytes or {}).get(mode))
        if rounds_s:
            row["rounds_s"] = rounds_s  # for the per-round ratios of fill_ratios
        return row

    if machine.is_cuda:
        for label in labels:
            _, _, fn, make_inputs, mode, what = label
            try:
                call, sets = make_case(fn, make_inputs, mode, machine, grad_like)
                ms = time_ms(call, sets, machine, quick)
                peak_mb = peak_mem_mb(call, sets, machine)
            except Exception as e:
                _failed(what, e)
                torch.cuda.empty_cache()  # after an out-of-memory error, above all
                continue
            yield row_of(label, ms, peak_mb)
        return

    # Cases are made and timed in groups whose input sets fit CPU_INTERLEAVE_BYTES (a case
    # bigger than that is a group of its own), so interleaving never multiplies the memory
    # of a large benchmark by its number of cases.
    group, group_bytes = [], 0  # group: [label, call, rotation, estimate_ms]
    for index, label in enumerate(labels):
        _, _, fn, make_inputs, mode, what = label
        try:
            call, sets = make_case(fn, make_inputs, mode, machine, grad_like)
            group.append([label, call, itertools.cycle(sets), _warm_up(call, sets, quick)])
            group_bytes += _nbytes(_leaves(sets))
        except Exception as e:
            _failed(what, e)
        if index + 1 == len(labels) or group_bytes >= CPU_INTERLEAVE_BYTES:
            yield from _time_interleaved(group, quick, row_of)
            group, group_bytes = [], 0


def _leaves(sets):
    return [t for s in sets for part in s for t in (part if isinstance(part, tuple) else (part,))
            if isinstance(t, torch.Tensor)]


def _time_interleaved(group, quick, row_of):
    """Rows for a group of made cases, timed once each per round, median per case."""
    if not group:
        return
    total_ms = sum(entry[3] for entry in group)
    rounds = min(200, max(7, int(_rep_ms(quick) * len(group) / max(total_ms, 1e-3))))
    calls = {index: (lambda call=call, rotation=rotation: call(next(rotation)))
             for index, (_, call, rotation, _) in enumerate(group)}
    samples = timing.interleaved(calls, rounds,
                                 on_error=lambda index, e: _failed(group[index][0][-1], e))
    for index, times in samples.items():
        yield row_of(group[index][0], timing.spread(times).median * 1e3, None, times)


def measure_ceilings(machine, quick=False):
    """Rows for the machine's own ceilings: a large matmul and a large copy.

    bf16 8192^3 on CUDA (the tensor-core rate), float32 on CPU; the copy counts bytes
    read plus bytes written.
    """
    dev = machine.device
    n = 1024 if quick else (8192 if machine.is_cuda else 2048)
    dtype = torch.bfloat16 if machine.is_cuda else torch.float32
    matmul = measure(
        machine, torch.matmul,
        lambda: tuple(torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2)), "fwd",
        op="ceiling_matmul", backend="torch", shape=f"{n}x{n}x{n}", dtype=dtype,
        flops=2 * n**3, quick=quick,
    )
    numel = (1 << 22) if quick else ((1 << 28) if machine.is_cuda else (1 << 25))
    copy = measure(
        machine, lambda src, dst: dst.copy_(src),
        lambda: tuple(torch.randn(numel, device=dev) for _ in range(2)), "fwd",
        op="ceiling_copy", backend="torch", shape=str(numel), dtype=torch.float32,
        nbytes=2 * 4 * numel, quick=quick,
    )
    return [matmul, copy]


def fill_ratios(rows, ceilings):
    """Add fraction-of-ceiling, fraction-of-GEMM and speed-up columns in place.

    ``frac_of_gemm`` compares with the row of op ``matmul`` (the bare GEMMs alone) of the
    same shape, dtype and mode; the ratios are baseline_ms / ms, so > 1 means faster. Rows
    timed in the same interleaved rounds get the median of the per-round ratios, carrying
    their spread (a Measured) for report_checks' verdict.
    """
    peak_tflops = next(r["tflops"] for r in ceilings if r["op"] == "ceiling_matmul")
    peak_gbps = next(r["gbps"] for r in ceilings if r["op"] == "ceiling_copy")
    by_key = {(r["op"], r["shape"], r["dtype"], r["mode"], r["backend"]): r for r in rows}
    for r in rows:
        if r.get("tflops") is not None:
            r["frac_of_ceiling"] = r["tflops"] / peak_tflops
        elif r.get("gbps") is not None:
            r["frac_of_ceiling"] = r["gbps"] / peak_gbps
        gemm = by_key.get(("matmul", r["shape"], r["dtype"], r["mode"], "gemm"))
        if gemm and r["op"] != "matmul" and r.get("tflops") is not None:
            r["frac_of_gemm"] = r["tflops"] / gemm["tflops"]
        for base in ("eager", "compile"):
            other = by_key.get((r["op"], r["shape"], r["dtype"], r["mode"], base))
            if not other:
                continue
            paired = len(other.get("rounds_s", ())) == len(r.get("rounds_s", ())) > 0
            r[f"ratio_vs_{base}"] = (Measured(timing.ratio(other["rounds_s"], r["rounds_s"]))
                                     if paired else other["ms"] / r["ms"])


class Measured(float):
    """A ratio's median that carries the spread of its rounds (a timing.Spread): the
    benchmarks' targets pick values out of the rows, and hand report_checks the spread
    with them."""

    def __new__(cls, spread):
        value = super().__new__(cls, spread.median)
        value.spread = spread
        return value


def _fmt(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


TABLE_COLUMNS = ("op", "shape", "mode", "backend", "ms", "tflops", "gbps", "frac_of_ceiling",
                 "frac_of_gemm", "ratio_vs_eager", "ratio_vs_compile", "peak_mem_mb",
                 "mem_ratio")


def format_table(rows, markdown=False):
    """The rows as an aligned text table, or a Markdown one; empty columns are left out."""
    cols = [c for c in TABLE_COLUMNS if any(r.get(c) is not None for r in rows)]
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True))
             for row in [cols] + cells]
    return "\n".join(lines)


def write_results(rows, family, machine, out_dir, notes=(), suffix=""):
    """Write ``<family>_<kind><suffix>.csv``, ``.md`` and ``.png`` under ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{family}_{machine.kind}{suffix}"
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({c: _fmt(r.get(c)) for c in COLUMNS} for r in rows)
    header = f"# {family} on {machine.name}\n\n" + "".join(f"- {n}\n" for n in notes)
    stem.with_suffix(".md").write_text(header + "\n" + format_table(rows, markdown=True) + "\n")
    written = [stem.with_suffix(".csv"), stem.with_suffix(".md")]
    if _plot(rows, family, machine, stem.with_suffix(".png")):
        written.append(stem.with_suffix(".png"))
    print("wrote " + ", ".join(str(p) for p in written))


def _plot(rows, family, machine, path):
    """One panel per mode, a group of bars per (op, shape), one bar per backend."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG plot")
        return False
    rows = [r for r in rows if not r["op"].startswith("ceiling_")]
    metric = "tflops" if all(r.get("tflops") is not None for r in rows) else "ms"
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(len(modes), 1, figsize=(12, 3.5 * len(modes)), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes, strict=True):
        sub = [r for r in rows if r["mode"] == mode]
        groups = list(dict.fromkeys(f"{r['op']}\n{r['shape']}" for r in sub))
        backends = list(dict.fromkeys(r["backend"] for r in sub))
        width = 0.8 / len(backends)
        for i, backend in enumerate(backends):
            values = {f"{r['op']}\n{r['shape']}": r[metric] for r in sub if r["backend"] == backend}
            xs = [g + i * width for g, name in enumerate(groups) if name in values]
            ax.bar(xs, [values[name] for name in groups if name in values], width, label=backend)
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, fontsize=7)
        ax.set_ylabel(metric)
        ax.set_title(f"{family} {mode} on {machine.name}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def report_checks(checks):
    """Print each target as PASS/FAIL/SKIP (never assert) and return the lines.

    ``checks`` holds (description, values, threshold) or (..., threshold, "at_most"): each
    value's verdict is timing.verdict's against the threshold (at least it, or at most), by
    its spread where it carries one (a Measured), else by the value alone; the check's is
    FAIL when any value's is, PASS when all are, "within noise" otherwise. SKIP when this
    run measured none (e.g. --quick shapes).
    """
    lines = []
    for description, values, threshold, *bound in checks:
        if not values:
            lines.append(f"SKIP  {description} (not measured in this run)")
            continue
        at_most = bound == ["at_most"]
        spreads = {label: getattr(v, "spread", None) or timing.Spread(v, v, v, 1)
                   for label, v in values.items()}
        verdicts = {timing.verdict(s, threshold, at_most) for s in spreads.values()}
        verdict = (timing.FAIL if timing.FAIL in verdicts
                   else timing.PASS if verdicts == {timing.PASS} else timing.NOISE)
        worst_label, worst = (max if at_most else min)(values.items(), key=lambda kv: kv[1])
        spread = spreads[worst_label]
        lines.append(f"{verdict}  {description}: worst {worst:.3g} at {worst_label}"
                     + (f" ({timing.format_spread(spread)})" if spread.rounds > 1 else ""))
    print("\n".join(lines))
    return lines


# A first contact with a GPU (scripts/gpu_run.sh) sets PYKERNELS_BENCH_SHAPES to the shapes
# its targets are checked at, "8192,1024,4096;8192,4096,16384" (a shape tuple's values
# joined by commas): they run first, in that order, and are the only ones with
# torch.compile cases (a compile per shape would eat the call); with
# PYKERNELS_BENCH_ONLY_LISTED=1 nothing else runs.
_compile_here = True  # whether measure_cases keeps the "compile" cases of this shape


def _listed_first(shapes):
    """(shapes in run order, the shapes that get torch.compile) under PYKERNELS_BENCH_SHAPES."""
    import os

    spec = os.environ.get("PYKERNELS_BENCH_SHAPES", "")
    if not spec:
        return list(shapes), set(shapes)
    by_key = {",".join(map(str, s)): s for s in shapes}
    listed = [by_key[k] for k in spec.split(";") if k in by_key]
    missing = [k for k in spec.split(";") if k not in by_key]
    if missing:
        print(f"PYKERNELS_BENCH_SHAPES: not shapes of this benchmark: {missing}")
    rest = [] if os.environ.get("PYKERNELS_BENCH_ONLY_LISTED") == "1" else [
        s for s in shapes if s not in listed]
    return listed + rest, set(listed)


def run_benchmark(family, machine, notes, shapes, run_shape, targets, out, quick):
    """The body every family's main shares: measure the ceilings (into the notes), then
    ``run_shape(shape)`` (a generator of rows) per shape; on the way out, even when stopped
    by ``timeout`` (SIGTERM), fill the ratios, print the table and the targets
    (``targets(rows)``) and write the results."""
    import signal
    import sys

    ceilings = measure_ceilings(machine, quick)
    for r in ceilings:
        rate = f"{r['tflops']:.4g} TFLOP/s" if r.get("tflops") else f"{r['gbps']:.4g} GB/s"
        notes.append(f"ceiling {r['op'].removeprefix('ceiling_')} {r['shape']} {r['dtype']}: "
                     f"{rate}")
    print("\n".join(notes))
    global _compile_here
    rows = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    shapes, compile_at = _listed_first(shapes)
    try:
        for shape in shapes:
            _compile_here = shape in compile_at
            for row in run_shape(shape):
                rows.append(row)
    finally:
        fill_ratios(rows, ceilings)
        print(format_table(rows))
        checks = report_checks(targets(rows))
        write_results(ceilings + rows, family, machine, out, notes + checks,
                      suffix="_quick" if quick else "")
    return rows


def parser_for(doc):
    """The argument parser every benchmark starts from: --quick and --out."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, seconds (smoke test)")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="results folder")
    return parser


def start(extra_notes=(), extra_print=""):
    """The machine of this run (the GPU if there is one) and the notes every results file
    opens with; prints what runs where."""
    import pykernels

    machine = Machine("cuda" if torch.cuda.is_available() else "cpu")
    print(f"pykernels {pykernels.__version__} on {machine.name}, torch {torch.__version__}, "
          f"backends {pykernels.backends(machine.device)}, has_cuda={pykernels.has_cuda()}"
          f"{extra_print}")
    notes = [f"pykernels {pykernels.__version__}, torch {torch.__version__}, "
             f"{machine.stamp['date']}", *extra_notes]
    if not machine.is_cuda:
        notes.append("torch.compile skipped on CPU")
    return machine, notes
