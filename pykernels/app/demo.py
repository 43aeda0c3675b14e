"""``python -m pykernels demo``: everything pykernels does, end to end, on this machine.

1. every fused op against PyTorch on every backend available here (``check``);
2. an MLP learns handwritten digits (scikit-learn's 8x8 set, or MNIST with ``--data``),
   fused and plain-PyTorch twins side by side from the same weights; target: >= 95% test
   accuracy;
3. a small causal Transformer learns to reverse digit sequences (attention must find the
   mirrored position), fused and plain side by side; target: >= 99% token accuracy on
   held-out sequences;
4. each op and one Transformer training step timed against eager PyTorch (and
   torch.compile on GPU), side by side in interleaved rounds of one run: the median
   speed-up, its interquartile range over the rounds, and PASS / FAIL / within noise
   against the target speed-up (``timing.py``: only a spread wholly below the target
   fails the demo);
5. ``report.json`` (every number, pass/fail, versions, device) and ``report.png`` (loss
   curves, speed-ups with their spread as error bars) in ``--out``.

Sizes: small enough on the CPU to finish in well under three minutes on two cores,
larger on a GPU (bf16 autocast there); ``--quick`` is a seconds-long smoke version.
"""

import argparse
import contextlib
import datetime
import json
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .. import __version__
from ..backends import BACKENDS, backends, resolve, use_backend
from .check import all_passed, run_checks
from .data import Reversal, load_digits, load_mnist
from .progress import Progress, heading
from .speed import time_ops, time_train_steps
from .timing import FAIL, NOISE, PASS
from .training import SideBySide

MLP_TARGET = 0.95
TRANSFORMER_TARGET = 0.99


class UsageError(ValueError):
    """Bad command-line input, found before any work starts."""


@dataclass(frozen=True)
class Sizes:
    """Everything the demo's size depends on."""

    mlp_hidden: tuple = (256, 128)
    mlp_epochs: int = 10
    mlp_batch: int = 32
    mlp_lr: float = 1e-3
    # the reversal task and its Transformer
    rev_length: int = 16
    rev_vocab: int = 16
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    tf_batch: int = 64
    tf_lr: float = 3e-3
    tf_max_steps: int = 1500
    tf_eval_every: int = 25
    tf_time_limit_s: float = 60.0  # a cap for a busy machine; the steps usually end first
    tf_val_size: int = 500  # early stopping looks at these
    tf_test_size: int = 2000  # the reported accuracy: sequences never used to decide
    # timings: op shapes and the Transformer whose training step is timed
    linear: tuple = (2048, 512, 512)
    cross_entropy: tuple = (2048, 8192)
    linear_cross_entropy: tuple = (2048, 256, 8192)
    attention: tuple = (2, 4, 256, 64)
    step_model: dict = field(default_factory=lambda: dict(
        vocab_size=2048, d_model=128, n_heads=4, n_layers=4, max_seq_len=128))
    step_batch: int = 16
    rounds: int = 5  # interleaved rounds per comparison, at least timing.MIN_ROUNDS
    round_block_s: float = 0.05  # each variant's block of calls in a round
    round_budget_s: float = 4.0  # per comparison: no rounds past MIN_ROUNDS on a busy machine
    # The speed-up over eager each op's timing is judged by (timing.py's verdict rule),
    # the benchmarks' floor for every op; None: no verdict (the quick sizes time Python's
    # overhead more than the kernels). The training step has no target here: its targets
    # are bench_e2e's, on GPU only (on CPU the step is dominated by unfused work).
    speed_target: float | None = 1.0


CPU = Sizes()
QUICK = replace(
    CPU, mlp_hidden=(128,), mlp_epochs=5, mlp_lr=2e-3, rev_length=5, rev_vocab=8, d_model=32,
    n_heads=2, tf_max_steps=400, tf_time_limit_s=25.0, tf_val_size=300,
    tf_test_size=500, linear=(256, 64, 64), cross_entropy=(256, 512),
    linear_cross_entropy=(256, 64, 512), attention=(1, 2, 64, 16),
    step_model=dict(vocab_size=128, d_model=32, n_heads=2, n_layers=2, max_seq_len=32),
    step_batch=4, round_block_s=0.01, round_budget_s=1.0, speed_target=None)
GPU = replace(
    CPU, mlp_hidden=(512, 256), mlp_epochs=20, d_model=128, tf_batch=128,
    tf_max_steps=3000, tf_eval_every=50, tf_time_limit_s=120.0, linear=(8192, 4096, 4096),
    cross_entropy=(16384, 32768), linear_cross_entropy=(8192, 1024, 50257),
    attention=(4, 16, 2048, 64),
    step_model=dict(vocab_size=32768, d_model=512, n_heads=8, n_layers=6, max_seq_len=1024),
    step_batch=8)


def add_arguments(parser):
    parser.add_argument("--quick", action="store_true",
                        help="a smoke version with tiny sizes (half a minute on 2 CPU cores)")
    parser.add_argument("--data", metavar="DIR",
                        help="train on MNIST from the four IDX files in DIR (plain or .gz) "
                             "instead of scikit-learn's bundled 8x8 digits")
    parser.add_argument("--out", metavar="DIR", default="pykernels-demo",
                        help="where report.json and report.png go (default: %(default)s)")
    parser.add_argument("--backend", default="auto",
                        help="backend of the fused models and timings (default: auto); "
                             "the check runs every backend regardless")
    parser.add_argument("--epochs", type=_positive_int, help="MLP epochs (default: by size)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and data")


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1; got {value}")
    return value


def _check_backend(name, device):
    usable = backends(device)
    if name != "auto" and name not in usable:
        why = "unknown backend" if name not in BACKENDS else f"backend not available on {device}"
        raise UsageError(f"--backend {name!r}: {why}; choose from auto, {', '.join(usable)}")
    return name


def _prepare_out(path):
    """Create ``path`` and prove it writable now, not after minutes of training."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UsageError(f"--out {path}: cannot write there ({e.strerror or e})") from None
    return path


@contextlib.contextmanager
def _small_work_threads(device):
    """One intra-op thread on the CPU for the check and the trainings: their tensors are
    small, so one thread is about as fast on an idle machine, and on a shared one it is
    several times faster (measured 3-4x on the 2-core machine under load: threads spin
    waiting for busy cores). The timings keep torch's default, as a user would run."""
    if device != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _twins(name, seed, device, **kwargs):
    """The fused model ``name`` and its plain-PyTorch twin, with the same weights."""
    from .. import models
    from ..models import reference

    torch.manual_seed(seed)
    fused = getattr(models, name)(**kwargs).to(device)
    plain = getattr(reference, name)(**kwargs).to(device)
    plain.load_state_dict(fused.state_dict())
    return {"fused": fused, "reference": plain}


def _fmt_side(values, fmt):
    return "  ".join(f"{name} {fmt(v)}" for name, v in values.items())


def _percent(x):
    return f"{100 * x:6.2f}%"


def train_mlp(data, sizes, device, seed, autocast_dtype, out=print):
    """Both MLPs, epoch by epoch on the same shuffled batches; the test accuracy after each
    epoch. Passed when the fused MLP's final test accuracy reaches MLP_TARGET."""
    out(f"{data.name}: {len(data.train_y)} train / {len(data.test_y)} test images of "
        f"{data.num_features} standardized pixels; MLP {data.num_features}-"
        f"{'-'.join(map(str, sizes.mlp_hidden))}-{data.num_classes}, relu, AdamW")
    twins = _twins("MLP", seed, device, in_features=data.num_features,
                   hidden_features=list(sizes.mlp_hidden), out_features=data.num_classes,
                   activation="relu")
    trainer = SideBySide(twins, lr=sizes.mlp_lr, autocast_dtype=autocast_dtype)
    train_x, train_y = data.train_x.to(device), data.train_y.to(device)
    test_x, test_y = data.test_x.to(device), data.test_y.to(device)
    generator = torch.Generator().manual_seed(seed)
    steps = -(-len(train_y) // sizes.mlp_batch)
    epochs = []
    for epoch in range(1, sizes.mlp_epochs + 1):
        order = torch.randperm(len(train_y), generator=generator).to(device)
        sums = dict.fromkeys(twins, 0.0)
        with Progress(steps, f"epoch {epoch:2d}/{sizes.mlp_epochs}") as bar:
            for start in range(0, len(order), sizes.mlp_batch):
                batch = order[start:start + sizes.mlp_batch]
                losses = trainer.step(train_x[batch], train_y[batch])
                for name, loss in losses.items():
                    sums[name] += loss
                bar.update(metrics=_fmt_side(losses, lambda v: f"loss {v:.4f}"))
        accuracy = {name: acc for name, (acc, _) in trainer.accuracy(test_x, test_y).items()}
        epochs.append({"epoch": epoch,
                       "train_loss": {name: s / steps for name, s in sums.items()},
                       "test_accuracy": accuracy})
        losses = _fmt_side(epochs[-1]["train_loss"], lambda v: f"{v:.4f}")
        out(f"epoch {epoch:2d}  train loss  {losses}   test accuracy  "
            f"{_fmt_side(accuracy, _percent)}")
    final = epochs[-1]["test_accuracy"]
    return {
        "dataset": data.name, "train_size": len(data.train_y), "test_size": len(data.test_y),
        "hidden": list(sizes.mlp_hidden), "batch_size": sizes.mlp_batch, "lr": sizes.mlp_lr,
        "epochs": epochs, "test_accuracy": final, "target": MLP_TARGET,
        "max_loss_gap": _max_gap(trainer.losses), "loss_curve": trainer.losses,
        "passed": final["fused"] >= MLP_TARGET,
    }


def _max_gap(losses):
    """The largest step-by-step difference between the fused and the reference loss."""
    return max(abs(a - b) for a, b in zip(losses["fused"], losses["reference"], strict=True))


def train_transformer(sizes, device, seed, autocast_dtype, out=print):
    """Both Transformers on the same fresh batches until both reach TRANSFORMER_TARGET on
    the validation sequences (or the step or time limit); then the accuracy on test
    sequences that played no part in stopping. Passed when the fused one reaches it."""
    task = Reversal(sizes.rev_length, sizes.rev_vocab)
    config = dict(vocab_size=task.vocab_size, d_model=sizes.d_model, n_heads=sizes.n_heads,
                  n_layers=sizes.n_layers, max_seq_len=task.seq_len)
    out(f"task: reverse {task.length} digits of {task.vocab} after a separator (loss and "
        f"accuracy on the answer only); causal Transformer {config}, batch {sizes.tf_batch}")
    twins = _twins("Transformer", seed, device, **config)
    trainer = SideBySide(twins, lr=sizes.tf_lr, autocast_dtype=autocast_dtype)
    # Three independent streams; a repeat of a training sequence in the held-out sets is
    # possible in principle but rare (vocab ** length sequences).
    train_gen, val_gen, test_gen = (torch.Generator().manual_seed(seed * 3 + i)
                                    for i in range(1, 4))
    val_x, val_y = (t.to(device) for t in task.batch(sizes.tf_val_size, val_gen))
    test_x, test_y = (t.to(device) for t in task.batch(sizes.tf_test_size, test_gen))
    evals, stop, start = [], "step limit", time.perf_counter()
    with Progress(sizes.tf_max_steps, "steps") as bar:
        for step in range(1, sizes.tf_max_steps + 1):
            x, y = task.batch(sizes.tf_batch, train_gen)
            losses = trainer.step(x.to(device), y.to(device))
            bar.update(metrics=_fmt_side(losses, lambda v: f"loss {v:.4f}"))
            if step % sizes.tf_eval_every == 0:
                accuracy = {name: tok for name, (tok, _) in trainer.accuracy(val_x, val_y).items()}
                evals.append({"step": step, "val_token_accuracy": accuracy})
                bar.metrics += "  val " + _fmt_side(accuracy, _percent)
                if min(accuracy.values()) >= TRANSFORMER_TARGET:
                    stop = "target reached on validation"
                    break
            if time.perf_counter() - start > sizes.tf_time_limit_s:
                stop = f"time limit ({sizes.tf_time_limit_s:.0f} s)"
                break
    seconds = time.perf_counter() - start
    test = trainer.accuracy(test_x, test_y)
    out(f"stopped after {step} steps, {seconds:.1f} s ({stop}); held-out test: "
        + "   ".join(f"{name} token {_percent(tok)} sequence {_percent(seq)}"
                     for name, (tok, seq) in test.items()))
    return {
        "task": {"name": "reversal", "length": task.length, "vocab": task.vocab,
                 "val_size": sizes.tf_val_size, "test_size": sizes.tf_test_size},
        "model": config, "batch_size": sizes.tf_batch, "lr": sizes.tf_lr, "steps": step,
        "seconds": seconds, "stopped_by": stop, "evals": evals,
        "test_token_accuracy": {name: tok for name, (tok, _) in test.items()},
        "test_sequence_accuracy": {name: seq for name, (_, seq) in test.items()},
        "target": TRANSFORMER_TARGET, "max_loss_gap": _max_gap(trainer.losses),
        "loss_curve": trainer.losses, "passed": test["fused"][0] >= TRANSFORMER_TARGET,
    }


def time_everything(sizes, device, dtype, backend, seed, out=print):
    """Op and training-step timings (fused vs eager, and torch.compile on GPU)."""
    sizes_by_op = {k: getattr(sizes, k)
                   for k in ("linear", "cross_entropy", "linear_cross_entropy", "attention")}
    target = ("" if sizes.speed_target is None
              else f"; target speed-up {sizes.speed_target:g}x vs eager")
    out(f"forward + backward, {str(dtype).replace('torch.', '')}, {sizes.rounds} interleaved "
        f"rounds; speed-up = eager ms / fused ms per round (> 1: faster), median and "
        f"interquartile range{target} (ops)")
    timing_args = dict(rounds=sizes.rounds, block_s=sizes.round_block_s,
                       budget_s=sizes.round_budget_s)
    ops = time_ops(sizes_by_op, device, dtype, backend, timing_args, sizes.speed_target, out)
    models = _twins("Transformer", seed, device, **sizes.step_model)
    models["eager"] = models.pop("reference")
    if torch.device(device).type == "cuda":
        compiled = _twins("Transformer", seed, device, **sizes.step_model)["reference"]
        models["compile"] = torch.compile(compiled)
    vocab, seq = sizes.step_model["vocab_size"], sizes.step_model["max_seq_len"]

    def batch():
        idx = torch.randint(0, vocab, (sizes.step_batch, seq + 1), device=device)
        return idx[:, :-1], idx[:, 1:]

    step = time_train_steps(models, batch, device, timing_args, None,
                            autocast_dtype=dtype if dtype != torch.float32 else None, out=out,
                            label="Transformer train step")
    step["model"] = sizes.step_model
    verdicts = [r["verdict"] for r in ops if "verdict" in r]
    return {"ops": ops, "train_step": step, "target": sizes.speed_target,
            "passed": FAIL not in verdicts}


def plot(report, path):
    """Loss curves of both trainings and the speed-ups, in one PNG; False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, key, title in ((axes[0], "mlp", "MLP on digits"),
                           (axes[1], "transformer", "Transformer, sequence reversal")):
        section = report[key]
        for name, losses in section["loss_curve"].items():
            ax.plot(range(1, len(losses) + 1), losses, label=name,
                    linestyle="-" if name == "fused" else "--", linewidth=1)
        accuracy = (section["test_accuracy"] if key == "mlp"
                    else section["test_token_accuracy"])["fused"]
        ax.set_yscale("log")
        ax.set(title=f"{title}\nfused test accuracy {100 * accuracy:.2f}%",
               xlabel="step", ylabel="training loss")
        ax.legend()
    rows = report["timings"]["ops"] + [report["timings"]["train_step"]]
    bases = [b for b in ("eager", "compile") if f"speedup_vs_{b}" in rows[0]]
    width = 0.8 / len(bases)
    for i, base in enumerate(bases):
        medians = [r[f"speedup_vs_{base}"] for r in rows]
        errors = [[m - r[f"speedup_vs_{base}_iqr"][0] for m, r in zip(medians, rows, strict=True)],
                  [r[f"speedup_vs_{base}_iqr"][1] - m for m, r in zip(medians, rows, strict=True)]]
        axes[2].bar([j + i * width for j in range(len(rows))], medians, width, yerr=errors,
                    capsize=3, label=f"vs {base}")
    axes[2].axhline(report["timings"]["target"] or 1.0, color="gray", linewidth=0.8)
    axes[2].set_xticks([j + width * (len(bases) - 1) / 2 for j in range(len(rows))],
                       [r["op"].replace("(", "\n(") for r in rows], fontsize=7, rotation=30)
    axes[2].set(title="fused speed-up, forward + backward\n(train step: forward, backward, "
                      "AdamW)\nmedian of the rounds, bars: interquartile range",
                ylabel="x (> 1: faster)")
    axes[2].legend()
    fig.suptitle(f"pykernels {__version__} demo on {report['device']['name']}, "
                 f"{report['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _speed_summary(timings):
    """The summary's line for the speed targets: FAIL when a verdict is FAIL, PASS when
    all are PASS, within noise otherwise (which does not fail the demo)."""
    if timings["target"] is None:
        return "----  speed: no target at these sizes (--quick)"
    verdicts = [r["verdict"] for r in timings["ops"]]
    overall = FAIL if FAIL in verdicts else PASS if set(verdicts) == {PASS} else NOISE
    counts = ", ".join(f"{verdicts.count(v)} {v}" for v in (PASS, NOISE, FAIL))
    return (f"{overall}  fused ops' speed-up >= {timings['target']:g}x eager, interquartile "
            f"range of the rounds ({counts})")


def _versions():
    import importlib.metadata

    versions = {"pykernels": __version__, "python": platform.python_version()}
    for dist in ("torch", "triton", "numpy", "scikit-learn", "matplotlib"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def run(args, out=print):
    """The demo; 0 when every check and target passed, 1 otherwise. Raises UsageError or
    data.DataError (bad input) before any work starts."""
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = _check_backend(args.backend, device)
    # standardized pixels: the MLP learns in a few epochs instead of a few dozen
    data = (load_mnist(args.data) if args.data else load_digits(args.seed)).standardized()
    out_dir = _prepare_out(args.out)
    sizes = QUICK if args.quick else (GPU if device == "cuda" else CPU)
    if args.epochs:
        sizes = replace(sizes, mlp_epochs=args.epochs)
    # Our kernels on GPU run the half types; float32 there goes to cuBLAS (backends.py).
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    autocast_dtype = dtype if device == "cuda" else None
    name = torch.cuda.get_device_name() if device == "cuda" else (
        f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
        f"1 for the check and the trainings)")
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(), "device": {"type": device, "name": name},
        "backend": {"requested": backend, "runs": resolve(backend, device, dtype)},
        "dtype": str(dtype).replace("torch.", ""), "quick": args.quick, "seed": args.seed,
        "sizes": asdict(sizes),
    }
    how = backend
    if backend == "auto" and device == "cpu":
        how = "auto: calls below an op's measured size crossover run the torch composition"
    out(f"pykernels {__version__} demo on {name}: fused models on backend "
        f"{report['backend']['runs']!r} ({how}), {report['dtype']}")

    seconds = report["seconds"] = {}
    clock = time.perf_counter()

    def lap(section):
        nonlocal clock
        seconds[section] = time.perf_counter() - clock
        clock = time.perf_counter()

    with use_backend(backend):
        with _small_work_threads(device):
            heading("1/4  every fused op against PyTorch, every backend", out)
            checks = run_checks(out)
            report["check"] = {"passed": all_passed(checks), "results": checks}
            lap("check")
            heading("2/4  MLP on handwritten digits, fused and plain PyTorch side by side",
                    out)
            report["mlp"] = train_mlp(data, sizes, device, args.seed, autocast_dtype, out)
            lap("mlp")
            heading("3/4  causal Transformer reversing sequences, fused and plain side by "
                    "side", out)
            report["transformer"] = train_transformer(sizes, device, args.seed,
                                                      autocast_dtype, out)
            lap("transformer")
        heading("4/4  speed: fused against eager PyTorch"
                + (" and torch.compile" if device == "cuda" else ""), out)
        report["timings"] = time_everything(sizes, device, dtype, backend, args.seed, out)
        lap("timings")
    report["passed"] = all(report[k]["passed"]
                           for k in ("check", "mlp", "transformer", "timings"))
    png = out_dir / "report.png"
    report["png"] = png.name if plot(report, png) else None
    lap("plot")
    report["wall_s"] = time.perf_counter() - started
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))

    heading("summary", out)
    mlp, tf = report["mlp"], report["transformer"]
    for verdict, what in (
            (report["check"]["passed"], f"{len(checks)} op checks against PyTorch"),
            (mlp["passed"], f"MLP test accuracy {_percent(mlp['test_accuracy']['fused'])} "
                            f">= {_percent(MLP_TARGET)}"),
            (tf["passed"], f"Transformer held-out token accuracy "
                           f"{_percent(tf['test_token_accuracy']['fused'])} >= "
                           f"{_percent(TRANSFORMER_TARGET)}")):
        out(f"{'PASS' if verdict else 'FAIL'}  {what}")
    out(_speed_summary(report["timings"]))
    out(f"wrote {out_dir / 'report.json'}"
        + (f" and {png}" if report["png"] else " (no PNG: matplotlib is not installed)")
        + f"; {report['wall_s']:.0f} s in all ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + ")")
    return 0 if report["passed"] else 1
