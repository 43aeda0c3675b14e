"""Ahead-of-time compile of every pykernels Triton kernel for an NVIDIA GPU, on a CPU.

No GPU is needed: Triton's own compiler (front end, LLVM, the ptxas it bundles) runs on
the host. The real launch wrappers of pykernels/triton/ are called with meta tensors
(shapes, strides and dtypes, no memory) while ``JITFunction.run`` compiles instead of
launching and ``Autotuner.run`` hands every config that survives the kernel's own pruning
to it. So what is compiled is what a GPU would launch: the same argument specialisation,
constexprs, tiles, warps and stages.

For each compiled kernel it records registers and spills (the ptxas -v log) and shared
memory (Triton's metadata), and it fails (exit 1) on a compile error or on shared memory
over the target's per-block limit: no launch path may produce such a config.

    python scripts/triton_aot.py --arch 90 --out build/triton-aot-sm90.tsv
"""

import argparse
import contextlib
import io
import os
import re
import sys
import tempfile
import time
import traceback
import types

# Compile, never interpret: set before anything imports triton. A fresh cache, so that
# ptxas runs (and logs registers and spills) for every kernel.
os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-aot-")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# The shared memory one block may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SMEM_LIMIT = {80: 166912, 90: 232448}  # A100; H100 / H200
COLUMNS = ("arch", "kernel", "case", "config", "regs", "spill_st", "spill_ld", "smem",
           "status")


class Checker:
    """Compiles each launch for one target and keeps one row per distinct kernel."""

    def __init__(self, arch, out):
        self.arch = arch
        self.out = out  # rows are written as they come, so a cut run keeps what it did
        self.target = GPUTarget("cuda", arch, 32)
        self.backend = make_backend(self.target)
        self.case = ""
        self.rows = []
        self.seen = set()
        out.write("\t".join(COLUMNS) + "\n")
        triton.knobs.nvidia.dump_ptxas_log = True  # printed to stdout: captured per kernel

    def compile(self, fn, args, kwargs):
        # The steps of JITFunction.run up to the compile, without its driver calls.
        binder = create_function_from_signature(fn.signature, fn.params, self.backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(
            self.backend, kwargs, bound, specialization, options)
        key = (fn.__name__, repr(signature), repr(sorted(constexprs.items())), repr(attrs),
               repr(sorted(options.__dict__.items())))
        if key in self.seen:
            return
        self.seen.add(key)
        blocks = {k: v for k, v in bound.items() if k.startswith("BLOCK") or k == "ROWS"}
        config = " ".join(f"{k}={v}" for k, v in blocks.items())
        config += f" warps={options.num_warps} stages={options.num_stages}"
        row = dict(arch=f"sm_{self.arch}", kernel=fn.__name__, case=self.case, config=config,
                   regs="", spill_st="", spill_ld="", smem="", status="")
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):
                compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                          target=self.target, options=options.__dict__)
        except Exception as err:  # noqa: BLE001 - every compile failure is a finding
            # The innermost error says what (Triton chains one error per call level).
            while err.__cause__ is not None:
                err = err.__cause__
            lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
            row["status"] = ("FAIL compile: " + type(err).__name__ + ": "
                             + " ".join(lines[:1] + lines[1:][-2:]))[:400]
            self.add(row)
            return
        ptxas = log.getvalue()
        regs = re.search(r"Used (\d+) registers", ptxas)
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas)
        smem = compiled.metadata.shared
        row.update(regs=regs.group(1) if regs else "?",
                   spill_st=spills.group(1) if spills else "?",
                   spill_ld=spills.group(2) if spills else "?", smem=str(smem))
        if not (regs and spills):
            row["status"] = "FAIL no ptxas -v log"
        elif smem > SMEM_LIMIT[self.arch]:
            row["status"] = f"FAIL smem {smem} > {SMEM_LIMIT[self.arch]}"
        elif (int(spills.group(1)) or int(spills.group(2))):
            row["status"] = "spills"
        else:
            row["status"] = "ok"
        self.add(row)

    def add(self, row):
        self.rows.append(row)
        self.out.write("\t".join(str(row.get(c, "")) for c in COLUMNS) + "\n")
        self.out.flush()


def install(checker, arch):
    """Route every launch to the checker, and make torch.cuda describe the target."""

    def jit_run(self, *args, grid, warmup, **kwargs):
        checker.compile(self, args, kwargs)

    def autotune_run(self, *args, **kwargs):
        # Autotuner.run's own first steps: bind the arguments, prune the configs.
        self.nargs = dict(zip(self.arg_names, args, strict=False))
        for config in self.prune_configs(kwargs):
            self.fn.run(*args, **kwargs, **config.all_kwargs())

    JITFunction.run = jit_run
    Autotuner.run = autotune_run
    props = types.SimpleNamespace(shared_memory_per_block_optin=SMEM_LIMIT[arch],
                                  major=arch // 10, minor=arch % 10)
    torch.cuda.get_device_properties = lambda device=None: props
    torch.cuda.current_device = lambda: 0


def meta(*shape, dtype=torch.bfloat16):
    return torch.empty(shape, dtype=dtype, device="meta")


# The dtypes a GPU launch takes; float32 with and without TF32 (torch's allow_tf32).
DTYPES = {"bf16": (torch.bfloat16, False), "fp16": (torch.float16, False),
          "fp32": (torch.float32, False), "fp32-tf32": (torch.float32, True)}
# Compile time is what CI pays for (2 cores, both Triton versions, two targets), so every
# config is compiled in bf16 (the GPU dtype) and exact fp32 (the most registers); fp16
# differs from bf16 only in conversions, and TF32 from exact fp32 only in the MMA, so
# those run at fewer configs, which still compiles each code path once.
FULL, PARTIAL = ("bf16", "fp32"), ("fp16", "fp32-tf32")


def use(mode):
    dtype, tf32 = DTYPES[mode]
    torch.backends.cuda.matmul.allow_tf32 = tf32
    return dtype


@contextlib.contextmanager
def one_config():
    """Autotuned kernels at their first fitting config only (pykernels' own knob)."""
    os.environ["PYKERNELS_TRITON_AUTOTUNE"] = "0"
    try:
        yield
    finally:
        del os.environ["PYKERNELS_TRITON_AUTOTUNE"]


def linear_act_cases(checker):
    from pykernels.activations import ACTIVATION_IDS
    from pykernels.triton import linear_act as la

    M, K, N = 4096, 1024, 4096
    gelu = ACTIVATION_IDS["gelu"]

    def forward_and_backward(dt, act, saved_is_output=False):
        # Forward with bias and the pre-activation stored, then the backward: the dZ kernel,
        # the bias sum and the two GEMMs (other operand strides than the forward's).
        la.linear_act_forward(meta(M, K, dtype=dt), meta(N, K, dtype=dt), meta(N, dtype=dt),
                              act, 0.01, True)
        la.linear_act_backward(meta(M, N, dtype=dt), meta(M, K, dtype=dt), meta(N, K, dtype=dt),
                               meta(M, N, dtype=dt), act, 0.01, saved_is_output, True, True,
                               True)

    for mode in FULL + PARTIAL:
        checker.case = f"{mode} gelu"
        with one_config() if mode in PARTIAL else contextlib.nullcontext():
            forward_and_backward(use(mode), gelu)
    with one_config():  # every activation's forward and derivative code
        for name, act in ACTIVATION_IDS.items():
            checker.case = f"bf16 {name}"
            forward_and_backward(use("bf16"), act,
                                 name in ("relu", "sigmoid", "tanh", "leaky_relu"))


def linear_glu_cases(checker):
    from pykernels.activations import ACTIVATION_IDS
    from pykernels.triton import linear_glu as lg

    M, K, N = 4096, 1024, 4096
    for mode in FULL + PARTIAL:
        dt = use(mode)
        checker.case = f"{mode} silu+bias+preact"
        with one_config() if mode in PARTIAL else contextlib.nullcontext():
            lg.linear_glu_forward(meta(M, K, dtype=dt), meta(2 * N, K, dtype=dt),
                                  meta(2 * N, dtype=dt), ACTIVATION_IDS["silu"], 0.01, True)
        lg.linear_glu_grad_preact(meta(M, N, dtype=dt), meta(M, 2 * N, dtype=dt),
                                  ACTIVATION_IDS["silu"], 0.01, True)
    with one_config():
        for name, act in ACTIVATION_IDS.items():
            checker.case = f"bf16 {name}"
            dt = use("bf16")
            lg.linear_glu_forward(meta(M, K, dtype=dt), meta(2 * N, K, dtype=dt), None, act,
                                  0.01, False)
            lg.linear_glu_grad_preact(meta(M, N, dtype=dt), meta(M, 2 * N, dtype=dt), act,
                                      0.01, False)


def cross_entropy_cases(checker):
    from pykernels.triton import cross_entropy as ce

    for mode in ("bf16", "fp32", "fp16"):  # no tl.dot here: TF32 changes nothing
        dt = use(mode)
        # Every chunk width the rows config picks (C from 16 to 131072 classes), at the most
        # rows per tile (a large batch; fewer rows only shrink the tile), with every option
        # of the index-target path, then of the probability-target path; fp16 at one width.
        widths = [2 ** p for p in range(4, 13)] + [131072] if mode in FULL else [4096]
        for C in widths:
            A = 8192
            scale = meta(A, dtype=torch.float32)
            checker.case = f"{mode} C={C} index target, all options"
            ce.cross_entropy_rows(meta(A, C, 1, dtype=dt), meta(A, dtype=torch.int64),
                                  meta(C, dtype=torch.float32), -100, 0.1, 1e-4, 30.0,
                                  meta(A, C, 1, dtype=dt), scale)
            checker.case = f"{mode} C={C} probability target, all options"
            ce.cross_entropy_rows(meta(A, C, 1, dtype=dt), meta(A, C, 1, dtype=dt),
                                  meta(C, dtype=torch.float32), -100, 0.1, 1e-4, 30.0,
                                  meta(A, C, 1, dtype=dt), scale)
        checker.case = f"{mode} (N, C, d) rows along d"
        ce.cross_entropy_rows(meta(8, 21, 4096, dtype=dt), meta(8 * 4096, dtype=torch.int64),
                              None, -100, 0.0, 0.0, 0.0, meta(8, 21, 4096, dtype=dt),
                              meta(1, dtype=torch.float32))
        checker.case = f"{mode} scale grad"
        ce.cross_entropy_scale_grad_(meta(64, 4096, 1, dtype=dt), meta(64, dtype=torch.float32))


def attention_cases(checker):
    from pykernels.triton import attention as at

    Z, H, L = 2, 4, 1024

    def forward_and_backward(mode, E, has_mask):
        # The config depends on the head dim bucket, the element size and the mask; the
        # other options are all on, the heaviest code for that config.
        checker.case = f"{mode} E={E} mask={has_mask} causal window softcap dropout"
        dt = use(mode)
        q, k, v, o = (meta(Z, H, L, E, dtype=dt) for _ in range(4))
        mask = meta(Z, H, L, L, dtype=dt) if has_mask else None
        lse = meta(Z, H, L, dtype=torch.float32)
        args = (mask, E ** -0.5, True, 128, 0, 50.0, 0.1, 1234, 0)
        at.attention_forward(q, k, v, *args)
        at.attention_backward(o, q, k, v, o, lse, *args)

    for mode in FULL:
        # Head dims 64, 128, 256 are the three config buckets at their largest tiles
        # (16 and 32 use the 64 bucket's config, with smaller tiles).
        for E in (64, 128, 256):
            for has_mask in (False, True):
                forward_and_backward(mode, E, has_mask)
    forward_and_backward("bf16", 16, False)  # the smallest tl.dot depth
    for mode in PARTIAL:
        forward_and_backward(mode, 128, False)


FAMILIES = {"linear_act": linear_act_cases, "linear_glu": linear_glu_cases,
            "cross_entropy": cross_entropy_cases, "attention": attention_cases}


def uncovered(checker):
    """Launched kernels (named *_kernel, the convention of pykernels/triton/) of the
    modules of pykernels.triton that no case compiled: a new kernel needs a case here."""
    import importlib
    import pkgutil

    import pykernels.triton

    compiled = {row["kernel"] for row in checker.rows}
    missing = []
    for info in pkgutil.iter_modules(pykernels.triton.__path__):
        module = importlib.import_module(f"pykernels.triton.{info.name}")
        for name, obj in vars(module).items():
            fn = obj.fn if isinstance(obj, Autotuner) else obj
            if (isinstance(fn, JITFunction) and name.endswith("_kernel")
                    and fn.__module__ == module.__name__ and name not in compiled):
                missing.append(f"{info.name}.{name}")
    return missing


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, choices=sorted(SMEM_LIMIT), default=90)
    parser.add_argument("--out", required=True, help="TSV file of one row per kernel")
    parser.add_argument("families", nargs="*", default=list(FAMILIES))
    args = parser.parse_args(argv)

    with open(args.out, "w") as out:
        checker = Checker(args.arch, out)
        install(checker, args.arch)
        start = time.time()
        for family in args.families:
            try:
                FAMILIES[family](checker)
            except Exception:  # noqa: BLE001 - a launch wrapper that fails before compiling
                checker.add(dict(arch=f"sm_{args.arch}", kernel=family, case=checker.case,
                                 status="FAIL wrapper: " + " | ".join(
                                     traceback.format_exc(limit=4).splitlines())))
        if set(args.families) == set(FAMILIES):
            for kernel in uncovered(checker):
                checker.add(dict(arch=f"sm_{args.arch}", kernel=kernel,
                                 status="FAIL no case in scripts/triton_aot.py"))
    failed = [r for r in checker.rows if r["status"].startswith("FAIL")]
    spilled = [r for r in checker.rows if r["status"] == "spills"]
    print(f"triton_aot: triton {triton.__version__}, sm_{args.arch}: {len(checker.rows)} "
          f"kernels compiled in {time.time() - start:.0f} s, {len(spilled)} spill, "
          f"{len(failed)} failed; table in {args.out}")
    for r in failed:
        print(f"  {r['kernel']} [{r['case']}] {r['config']}: {r['status']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
