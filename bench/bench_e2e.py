"""End-to-end benchmark: one Transformer training step (forward, backward, AdamW update).

    python -m bench.bench_e2e [--quick] [--out DIR]

pykernels.models.Transformer ("fused": linear+activation, attention and linear+cross-entropy
on the fused ops, backend "auto") against its plain-PyTorch twin
pykernels.models.reference.Transformer run eagerly ("eager") and, on GPU, under
torch.compile ("compile"); all three from the same weights, on the same random batches.
GPU: GPT-2 small (d_model 768, 12 heads, 12 layers, vocab 50257, tied head), batch 8 of
1024 tokens, bf16 autocast over fp32 weights. CPU: a scaled-down model in float32 (and a
smaller one with --quick); the GPU targets are not judged there, the ratios are printed.

Reported per step: ms, tokens/s (in the notes), TFLOP/s — 6 x tokens x (linear weights,
LM head included) for the GEMMs forward and backward, plus causal attention 3.5 x
2 x tokens x length x d_model per layer — and, on GPU, the peak
memory one step allocates beyond the weights and optimizer state already live.
Targets (GPU): fused >= 1.3x eager tokens/s, >= 1.0x torch.compile, peak memory <= 0.7x
eager. Writes e2e_<device>.csv/.md/.png.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import pykernels
from bench import common

FAMILY = "e2e"
OP = "train_step"
# (batch, length, d_model, n_heads, n_layers, vocab)
GPU_SHAPES = [(8, 1024, 768, 12, 12, 50257)]
CPU_SHAPES = [(4, 256, 256, 4, 4, 8192)]
QUICK_SHAPES = [(2, 32, 32, 2, 2, 256)]
INPUT_SETS = 2  # batches the timed steps rotate through


def step_flops(batch, length, d_model, n_layers, vocab):
    tokens = batch * length
    linear_weights = n_layers * 12 * d_model**2 + vocab * d_model  # qkv+out 4d², ff 8d²
    attention = n_layers * 3.5 * 2 * tokens * length * d_model  # causal: half of 4·L·S·E
    return 6 * tokens * linear_weights + attention


def _models(machine, config, seed=0):
    from pykernels.models import Transformer, reference

    torch.manual_seed(seed)
    fused = Transformer(**config).to(machine.device)
    eager = reference.Transformer(**config).to(machine.device)
    eager.load_state_dict(fused.state_dict())
    models = {"fused": fused, "eager": eager}
    if machine.is_cuda:
        compiled = reference.Transformer(**config).to(machine.device)
        compiled.load_state_dict(fused.state_dict())
        models["compile"] = torch.compile(compiled)
    return models


def _step_call(model, machine):
    """call(batch): zero_grad, forward with the loss, backward, AdamW step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    device_type = machine.device.type

    def call(batch):
        idx, targets = batch
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=machine.is_cuda):
            _, loss = model(idx, targets)
        loss.backward()
        optimizer.step()

    return call


def run_shape(machine, shape, quick, notes):
    batch, length, d_model, n_heads, n_layers, vocab = shape
    config = dict(vocab_size=vocab, d_model=d_model, n_heads=n_heads, n_layers=n_layers,
                  max_seq_len=length)
    label = f"{batch}x{length} d{d_model} L{n_layers} V{vocab}"
    dtype = "bf16-autocast" if machine.is_cuda else torch.float32
    sets = []
    for _ in range(INPUT_SETS):
        tokens = torch.randint(0, vocab, (batch, length + 1), device=machine.device)
        sets.append((tokens[:, :-1], tokens[:, 1:]))
    flops = step_flops(batch, length, d_model, n_layers, vocab)
    torch.compiler.reset()
    for name, model in _models(machine, config).items():
        what = f"  {OP:12} {name:8} {label:28}"
        try:
            call = _step_call(model, machine)
            ms = common.time_ms(call, sets, machine, quick)  # warm-up compiles
            peak = common.peak_mem_mb(call, sets, machine)
        except Exception as e:  # one failing variant must not cost the others
            print(f"{what} FAILED {type(e).__name__}: {(str(e) or ' ').splitlines()[0]}")
            if machine.is_cuda:
                torch.cuda.empty_cache()
            continue
        tokens_per_s = batch * length / (ms / 1e3)
        notes.append(f"{name} {label}: {tokens_per_s:,.0f} tokens/s")
        print(f"{what} {ms:.4g} ms  {tokens_per_s:,.0f} tokens/s", flush=True)
        yield dict(op=OP, backend=name, shape=label, dtype=str(dtype).replace("torch.", ""),
                   mode="fwd+bwd", ms=ms, tflops=flops / ms / 1e9, peak_mem_mb=peak,
                   **machine.stamp)


def fill_mem_ratios(rows):
    eager = {r["shape"]: r["peak_mem_mb"] for r in rows if r["backend"] == "eager"}
    for r in rows:
        if r.get("peak_mem_mb") is not None and eager.get(r["shape"]):
            r["mem_ratio"] = r["peak_mem_mb"] / eager[r["shape"]]


def targets(rows, machine):
    fill_mem_ratios(rows)
    if not machine.is_cuda:
        return []  # the targets are GPU targets; the CPU table shows the ratios

    def fused(key):
        return {r["shape"]: r[key] for r in rows
                if r["backend"] == "fused" and r.get(key) is not None}

    return [
        ("fused train step tokens/s >= 1.3x eager (x eager)", fused("ratio_vs_eager"), 1.3),
        ("fused train step tokens/s >= 1.0x torch.compile (x compile)",
         fused("ratio_vs_compile"), 1.0),
        ("fused peak memory <= 0.7x eager (multiple of eager)", fused("mem_ratio"), 0.7,
         "at_most"),
    ]


def main(argv=None):
    args = common.parser_for(__doc__).parse_args(argv)
    machine, notes = common.start([
        "one training step: zero_grad, forward + loss, backward, AdamW; ratios are "
        "baseline_ms / ms (> 1: faster, the same as the tokens/s ratio); mem_ratio: peak "
        "memory beyond weights and optimizer state, as a multiple of eager's"])
    notes.append(f"fused: pykernels.models, backend 'auto' (usable here: "
                 f"{', '.join(pykernels.backends(machine.device))})")
    if not machine.is_cuda:
        notes.append("CPU: scaled-down shape, float32; GPU targets not judged here")
    shapes = QUICK_SHAPES if args.quick else (GPU_SHAPES if machine.is_cuda else CPU_SHAPES)
    common.run_benchmark(FAMILY, machine, notes, shapes,
                         lambda shape: run_shape(machine, shape, args.quick, notes),
                         lambda rows: targets(rows, machine), args.out, args.quick)


if __name__ == "__main__":
    main()
