"""One small forward + backward call of every CUDA kernel of pykernels (backend="cuda"),
for compute-sanitizer: scripts/gpu_run.sh runs it under memcheck, which reports any
out-of-bounds or misaligned access. Shapes are odd and small so every tile edge and
mask is hit and the run stays short; each dtype is its own kernel instantiation
(tensor cores for fp16/bf16, exact FMA for fp32).
"""

import torch

import pykernels


def grads(out, *inputs):
    return torch.autograd.grad(out.float().square().sum(), inputs)


def main():
    dev = "cuda"
    torch.manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        def randn(*shape, dtype=dtype):
            return torch.randn(*shape, device=dev, dtype=dtype).requires_grad_()

        x, w, b = randn(37, 70), randn(45, 70), randn(45)
        grads(pykernels.linear_act(x, w, b, "gelu", backend="cuda"), x, w, b)

        logits = randn(29, 1003)
        target = torch.randint(0, 1003, (29,), device=dev)
        target[3] = -100  # an ignored row
        grads(pykernels.cross_entropy(logits, target, label_smoothing=0.1, backend="cuda"),
              logits)
        h, lw = randn(29, 70), randn(1003, 70)
        grads(pykernels.linear_cross_entropy(h, lw, target, chunk_size=16, backend="cuda"),
              h, lw)

        for e in (64, 80, 128, 256):
            q, k, v = randn(1, 4, 67, e), randn(1, 2, 93, e), randn(1, 2, 93, e)
            out = pykernels.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                         enable_gqa=True, backend="cuda")
            grads(out, q, k, v)
        torch.cuda.synchronize()
        print(f"cuda_calls: {dtype} done", flush=True)


if __name__ == "__main__":
    main()
