"""pykernels.scaled_dot_product_attention's helpers shared by the op and module tests."""

import torch

from pykernels.ops import attention as attn_ops


def random_like(shape, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device)


def spy_kernels(monkeypatch):
    """The names of the kernel sets the op fetches from now on (it still runs them)."""
    used = []
    original = attn_ops._kernels

    def spy(name):
        used.append(name)
        return original(name)

    monkeypatch.setattr(attn_ops, "_kernels", spy)
    return used
