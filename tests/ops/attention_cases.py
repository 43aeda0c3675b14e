"""pykernels.scaled_dot_product_attention's inputs for the generic op checks (checks.py):
option combinations, shapes and backends, the call and its independent reference, and the
helpers the op and module tests share.

References: torch.nn.functional.scaled_dot_product_attention for everything PyTorch defines
(a sliding window goes to it as the equivalent explicit mask, built here),
pykernels.reference for softcap. Triton runs on CPU tensors under TRITON_INTERPRET=1 and is
slow there: its cases are small and few (every value of every option once, where the cpu
backend gets every pair).
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from checks import BadInput, Case, OpCheck
from conftest import cpu_kernel_backends, pairwise
from torch.nn.attention import SDPBackend, sdpa_kernel

import pykernels
from pykernels import reference
from pykernels.ops import attention as attn_ops

CPU_BACKENDS = cpu_kernel_backends()
HAS_TRITON = "triton" in CPU_BACKENDS
INF = float("inf")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs the Triton interpreter")



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


def make_qkv(lead_q, lead_kv, L, S, E, Ev, *, dtype=torch.float64, device="cpu", seed=0,
             scale=1.0):
    """q (*lead_q, L, E), k (*lead_kv, S, E), v (*lead_kv, S, Ev): N(0, scale^2), drawn in
    float64 and rounded to ``dtype``."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device, dtype)

    return rand(*lead_q, L, E), rand(*lead_kv, S, E), rand(*lead_kv, S, Ev)


MASK_KINDS = ["none", "bool", "float", "bool_head", "float_head", "key_padding"]


def make_mask(kind, lead, L, S, *, dtype=torch.float64, device="cpu", seed=0):
    """None ('none'); a broadcast (L, S) mask ('bool', 'float'); a full (*lead, L, S) one
    ('bool_head', 'float_head'); or a bool key-padding mask (lead[0], 1, 1, S) (or (S,)) whose
    batch entries keep fewer and fewer of the first keys. Bool masks keep ~70% of the scores;
    float masks are N(0, 2^2) with ~10% -inf. Rows may end up fully masked (they must give 0)."""
    if kind == "none":
        return None
    g = torch.Generator().manual_seed(seed)
    if kind == "key_padding":
        batch = lead[0] if len(lead) >= 2 else 1
        keys = torch.arange(S)
        mask = torch.stack([keys < max(1, S - (b + 1) * S // (batch + 2))
                            for b in range(batch)])
        mask = mask.view(batch, *([1] * (len(lead) - 1)), 1, S) if len(lead) >= 2 else mask[0]
        return mask.to(device)
    shape = (L, S) if kind in ("bool", "float") else (*lead, L, S)
    if kind.startswith("bool"):
        return (torch.rand(shape, generator=g) > 0.3).to(device)
    mask = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    mask = mask.masked_fill(torch.rand(shape, generator=g) < 0.1, -INF)
    return mask.to(device, dtype)


def window_allowed(L, S, window, device="cpu"):
    """(L, S) bool: query i may attend key j iff i - left <= j <= i + right (None: no bound)."""
    left, right = window
    offset = torch.arange(S, device=device)[None, :] - torch.arange(L, device=device)[:, None]
    allowed = torch.ones(L, S, dtype=torch.bool, device=device)
    if left is not None:
        allowed &= offset >= -left
    if right is not None:
        allowed &= offset <= right
    return allowed


def torch_sdpa(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False,
               window=None, dropout_p=0.0):
    """F.scaled_dot_product_attention, a window handed over as the equivalent mask (with
    is_causal folded into it: F takes either a mask or is_causal)."""
    if window is not None:
        L, S = q.shape[-2], k.shape[-2]
        allowed = window_allowed(L, S, window, q.device)
        if is_causal:
            allowed &= torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
            is_causal = False
        if attn_mask is None:
            attn_mask = allowed
        elif attn_mask.dtype == torch.bool:
            attn_mask = attn_mask & allowed
        else:
            attn_mask = attn_mask.masked_fill(~allowed, -INF)
    # torch 2.13's fused CPU kernel returns NaN for is_causal with scale <= 0 when L > S;
    # the math backend (the plain composition) is right.
    math_only = scale is not None and scale <= 0
    with sdpa_kernel(SDPBackend.MATH) if math_only else contextlib.nullcontext():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                              dropout_p=dropout_p, is_causal=is_causal,
                                              scale=scale, enable_gqa=enable_gqa)


def expected_fn(opts):
    """The independent reference of a call with options ``opts`` (no dropout): F where it
    defines the case, pykernels.reference for softcap."""
    opts = {k: v for k, v in opts.items() if k != "backend"}
    if opts.get("softcap") is not None:
        return lambda q, k, v: reference.scaled_dot_product_attention(q, k, v, **opts)
    opts.pop("softcap", None)
    return lambda q, k, v: torch_sdpa(q, k, v, **opts)


def ours_fn(backend, opts):
    return lambda q, k, v: pykernels.scaled_dot_product_attention(q, k, v, backend=backend,
                                                                  **opts)




def valid_case(case):
    # F (and so the op) refuses is_causal together with an explicit mask.
    return not (case["causal"] and case["mask"] != "none")


def case_inputs(case, dtype=torch.float64, seed=0, device="cpu"):
    """(q, k, v, options) of a case dict."""
    L, S = case["lengths"]
    hq, hkv = case["heads"]
    E, Ev = case["dims"]
    batch = case.get("batch", (2,))
    q, k, v = make_qkv((*batch, hq), (*batch, hkv), L, S, E, Ev, dtype=dtype, device=device,
                       seed=seed)
    mask = make_mask(case["mask"], (*batch, hq), L, S, dtype=dtype, device=device,
                     seed=seed + 1)
    return q, k, v, dict(attn_mask=mask, **case_options(case))


def case_options(case):
    """The options of a case dict but the mask (which is an input)."""
    hq, hkv = case["heads"]
    return dict(is_causal=case["causal"], enable_gqa=hq != hkv, window=case["window"],
                softcap=case["softcap"], scale=case.get("scale"))


def case_id(case):
    L, S = case["lengths"]
    parts = [f"L{L}S{S}", "h{}x{}".format(*case["heads"]), "e{}x{}".format(*case["dims"]),
             case["mask"]]
    if case.get("batch", (2,)) != (2,):
        parts.append("b" + "x".join(map(str, case["batch"])))
    if case["causal"]:
        parts.append("causal")
    if case["window"] is not None:
        parts.append("w{}_{}".format(*case["window"]))
    if case["softcap"] is not None:
        parts.append(f"cap{case['softcap']}")
    if case.get("scale") is not None:
        parts.append(f"scale{case['scale']}")
    return "-".join(parts)


COMMON = {
    "mask": ["none", "bool", "float", "bool_head", "float_head"],
    "causal": [False, True],
    "heads": [(2, 2), (4, 2), (4, 1)],
    "window": [None, (3, 0), (2, 5), (None, 3)],
    "softcap": [None, 2.0],
}
# gradcheck: every pair of values for cpu (its 256-row tiles need L, S > 256 to meet); every
# value once for triton (16-row tiles under the interpreter; the cheap lengths first).
GRADCHECK_CPU = pairwise({"lengths": [(1, 17), (17, 17), (97, 33), (33, 97), (263, 300)],
                          **COMMON, "dims": [(8, 8), (8, 5)]}, valid_case)
GRADCHECK_TRITON = pairwise({"lengths": [(17, 17), (1, 17), (23, 20), (97, 5)],
                             **COMMON, "dims": [(8, 5), (4, 4)]}, valid_case, strength=1)
# float64 / float32 against the references: more values (key-padding masks, scale).
COMPARE_CPU = pairwise({"lengths": [(1, 300), (97, 97), (257, 280), (300, 97)],
                        **COMMON, "mask": MASK_KINDS, "dims": [(16, 16), (64, 40), (8, 96)],
                        "scale": [None, 0.37]}, valid_case)
COMPARE_TRITON = pairwise({"lengths": [(17, 33), (1, 17), (40, 23), (97, 16)], **COMMON,
                           "mask": MASK_KINDS, "dims": [(16, 16), (8, 24)],
                           "scale": [None, -0.6]}, valid_case, strength=1)



def op_inputs(backend, options, dtype=torch.float32, requires_grad=True, seed=32):
    """Arguments of pykernels::attention_forward for 4-D inputs (Z, H, L, E)."""
    gqa = options.get("gqa", False)
    Z, H, L, S = (1, 2, 13, 18) if backend == "triton" else (2, 4, 37, 29)
    q, k, v = make_qkv((Z, H), (Z, H // 2 if gqa else H), L, S, 8, 6, dtype=dtype, seed=seed)
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    mask = None
    if options.get("mask") == "bool":  # as the op layer passes it: 0 / -inf, broadcast view
        allowed = make_mask("bool", (Z, H), L, S, seed=seed)
        mask = torch.zeros((), dtype=dtype).masked_fill(~allowed, -INF).expand(Z, H, L, S)
    elif options.get("mask") == "float":
        mask = make_mask("float_head", (Z, H), L, S, dtype=dtype, seed=seed)
    left, right = options.get("window", (-1, -1))
    p = options.get("dropout_p", 0.0)
    rng = torch.tensor([1234567, 89], dtype=torch.int64) if p > 0 else None
    return (q, k, v, mask, 8**-0.5, options.get("causal", False), left, right,
            options.get("softcap", 0.0), p, rng)


OP_OPTIONS = {
    "plain": dict(),
    "bool_mask-window": dict(mask="bool", window=(5, 2)),
    "causal-gqa-dropout": dict(causal=True, gqa=True, dropout_p=0.25),
    "float_mask-softcap-window_left": dict(mask="float", softcap=3.0, window=(4, -1)),
}



# ---- what the generic checks run ------------------------------------------------------------

def attention_case(backend, case, inputs_seed, checks, **options):
    """A Case of scaled_dot_product_attention(q, k, v[, attn_mask]) with a case dict's
    options; ``inputs()`` gives (q, k, v[, mask]), q, k and v requiring grad."""
    opts = case_options(case)

    def inputs():
        q, k, v, rest = case_inputs(case, seed=inputs_seed)
        mask = rest["attn_mask"]
        return (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(),
                *(() if mask is None else (mask,)))

    return Case(id=f"{backend}-{case_id(case)}", inputs=inputs,
                ours=lambda q, k, v, mask=None: pykernels.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, backend=backend, **opts),
                reference=lambda q, k, v, mask=None: expected_fn(
                    {**opts, "attn_mask": mask})(q, k, v),
                checks=checks, tol=1e-10, atol=1e-12,
                names=("out", "grad_query", "grad_key", "grad_value"), **options)


def per_backend(cpu_cases, triton_cases, batch_for_triton=(1,)):
    """(backend, case, index): the triton cases with a batch of one (the interpreter is
    slow)."""
    return [(backend, {**case, "batch": batch_for_triton} if backend == "triton" else case, i)
            for backend in CPU_BACKENDS
            for i, case in enumerate(triton_cases if backend == "triton" else cpu_cases)]


def cases():
    out = []
    for backend, case, i in per_backend(GRADCHECK_CPU, GRADCHECK_TRITON):
        # Fast mode: random projections of the Jacobian (slow mode: test_attention.py's
        # test_gradcheck_float64_full_jacobian).
        out.append(attention_case(backend, case, i, ("gradcheck",), seed=i,
                                  gradcheck={"fast_mode": True}))
    for backend, case, i in per_backend(COMPARE_CPU, COMPARE_TRITON):
        out.append(attention_case(backend, case, i + 100, ("float64",)))
        # float32 under the interpreter: the first four triton cases.
        if backend != "triton" or i < 4:
            out.append(attention_case(backend, case, i + 200, ("float32",)))
    return out


def opchecks():
    forward, backward = (torch.ops.pykernels.attention_forward,
                         torch.ops.pykernels.attention_backward)
    out = []
    for backend in CPU_BACKENDS:
        for name in ["causal-gqa-dropout"] if backend == "triton" else OP_OPTIONS:
            out.append(OpCheck(f"forward-{backend}-{name}", forward,
                               lambda b=backend, n=name: (*op_inputs(b, OP_OPTIONS[n]), b)))
            if backend == "cpu":
                out.append(OpCheck(f"forward-nograd-{backend}-{name}", forward,
                                   lambda b=backend, n=name: (*op_inputs(
                                       b, OP_OPTIONS[n], requires_grad=False), b)))
            out.append(OpCheck(f"backward-{backend}-{name}", backward,
                               lambda b=backend, n=name: _backward_args(b, OP_OPTIONS[n])))
    return out


def _backward_args(backend, options):
    args = op_inputs(backend, options, requires_grad=False)
    q, k, v, mask, *rest = args
    out, lse = torch.ops.pykernels.attention_forward(*args, backend)
    grad_out = random_like(out.shape, seed=33).float()
    return (grad_out, q, k, v, out, lse, mask, *rest, backend)


def _no_kernel_runs(monkeypatch):
    def kernel_ran(name):
        raise AssertionError(f"the {name} kernels ran before the arguments were checked")

    monkeypatch.setattr(attn_ops, "_kernels", kernel_ran)


def _sdpa(*args, backend="cpu", **kwargs):
    return lambda: pykernels.scaled_dot_product_attention(*args, backend=backend, **kwargs)


def bad_inputs():
    """Each bad input raises a clear error naming the argument, before any kernel runs."""
    q, k, v = make_qkv((2, 4), (2, 4), 5, 6, 8, 8, dtype=torch.float32)
    bools = torch.ones(5, 6, dtype=torch.bool)
    table = [
        ("query_not_tensor", TypeError, "query must be a torch.Tensor", _sdpa(q.tolist(), k, v)),
        ("int_query", TypeError, "query must be a floating-point tensor", _sdpa(q.long(), k, v)),
        ("int_value", TypeError, "value must be a floating-point tensor", _sdpa(q, k, v.int())),
        ("query_1d", ValueError, r"query must have shape \(..., length, features\)",
         _sdpa(q[0, 0, 0], k, v)),
        ("mixed_dtypes", TypeError, "key has dtype torch.float64 but query has dtype "
                                    "torch.float32", _sdpa(q, k.double(), v)),
        ("value_dtype", TypeError, "value has dtype torch.float16 but query",
         _sdpa(q, k, v.half())),
        ("key_device", ValueError, "key is on meta but query is on cpu",
         _sdpa(q, k.to("meta"), v)),
        ("value_device", ValueError, "value is on meta but query is on cpu",
         _sdpa(q, k, v.to("meta"))),
        ("feature_mismatch", ValueError, "key must have query's feature size E = 8",
         _sdpa(q, k[..., :7], v)),
        ("no_features", ValueError, "key must have query's feature size E = 0 >= 1",
         _sdpa(q[..., :0], k[..., :0], v)),
        ("value_length", ValueError, "value must be .* with key's length S = 6",
         _sdpa(q, k, v[:, :, :5])),
        ("batch_mismatch", ValueError, "the batch dims of query .* do not broadcast",
         _sdpa(q, torch.cat([k, k[:1]]), v)),
        ("kv_heads_differ", ValueError, "key and value must have the same number of heads, "
                                        "got 2 and 4", _sdpa(q, k[:, :2], v)),
        ("heads_without_gqa", ValueError, "query has 4 heads but key/value have 2; pass "
                                          "enable_gqa=True", _sdpa(q, k[:, :2], v[:, :2])),
        ("gqa_not_divisible", ValueError, r"enable_gqa needs the query heads \(4\) to be a "
                                          r"multiple of the key/value heads \(3\)",
         _sdpa(q, k[:, :3], v[:, :3], enable_gqa=True)),
        ("gqa_no_kv_heads", ValueError, r"enable_gqa needs the query heads \(4\)",
         _sdpa(q, k[:, :0], v[:, :0], enable_gqa=True)),
        ("mask_not_tensor", TypeError, "attn_mask must be a torch.Tensor",
         _sdpa(q, k, v, attn_mask=[[True] * 6] * 5)),
        ("mask_int", TypeError, "attn_mask must be bool or query's dtype torch.float32, got "
                                "torch.int64",
         _sdpa(q, k, v, attn_mask=torch.ones(5, 6, dtype=torch.long))),
        ("mask_other_float", TypeError, "attn_mask must be bool or query's dtype "
                                        "torch.float32, got torch.float64",
         _sdpa(q, k, v, attn_mask=torch.zeros(5, 6, dtype=torch.float64))),
        ("mask_not_broadcast", ValueError, r"attn_mask of shape \(5, 5\) does not broadcast "
                                           r"to \(..., L, S\) = \(2, 4, 5, 6\)",
         _sdpa(q, k, v, attn_mask=torch.ones(5, 5, dtype=torch.bool))),
        ("mask_extra_dim", ValueError, r"attn_mask of shape \(3, 2, 4, 5, 6\) does not "
                                       r"broadcast",
         _sdpa(q, k, v, attn_mask=torch.ones(3, 2, 4, 5, 6, dtype=torch.bool))),
        ("mask_device", ValueError, "attn_mask is on meta but query is on cpu",
         _sdpa(q, k, v, attn_mask=bools.to("meta"))),
        ("causal_with_mask", ValueError, "pass either attn_mask or is_causal=True, not both",
         _sdpa(q, k, v, attn_mask=bools, is_causal=True)),
        ("dropout_negative", ValueError, r"dropout_p must be in \[0.0, 1.0\), got -0.1",
         _sdpa(q, k, v, dropout_p=-0.1)),
        ("dropout_one", ValueError, r"dropout_p must be in \[0.0, 1.0\), got 1.0",
         _sdpa(q, k, v, dropout_p=1.0)),
        ("dropout_nan", ValueError, r"dropout_p must be in \[0.0, 1.0\), got nan",
         _sdpa(q, k, v, dropout_p=float("nan"))),
        ("dropout_bool", TypeError, "dropout_p must be a real number, got True",
         _sdpa(q, k, v, dropout_p=True)),
        ("dropout_str", TypeError, "dropout_p must be a real number, got '0.1'",
         _sdpa(q, k, v, dropout_p="0.1")),
        ("scale_nan", ValueError, "scale must be a finite number, got nan",
         _sdpa(q, k, v, scale=float("nan"))),
        ("scale_str", TypeError, "scale must be a real number, got '0.5'",
         _sdpa(q, k, v, scale="0.5")),
        ("window_negative", ValueError, "window left must be an int >= 0, got -1",
         _sdpa(q, k, v, window=(-1, 0))),
        ("window_right_negative", ValueError, "window right must be an int >= 0, got -2",
         _sdpa(q, k, v, window=(0, -2))),
        ("window_length", ValueError, r"window must be a \(left, right\) pair, got "
                                      r"\(1, 2, 3\)", _sdpa(q, k, v, window=(1, 2, 3))),
        ("window_int", TypeError, r"window must be a \(left, right\) pair, got 3",
         _sdpa(q, k, v, window=3)),
        ("window_float", TypeError, "window left must be an int, got 1.5",
         _sdpa(q, k, v, window=(1.5, 0))),
        ("window_bool", TypeError, "window right must be an int, got True",
         _sdpa(q, k, v, window=(0, True))),
        ("softcap_zero", ValueError, r"softcap must be finite and in \(0.0, inf\), got 0.0",
         _sdpa(q, k, v, softcap=0.0)),
        ("softcap_negative", ValueError, r"softcap must be finite and in \(0.0, inf\), "
                                         r"got -1", _sdpa(q, k, v, softcap=-1)),
        ("softcap_inf", ValueError, r"softcap must be finite and in \(0.0, inf\), got inf",
         _sdpa(q, k, v, softcap=INF)),
        ("softcap_below_float32_triton", ValueError,
         r"backend 'triton' takes softcap in \[1.17549e-38, 3.40282e\+38\], got 1e-40",
         _sdpa(q.double(), k.double(), v.double(), softcap=1e-40, backend="triton")),
        ("head_dim_512_triton", ValueError, "backend 'triton' supports head dims up to 256, "
                                            "got 512; use backend 'cpu' or 'torch'",
         _sdpa(*make_qkv((1, 1), (1, 1), 3, 3, 512, 16, dtype=torch.float32),
               backend="triton")),
        ("value_dim_300_triton", ValueError, "backend 'triton' supports head dims up to 256, "
                                             "got 300",
         _sdpa(*make_qkv((1, 1), (1, 1), 3, 3, 16, 300, dtype=torch.float32),
               backend="triton")),
        ("backend_unknown", ValueError, "backend must be one of", _sdpa(q, k, v, backend="flash")),
        ("backend_unavailable", RuntimeError, "backend 'cuda' is not available for cpu tensors",
         _sdpa(q, k, v, backend="cuda")),
        ("backend_dtype", TypeError, "backend 'cpu' on cpu supports dtypes float32, float64",
         _sdpa(q.half(), k.half(), v.half())),
    ]
    return [BadInput(id, call, error, pattern, guard=_no_kernel_runs,
                     marks=(needs_triton,) if id.endswith("_triton") else ())
            for id, error, pattern, call in table]
