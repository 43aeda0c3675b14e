"""Triton kernels of pykernels (GPU, or CPU tensors under ``TRITON_INTERPRET=1``)."""
