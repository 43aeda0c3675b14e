"""Which backends exist on this machine and which one runs a call.

Backends (docs/ARCHITECTURE.md, "Backends"):
  cpu     fused C++ kernels of pykernels._C, CPU tensors
  cuda    CUDA kernels of pykernels._C (when built with CUDA), CUDA tensors
  triton  pykernels.triton kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1
  torch   the plain-PyTorch composition (pykernels.reference; attention without mask,
          window or softcap runs F.scaled_dot_product_attention), any tensor

Selection, strongest first: a call's ``backend=``, the innermost ``use_backend(name)``,
the PYKERNELS_BACKEND environment variable, then "auto". "auto" takes the device, the
dtype and, on the CPU, the size of the call into account (CPU_CROSSOVER).
"""

import contextlib
import importlib
import importlib.util
import json
import os
import warnings
from pathlib import Path

import torch

BACKENDS = ("cpu", "cuda", "triton", "torch")

# The dtypes each backend's kernels take, per device type.
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_DTYPES = {
    ("cpu", "cpu"): (torch.float32, torch.float64),
    ("cuda", "cuda"): (torch.float32, torch.float16, torch.bfloat16),
    ("triton", "cuda"): (torch.float32, torch.float16, torch.bfloat16),
    # The interpreter runs on numpy: no bfloat16; float64 serves gradcheck.
    ("triton", "cpu"): (torch.float32, torch.float64),
    ("torch", "cpu"): _FLOAT_DTYPES,
    ("torch", "cuda"): _FLOAT_DTYPES,
}

# "auto": the first backend in this order that is available and takes the dtype (on the
# CPU, from the size given in CPU_CROSSOVER on; below it the torch composition).
# On CUDA "auto" picks only paths with evidence. Without GPU results, the half types go
# to triton (compiled for sm_90 in CI, numerics tested in the interpreter) and float32 to
# the torch composition (cuBLAS); the cuda kernels have never run on a GPU, so they are
# chosen only by backend="cuda" until a GPU run ranks them. A GPU run of
# scripts/gpu_run.sh writes bench/results/auto_order.json (bench/auto_order.py): the
# backends that passed their cuda-marked tests, fastest first; it replaces these orders.
_EVIDENCE_FREE_ORDER = {
    ("cpu", "float"): ("cpu", "torch"),
    ("cuda", "float32"): ("torch",),
    ("cuda", "half"): ("triton", "torch"),
}
AUTO_ORDER_FILE = Path(__file__).resolve().parent.parent / "bench" / "results" / "auto_order.json"

# On the CPU "auto" also weighs the size of a call: below a family's crossover the torch
# composition (eager's own operators) was measured faster, forward + backward, than the
# fused kernels (bench/bench_overhead.py's size sweep, bench/results/overhead_cpu.md): a
# call's fixed host cost outweighs what fusion saves on small tensors.
# Sizes: rows * in * out (linear families), rows * classes (cross_entropy),
# rows * hidden * vocab (linear_cross_entropy), batch * heads * L * S * head dim
# (attention). Keyed by torch's CPU capability, which also picks the kernels' own SIMD
# level; None: no size from which the kernels were measured faster on every machine of
# that capability measured. The linear families with AVX-512: 1.05-1.29x (linear_act,
# 4096x512x512) and 1.57x (linear_glu, 4096x1024x2x2816) eager on a Zen 4 EPYC, but
# 0.87-0.89x and 0.78-0.87x on an Intel Xeon (bench_linear_act, bench_linear_glu,
# 2026-12-02), so the composition on both; without AVX-512 (an AMD EPYC) linear_act 0.83-0.99x
# at every size, linear_glu 1.01-1.03x from 512x256x256. The other families' crossovers were
# measured without AVX-512 and hold on the Intel Xeon with it (bench_overhead's sweep).
# GPU calls keep the order above: their rule comes from GPU results.
CPU_CROSSOVER = {
    "AVX512": {"linear_act": None, "linear_glu": None, "cross_entropy": 1 << 23,
               "linear_cross_entropy": 1 << 30, "attention": 1 << 24},
    "AVX2": {"linear_act": None, "linear_glu": 1 << 25, "cross_entropy": 1 << 23,
             "linear_cross_entropy": 1 << 30, "attention": 1 << 24},
}
_CPU_CAPABILITY = torch.backends.cpu.get_cpu_capability()


def crossovers(capability):
    """{family: the size from which "auto" runs the cpu kernels}, for a CPU of torch's
    ``capability``; inf where they were never measured faster (and for capabilities
    without a table)."""
    table = CPU_CROSSOVER.get(capability, dict.fromkeys(CPU_CROSSOVER["AVX2"]))
    return {family: float("inf") if size is None else size for family, size in table.items()}


_CPU_KERNELS_FROM = crossovers(_CPU_CAPABILITY)


def load_auto_order(path=AUTO_ORDER_FILE):
    """The "auto" orders: the evidence-free ones, with those for CUDA that ``path`` (a JSON
    file of GPU results, {"order": {"cuda/half": [...], "cuda/float32": [...]}, ...}) gives.

    The torch composition always ends an order, as the fallback. A missing file means no
    GPU evidence; a malformed one is reported and ignored.
    """
    order = dict(_EVIDENCE_FREE_ORDER)
    try:
        with open(path) as f:
            measured = json.load(f)["order"]
        for key, names in measured.items():
            device_type, dtype_class = key.split("/")
            if (device_type, dtype_class) not in order or device_type != "cuda":
                raise ValueError(f"unknown key {key!r}")
            if not set(names) <= set(BACKENDS):
                raise ValueError(f"unknown backend in {names!r}")
            order[(device_type, dtype_class)] = (*(n for n in names if n != "torch"), "torch")
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        warnings.warn(f"pykernels: ignoring {path} ({err!r}); auto uses the evidence-free "
                      f"order", stacklevel=2)
        return dict(_EVIDENCE_FREE_ORDER)
    return order


_AUTO_ORDER = load_auto_order()

_stack = []  # use_backend's selections, innermost last

# PYKERNELS_BACKEND as os.environ keeps it: a membership test in os.environ's own mapping
# costs ~45 ns a call where os.environ.get costs ~1 us (it encodes the key each time);
# os.environ updates that mapping on every change, so a value set at run time is seen.
_ENV_NAME = "PYKERNELS_BACKEND"
_ENVIRON = os.environ._data
_ENV_KEY = os.environ.encodekey(_ENV_NAME)


def _import_extension():
    try:
        return importlib.import_module("pykernels._C")
    except ImportError:
        return None


# Looked up once at import, so that resolving a backend inside torch.compile only reads
# plain values (Dynamo does not trace imports).
_EXTENSION = _import_extension()
_TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None


def extension():
    """The compiled module pykernels._C, or None where it was not built."""
    return _EXTENSION


def kernel_extension(backend):
    """pykernels._C for a kernel backend that runs on it (cpu, cuda), or a RuntimeError
    naming the backend where it was not built."""
    if _EXTENSION is None:
        raise RuntimeError(f"backend {backend!r} needs pykernels._C, which is not built")
    return _EXTENSION


def has_cuda():
    """Whether pykernels._C was built with the CUDA kernels."""
    ext = extension()
    return ext is not None and ext.has_cuda()


def triton_interpreting():
    """Whether Triton kernels run on the CPU under its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _available(name, device_type):
    if name == "torch":
        return device_type in ("cpu", "cuda")
    if name == "cpu":
        return device_type == "cpu" and extension() is not None
    if name == "cuda":
        return device_type == "cuda" and has_cuda() and torch.cuda.is_available()
    if name == "triton":
        if not _TRITON_IMPORTABLE:
            return False
        if device_type == "cuda":
            return torch.cuda.is_available() and not triton_interpreting()
        return device_type == "cpu" and triton_interpreting()
    return False


def backends(device=None):
    """The backends usable here, for ``device`` (a torch.device or str) or for any device."""
    if device is not None:
        device_type = torch.device(device).type
        return [name for name in BACKENDS if _available(name, device_type)]
    device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [name for name in BACKENDS if any(_available(name, d) for d in device_types)]


def supports(name, device, dtype):
    """Whether backend ``name`` takes tensors of ``dtype`` on ``device`` (if available)."""
    return dtype in _DTYPES.get((name, torch.device(device).type), ())


def _check_name(name, what):
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"{what} must be one of auto, {', '.join(BACKENDS)}; got {name!r}")


@contextlib.contextmanager
def use_backend(name):
    """Run the pykernels calls inside the ``with`` block on backend ``name`` (or "auto")."""
    _check_name(name, "backend")
    _stack.append(name)
    try:
        yield name
    finally:
        _stack.pop()


def _requested(backend):
    if backend is not None:
        _check_name(backend, "backend")
        return backend
    if _stack:
        return _stack[-1]
    env = os.environ.get(_ENV_NAME) if _ENV_KEY in _ENVIRON else None
    if env:
        _check_name(env, _ENV_NAME)
        return env
    return "auto"


def default_is_auto(backend):
    """Whether a call's ``backend`` argument leaves the choice to "auto": None, outside
    every use_backend block, PYKERNELS_BACKEND unset: the shortcut's first test
    (pykernels/ops/_shortcut.py), a few attribute reads."""
    return backend is None and not _stack and _ENV_KEY not in _ENVIRON


def cpu_kernels_from(family):
    """The size of a call from which "auto" runs the cpu kernels of ``family`` on this
    machine (CPU_CROSSOVER); inf where they were never measured faster than eager."""
    return _CPU_KERNELS_FROM[family]


def _auto_key(device_type, dtype):
    if device_type == "cpu":
        return ("cpu", "float")
    return ("cuda", "float32" if dtype in (torch.float32, torch.float64) else "half")


def _auto(device_type, dtype, family, size):
    for candidate in _AUTO_ORDER.get(_auto_key(device_type, dtype), ("torch",)):
        if _available(candidate, device_type) and dtype in _DTYPES[(candidate, device_type)]:
            if candidate == "cpu" and family is not None and size < _CPU_KERNELS_FROM[family]:
                return "torch"
            return candidate
    return "torch"


def resolve(backend, device, dtype, family=None, size=0):
    """The backend that runs a call on tensors of ``device`` and ``dtype``; with
    ``family`` (a key of the CPU_CROSSOVER tables) and ``size``, "auto" on the CPU picks
    the torch composition below that family's crossover.

    Raises ValueError for an unknown name, RuntimeError for a backend not available for the
    device, TypeError for a dtype the backend does not take; each names what is.
    """
    name = _requested(backend)
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    if name == "auto":
        return _auto(device_type, dtype, family, size)
    if not _available(name, device_type):
        hint = ""
        if name == "triton" and device_type == "cpu":
            hint = " (Triton runs on CPU tensors only under TRITON_INTERPRET=1)"
        elif name in ("cpu", "cuda") and extension() is None:
            hint = " (pykernels._C is not built: pip install --no-build-isolation -e .)"
        raise RuntimeError(
            f"backend {name!r} is not available for {device_type} tensors{hint}; "
            f"available: {', '.join(backends(device_type))}"
        )
    supported = _DTYPES[(name, device_type)]
    if dtype not in supported:
        names = ", ".join(str(d).replace("torch.", "") for d in supported)
        raise TypeError(
            f"backend {name!r} on {device_type} supports dtypes {names}; got "
            f"{str(dtype).replace('torch.', '')} (backend='torch' takes any float dtype)"
        )
    return name
