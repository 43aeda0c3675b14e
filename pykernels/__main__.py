"""Command line: ``python -m pykernels {info,check}``."""

import argparse
import platform
import sys

import torch

from . import __version__
from .backends import backends, extension, has_cuda, resolve, triton_interpreting


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


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pykernels", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, device, compiled kernels, backends")
    commands.add_parser("check", help="every fused op against PyTorch on every backend")
    args = parser.parse_args(argv)
    if args.command == "info":
        info()
        return 0
    from .check import run_checks

    return 0 if run_checks() else 1


if __name__ == "__main__":
    sys.exit(main())
