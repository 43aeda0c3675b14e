"""Drop-in torch.nn modules backed by the fused ops."""

from .linear import Linear

__all__ = ["Linear"]
