"""HuggingFace transformers end to end: one training step of a Llama-style model fused by
``pykernels.fuse`` against the same model unfused.

    python -m bench.bench_hf [--quick] [--out DIR]

transformers' LlamaForCausalLM built from a config (nothing downloaded); "fused" is a copy
given ``pykernels.fuse`` (pykernels attention, SwiGLU MLPs on linear_glu, the loss on
linear_cross_entropy without logits), "eager" the unfused model with transformers' default
attention ("sdpa"), both from the same weights and batches. A step: forward with labels,
backward, AdamW step, zero_grad. CPU: 4 layers, d_model 512, vocab 32000, 512 tokens,
batch 2, float32, the two models timed in interleaved rounds (bench.common). GPU: a
1B-class shape (16 layers, d_model 2048, 32 heads / 8 KV heads, SwiGLU 8192, vocab 128256,
batch 4 of 2048 tokens) with bf16 weights, run only where a GPU is present.

Reported: ms per step, tokens/s (in the notes), TFLOP/s (6 x tokens x linear weights, LM
head included, plus causal attention 3.5 x 2 x tokens x length x d_model per layer), and
the peak memory a step allocates beyond the weights and optimizer state (CUDA: the
allocator's peak; CPU: the rise of the process's peak resident set, VmHWM reset before the
step, over one step in a fresh process per model, so it includes allocator slack).
Targets, judged on the GPU only (the CPU run prints the ratios): fused >= 1.1x eager
tokens/s, peak memory <= 0.8x eager's.
Writes hf_<device>.csv/.md/.png.
"""

import copy
import itertools
import multiprocessing
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import pykernels
from bench import common
from bench.bench_e2e import fill_mem_ratios

FAMILY = "hf"
OP = "hf_train_step"
# (batch, length, d_model, heads, kv_heads, intermediate, layers, vocab)
GPU_SHAPES = [(4, 2048, 2048, 32, 8, 8192, 16, 128256)]
CPU_SHAPES = [(2, 512, 512, 8, 8, 1376, 4, 32000)]
QUICK_SHAPES = [(1, 32, 64, 4, 2, 96, 2, 512)]
INPUT_SETS = 2  # batches the timed steps rotate through


def step_flops(batch, length, d_model, heads, kv_heads, intermediate, layers, vocab):
    tokens = batch * length
    kv_dim = d_model // heads * kv_heads
    per_layer = 2 * d_model * d_model + 2 * d_model * kv_dim + 3 * d_model * intermediate
    attention = layers * 3.5 * 2 * tokens * length * d_model  # causal: half of 4·L·S·E
    return 6 * tokens * (layers * per_layer + vocab * d_model) + attention


def _model(shape, device, dtype, fused, seed=0):
    """The Llama-style model of ``shape`` (the same weights for one seed), fused or not."""
    import transformers

    _, length, d_model, heads, kv_heads, intermediate, layers, vocab = shape
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=d_model, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=length, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype)
    return pykernels.fuse(model) if fused else model


def _step_call(model):
    """call(batch): forward with labels, backward, AdamW step, zero_grad."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def call(ids):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return call


def _batches(shape, device):
    batch, length, *_, vocab = shape
    return [torch.randint(0, vocab, (batch, length), device=device) for _ in range(INPUT_SETS)]


def _status_mb(field):
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in MiB."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) / 1024


def _cpu_peak_child(shape, fused, result):
    """In a fresh process: the peak resident memory of one step beyond the memory held
    before it (weights, optimizer state from a first step)."""
    torch.set_num_threads(1)
    call = _step_call(_model(shape, "cpu", torch.float32, fused))
    ids = _batches(shape, "cpu")
    call(ids[0])
    before = _status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident set, to the current one (Linux >= 4.0)
    call(ids[1])
    result.put(_status_mb("VmHWM") - before)


def _cpu_peak_mb(shape, fused):
    context = multiprocessing.get_context("spawn")  # no fork of torch's thread pools
    result = context.Queue()
    child = context.Process(target=_cpu_peak_child, args=(shape, fused, result))
    child.start()
    peak = result.get()
    child.join()
    return peak


def run_shape(machine, shape, quick, notes):
    batch, length, d_model, heads, kv_heads, intermediate, layers, vocab = shape
    label = f"{batch}x{length} d{d_model} L{layers} V{vocab}"
    dtype = torch.bfloat16 if machine.is_cuda else torch.float32
    sets = _batches(shape, machine.device)
    flops = step_flops(*shape)
    eager = _model(shape, machine.device, dtype, fused=False)
    models = {"fused": pykernels.fuse(copy.deepcopy(eager)), "eager": eager}
    calls = {name: _step_call(model) for name, model in models.items()}

    def row_of(entry_label, ms, peak_mb):
        name = entry_label[0]
        tokens_per_s = batch * length / (ms / 1e3)
        notes.append(f"{name} {label}: {tokens_per_s:,.0f} tokens/s")
        print(f"  {OP} {name:6} {label} {ms:.4g} ms  {tokens_per_s:,.0f} tokens/s", flush=True)
        return dict(op=OP, backend=name, shape=label, dtype=str(dtype).replace("torch.", ""),
                    mode="fwd+bwd", ms=ms, tflops=flops / ms / 1e9, peak_mem_mb=peak_mb,
                    **machine.stamp)

    if machine.is_cuda:
        for name, call in calls.items():
            ms = common.time_ms(call, sets, machine, quick)
            yield row_of((name,), ms, common.peak_mem_mb(call, sets, machine))
        return
    group = [[(name,), call, itertools.cycle(sets), [], common._warm_up(call, sets, quick)]
             for name, call in calls.items()]
    for row in common._time_interleaved(group, quick, row_of):
        row["peak_mem_mb"] = _cpu_peak_mb(shape, row["backend"] == "fused")
        yield row


def targets(rows, machine):
    fill_mem_ratios(rows)
    if not machine.is_cuda:
        return []

    def fused(key):
        return {r["shape"]: r[key] for r in rows
                if r["backend"] == "fused" and r.get(key) is not None}

    return [("fused HF train step tokens/s >= 1.1x eager (x eager)",
             fused("ratio_vs_eager"), 1.1),
            ("fused peak memory <= 0.8x eager (multiple of eager)", fused("mem_ratio"), 0.8,
             "at_most")]


def main(argv=None):
    args = common.parser_for(__doc__).parse_args(argv)
    machine, notes = common.start([
        "one training step of transformers' LlamaForCausalLM: forward with labels, "
        "backward, AdamW; fused = pykernels.fuse(model), eager = the same model unfused "
        "(attn_implementation sdpa); ratios are eager_ms / ms; mem_ratio: peak memory "
        "beyond weights and optimizer state as a multiple of eager's"])
    if not machine.is_cuda:
        notes.append("CPU: float32, interleaved timing; peak memory = peak resident set "
                     "of one step in a fresh process; GPU targets not judged here")
    shapes = QUICK_SHAPES if args.quick else (GPU_SHAPES if machine.is_cuda else CPU_SHAPES)
    common.run_benchmark(FAMILY, machine, notes, shapes,
                         lambda shape: run_shape(machine, shape, args.quick, notes),
                         lambda rows: targets(rows, machine), args.out, args.quick)


if __name__ == "__main__":
    main()
