"""Command line: ``python -m pykernels {info,check,demo,bench}``."""

import argparse
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from .. import __version__
from ..backends import backends, extension, has_cuda, resolve, triton_interpreting


def info(out=print):
    """Versions, the device, whether pykernels._C has CUDA, and the backends."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    ext = extension()
    out(f"pykernels  {__version__}")
    out(f"python     {platform.python_version()}")
    out(f"torch      {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    out(f"triton     {triton_version}"
        + (" (interpreter: TRITON_INTERPRET=1)" if triton_interpreting() else ""))
    if torch.cuda.is_available():
        out(f"device     cuda: {torch.cuda.get_device_name()} "
            f"(sm_{''.join(map(str, torch.cuda.get_device_capability()))})")
    else:
        out(f"device     cpu ({platform.processor() or platform.machine()}), no CUDA device")
    out(f"_C         {'built' if ext else 'NOT built'}"
        + (f", CUDA kernels: {'yes' if has_cuda() else 'no'}" if ext else ""))
    out(f"backends   {', '.join(backends())}")
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        auto = resolve("auto", device, torch.float32)
        out(f"  {device:5s}    {', '.join(backends(device))} (auto for float32: {auto})")


# The benchmark families: bench/bench_<family>.py in the repository (not installed).
BENCH_FAMILIES = ("linear_act", "cross_entropy", "attention", "e2e")


class CommandError(Exception):
    """Bad command-line input: reported on one line, exit status 2."""


def bench(families, quick, out_dir):
    """Run each family's benchmark as ``python -m bench.bench_<family>`` from the repository
    root (bench/ is a top-level folder of the repository, not part of the package); 0 when
    all of them succeeded."""
    unknown = [f for f in families if f not in BENCH_FAMILIES]
    if unknown:
        raise CommandError(f"unknown benchmark {unknown[0]!r}; choose from "
                           f"{', '.join(BENCH_FAMILIES)}")
    root = Path(__file__).resolve().parents[2]  # pykernels/app/cli.py -> the checkout
    missing = [f for f in families if not (root / "bench" / f"bench_{f}.py").is_file()]
    if missing:
        raise CommandError(f"no bench/bench_{missing[0]}.py under {root}: the benchmarks live "
                           f"in the repository, run this from a checkout (pip install -e .)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(root), os.environ.get("PYTHONPATH")) if p)}
    failed = []
    for family in families:
        command = [sys.executable, "-m", f"bench.bench_{family}"]
        command += ["--quick"] * quick + (["--out", out_dir] if out_dir else [])
        print(f"== {' '.join(command[1:])}", flush=True)
        if subprocess.run(command, cwd=root, env=env).returncode != 0:
            failed.append(family)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pykernels", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, device, compiled kernels, backends")
    commands.add_parser("check", help="every fused op against PyTorch on every backend")
    from . import demo

    demo.add_arguments(commands.add_parser(
        "demo", help="check, train an MLP and a Transformer fused vs PyTorch, time, report",
        description=demo.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    bench_parser = commands.add_parser(
        "bench", help="run the benchmarks (bench/ of the repository)")
    # Checked by bench(), not by argparse's choices, which reject an empty list.
    bench_parser.add_argument("families", nargs="*", metavar="family",
                              help=f"any of {', '.join(BENCH_FAMILIES)} (default: all)")
    bench_parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    bench_parser.add_argument("--out", metavar="DIR",
                              help="results folder (default: bench/results)")
    args = parser.parse_args(argv)
    if args.command == "info":
        info()
        return 0
    if args.command == "check":
        from .check import all_passed, run_checks

        return 0 if all_passed(run_checks()) else 1
    from .data import DataError

    try:
        if args.command == "demo":
            return demo.run(args)
        return bench(args.families or list(BENCH_FAMILIES), args.quick, args.out)
    except (CommandError, demo.UsageError, DataError) as e:
        print(f"python -m pykernels {args.command}: error: {e}", file=sys.stderr)
        return 2

