"""linear_cross_entropy's chunk algorithm and its chunk-size policy.

The loop runs over chunks of rows: logits_chunk = x_chunk @ W^T + b, the row kernel turns
them into their gradient in place, then grad_x_chunk = dlogits @ W and
grad_W += dlogits^T @ x_chunk (each GEMM accumulating in fp32; grad_W adds chunk by chunk in
W's dtype, as torch's own chunked linear_cross_entropy does on CUDA, so no (V, H) fp32 buffer
is held), grad_b += column sums in fp32. Peak extra memory is one (chunk, V) logits block.
"""

import torch

from ._cross_entropy_common import acc_dtype, check_targets, row_kernels, view3d

# CPU floor on the rows per chunk. Each chunk runs three ATen GEMMs, each one OpenMP
# parallel region that ends when its slowest thread does; beside another busy process a
# preempted thread holds every region up by about a scheduler slice (~10 ms measured, 2
# threads), so short GEMMs lose their parallel speedup and more: at N=2048, H=256, V=8192,
# fp32, 2 threads, 64-row chunks (96 regions) took 1.3-1.5 s against 0.5 s in one chunk and
# 0.65 s eager. GEMMs of at least 2^30 multiply-adds (512 rows there) run tens of ms each, so
# the slice is small beside them; they are also the fastest on one thread (K = 64 rows makes
# grad_W += dlogits^T x re-read and re-write all of grad_W for little work). The floor never
# grows a logits block past 2^24 elements (64 MiB in fp32), so small H keeps memory bounded.
_CPU_CHUNK_MIN_MACS = 1 << 30
_CPU_CHUNK_FLOOR_MAX_ELEMENTS = 1 << 24


def default_chunk_size(rows, in_features, num_classes, device_type="cuda"):
    """Rows per chunk: the (chunk, V) logits block about as large as the (N, H) input,
    and at least 64 rows so the GEMMs stay efficient; on the CPU (``device_type="cpu"``)
    at least enough rows for 2^30 multiply-adds per GEMM, capped at 2^24 logits."""
    classes = max(1, num_classes)
    chunk = max(64, -(-rows * in_features // classes))
    if device_type == "cpu":
        gemm_rows = -(-_CPU_CHUNK_MIN_MACS // (max(1, in_features) * classes))
        chunk = max(chunk, min(gemm_rows, _CPU_CHUNK_FLOOR_MAX_ELEMENTS // classes))
    return max(1, min(rows, chunk))


def chunk_loop(input, linear_weight, target, linear_bias, weight, ignore_index,
               label_smoothing, z_loss, softcap, chunk_size, backend, scale, grads):
    """The chunk loop of both linear_cross_entropy ops. Returns the (N,) row losses; with
    ``scale`` ((1,) or (N,)) also the gradients times it: (grad_input, grad_linear_weight,
    grad_linear_bias or None)."""
    rows_kernel, _ = row_kernels(backend)
    acc = acc_dtype(input.dtype)
    n, num_classes = input.shape[0], linear_weight.shape[0]
    class_weight = None if weight is None else weight.to(acc).contiguous()
    prob = target.is_floating_point()
    if not prob:
        check_targets(target, num_classes, ignore_index)
    loss_rows = torch.empty(n, dtype=acc, device=input.device)
    grad_input = grad_weight = grad_bias = None
    if grads:
        grad_input = torch.empty(input.shape, dtype=input.dtype, device=input.device)
        # contiguous whatever linear_weight's strides (e.g. a transposed view): the
        # in-place scaling views it flat
        grad_weight = torch.zeros(linear_weight.shape, dtype=linear_weight.dtype,
                                  device=linear_weight.device)
        if linear_bias is not None:
            grad_bias = torch.zeros(num_classes, dtype=acc, device=input.device)
    weight_t = linear_weight.t()
    for start in range(0, n, chunk_size):
        stop = min(n, start + chunk_size)
        x = input[start:stop]
        logits = (x @ weight_t if linear_bias is None
                  else torch.addmm(linear_bias, x, weight_t))
        logits3d = logits.view(stop - start, num_classes, 1)
        rows_target = (view3d(target[start:stop]) if prob
                       else target[start:stop].contiguous())
        chunk_scale = None
        if grads:
            chunk_scale = scale if scale.numel() == 1 else scale[start:stop].contiguous()
        loss_rows[start:stop] = rows_kernel(
            logits3d, rows_target, class_weight, ignore_index, label_smoothing, z_loss,
            softcap, logits3d if grads else None, chunk_scale)
        if grads:  # logits now hold dloss/dlogits of the chunk
            torch.mm(logits, linear_weight, out=grad_input[start:stop])
            grad_weight.addmm_(logits.t(), x)
            if grad_bias is not None:
                grad_bias += logits.sum(0, dtype=acc)
    if grads and grad_bias is not None:
        grad_bias = grad_bias.to(input.dtype)
    return loss_rows, (grad_input, grad_weight, grad_bias)
