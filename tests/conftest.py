"""Test set-up shared by every suite.

Without a CUDA device, Triton kernels run on CPU tensors under the interpreter; the
variable must be set before anything imports triton, so it is set here, first.
"""

import itertools
import os
import signal
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# The op families' inputs and references (tests/ops/<family>_cases.py, checks.py) serve the
# module and model tests too, whichever folder pytest collects first.
sys.path.insert(0, str(Path(__file__).parent / "ops"))

import pykernels  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def cpu_kernel_backends():
    """Kernel backends (not the torch reference) that run on CPU tensors here."""
    return [name for name in pykernels.backends("cpu") if name != "torch"]


def gpu_kernel_backends():
    if not torch.cuda.is_available():
        return ["cuda", "triton"]  # collected, then skipped by the cuda marker
    return [name for name in pykernels.backends("cuda") if name != "torch"]


def pairwise(factors, valid=lambda case: True, strength=2):
    """A few combinations of ``factors`` ({name: values}), each ``valid``, that together hold
    every pair of values of any two factors (strength 2), or every value of every factor
    (strength 1: the few cases for slow backends). Greedy and deterministic."""
    names = list(factors)
    candidates = [dict(zip(names, values, strict=True))
                  for values in itertools.product(*factors.values())]
    candidates = [c for c in candidates if valid(c)]

    def tuples(c):
        return {tuple((a, repr(c[a])) for a in group)
                for group in itertools.combinations(names, strength)}

    uncovered = set().union(*(tuples(c) for c in candidates))
    chosen = []
    while uncovered:
        best = max(candidates, key=lambda c: len(tuples(c) & uncovered))
        chosen.append(best)
        uncovered -= tuples(best)
    return chosen


@pytest.fixture
def cpu_backend_one_thread():
    """The cpu backend on one thread, for suites of tiny shapes (models, fuse): on a busy
    2-core machine a threaded tiny GEMM waits ~10x longer than it computes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pykernels.use_backend("cpu"):
            yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def auto_runs_kernels(monkeypatch):
    """"auto" on the CPU picks the fused kernels at every size (no crossover): for tests of
    what a fused path runs on small tensors."""
    backends = sys.modules["pykernels.backends"]
    monkeypatch.setattr(backends, "_CPU_KERNELS_FROM",
                        dict.fromkeys(backends.CPU_CROSSOVER["AVX2"], 0))


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    """Tests pick backends explicitly; a PYKERNELS_BACKEND from the shell must not leak in."""
    monkeypatch.delenv("PYKERNELS_BACKEND", raising=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """PYKERNELS_TEST_TIMEOUT=S fails a test whose call runs longer than S seconds.

    scripts/gpu_run.sh sets it, so that one hung or endlessly compiling test cannot eat the
    GPU call; pytest-timeout may be absent there and nothing can be installed. SIGALRM:
    a test blocked inside C code fails when control comes back to Python.
    """
    seconds = float(os.environ.get("PYKERNELS_TEST_TIMEOUT", "0"))
    if seconds <= 0:
        yield
        return

    def expire(signum, frame):
        pytest.fail(f"timed out after {seconds:g} s (PYKERNELS_TEST_TIMEOUT)", pytrace=False)

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
