"""Test set-up shared by every suite.

Without a CUDA device, Triton kernels run on CPU tensors under the interpreter; the
variable must be set before anything imports triton, so it is set here, first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

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


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    """Tests pick backends explicitly; a PYKERNELS_BACKEND from the shell must not leak in."""
    monkeypatch.delenv("PYKERNELS_BACKEND", raising=False)
