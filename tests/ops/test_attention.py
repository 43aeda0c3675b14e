"""pykernels.scaled_dot_product_attention: every backend against plain PyTorch.

References are independent of the kernels: torch.nn.functional.scaled_dot_product_attention
for everything PyTorch defines (a sliding window goes to it as the equivalent explicit mask,
built in attention_cases.py), pykernels.reference for softcap, itself checked here against F
and against the formula written out. Exact references are float64; float32 and the half
types follow the low-precision rule of docs/ARCHITECTURE.md (pykernels.testing).

Dropout: the op draws (seed, offset) from torch's default generator per call, and the keep mask
D is a pure function of (seed, offset, z, h, i, j), shared by the cpu and triton backends
(Philox-4x32-10). The tests read D back exactly: with q = 0 every allowed score is 0, so with
v = I (Ev = S) out[z, h, i, j] = D_ij / (S (1 - p)) (``keep_mask``). Same seed, same D,
whatever q, k, v are: that gives exact statistics, the cpu/triton comparison, and the
forward/backward check against the composition (softmax(s) * D / (1 - p)) @ v in plain torch.

Gradcheck, float64 and float32 against the references, opcheck and bad inputs are the
generic checks of test_ops_generic.py, fed by attention_cases.py (which also holds the
references); this file holds the rest. Triton runs on CPU tensors under TRITON_INTERPRET=1
(tests/conftest.py) and is slow there: its cases are small and few.
"""

import contextlib
import importlib.util
import math
import os

import pytest
import torch
import torch.nn.functional as F
from attention_cases import (
    COMMON,
    COMPARE_CPU,
    COMPARE_TRITON,
    GRADCHECK_CPU,
    GRADCHECK_TRITON,
    case_id,
    case_inputs,
    expected_fn,
    make_mask,
    make_qkv,
    ours_fn,
    random_like,
    spy_kernels,
    torch_sdpa,
    valid_case,
    window_allowed,
)
from conftest import cpu_kernel_backends, gpu_kernel_backends
from torch.library import opcheck

import pykernels
from pykernels import reference
from pykernels.testing import assert_low_precision_close

CPU_BACKENDS = cpu_kernel_backends()
HAS_TRITON = "triton" in CPU_BACKENDS
INF = float("inf")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs the Triton interpreter")

# The interpreter evaluates masked-off lanes too (-inf - -inf, exp of inf) and numpy warns.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


# ---- helpers ----------------------------------------------------------------------------


def out_and_grads(fn, q, k, v, grad_out):
    """(out, dq, dk, dv) of fn(q, k, v) at fresh leaf copies, backpropagating grad_out."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return (out.detach(), *grads)


NAMES = ("out", "grad_query", "grad_key", "grad_value")


def assert_all_close(actual, expected, what, rtol=1e-10, atol=1e-12):
    for name, a, e in zip(NAMES, actual, expected, strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype, f"{what} {name}"
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m, n=name:
                                   f"{what} {n}: {m}")


def assert_rule(ours, plain, exact, what, factor=2.0):
    """The low-precision rule on (out, dq, dk, dv), and no NaN/inf anywhere."""
    for name, a, p, e in zip(NAMES, ours, plain, exact, strict=True):
        assert a.dtype == p.dtype and a.shape == e.shape, f"{what} {name}"
        assert torch.isfinite(a).all(), f"{what} {name} has NaN/inf"
        assert_low_precision_close(a, p, e, name=f"{what} {name}", factor=factor)


# ---- option combinations ----------------------------------------------------------------

def test_backends_and_cases():
    assert "cpu" in CPU_BACKENDS
    if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton"):
        assert HAS_TRITON  # the triton tests below must not silently vanish
    for cases in (GRADCHECK_CPU, GRADCHECK_TRITON, COMPARE_CPU, COMPARE_TRITON):
        for name, values in COMMON.items():
            if name != "mask":
                assert {repr(c[name]) for c in cases} == {repr(v) for v in values}, name
        assert {c["mask"] for c in cases} >= set(COMMON["mask"])
        assert all(valid_case(c) for c in cases)
    for cases in (GRADCHECK_CPU, GRADCHECK_TRITON):
        assert {1, 17, 97} <= {n for c in cases for n in c["lengths"]}  # the lengths
        assert any(L != S for L, S in (c["lengths"] for c in cases))
        assert any(E != Ev for E, Ev in (c["dims"] for c in cases))
    # The triton sets stay small: the interpreter costs seconds per gradcheck.
    assert len(GRADCHECK_TRITON) <= 6 and len(COMPARE_TRITON) <= 7


@pytest.mark.parametrize("options", [dict(is_causal=True, enable_gqa=True),
                                     dict(window=(1, 2), softcap=1.5, enable_gqa=True)],
                         ids=["causal-gqa", "window-softcap-gqa"])
def test_gradcheck_float64_full_jacobian(options):
    """Slow mode (every column of the Jacobian) on a tiny case, as a check on fast mode (cpu
    only: under the interpreter the 130 forward calls take many seconds)."""
    backend = "cpu"
    q, k, v = make_qkv((1, 2), (1, 1), 5, 7, 3, 2, seed=3)
    inputs = tuple(t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(ours_fn(backend, options), inputs)


# ---- the reference --------------------------------------------------------------------------

@pytest.mark.parametrize("case, seed", [
    pytest.param(case, i + 100, id=case_id(case)) for i, case in enumerate(COMPARE_CPU)
    if case["softcap"] is None])
def test_reference_equals_torch(case, seed):
    """pykernels.reference agrees with F where F defines the case (test_ops_generic compares
    every backend with F there, and with the reference for softcap)."""
    q, k, v, opts = case_inputs(case, seed=seed)
    grad_out = random_like(q.shape[:-1] + v.shape[-1:], seed=seed)
    ref = out_and_grads(lambda q, k, v: reference.scaled_dot_product_attention(
        q, k, v, **opts), q, k, v, grad_out)
    assert_all_close(ref, out_and_grads(expected_fn(opts), q, k, v, grad_out),
                     f"reference {case_id(case)}")



@pytest.mark.parametrize("lengths, heads, dims, options", [
    ((1025, 1025), (2, 2), (64, 64), dict(is_causal=True)),
    ((517, 800), (4, 1), (128, 80), dict(window=(300, 40), softcap=20.0)),
    ((777, 333), (4, 2), (32, 32), dict(mask="float_head")),
], ids=["1025-causal", "517x800-mqa-window-softcap", "777x333-gqa-float-mask"])
def test_cpu_float32_larger_shapes(lengths, heads, dims, options):
    """Several 256-row tiles, bands that skip whole tiles, a 4-fold GQA sum (float32: the
    rule of docs/ARCHITECTURE.md)."""
    options = dict(options)
    L, S = lengths
    q, k, v = make_qkv((1, heads[0]), (1, heads[1]), L, S, *dims, dtype=torch.float32,
                       seed=L, scale=1.5)
    mask = make_mask(options.pop("mask", "none"), (1, heads[0]), L, S, dtype=torch.float32)
    opts = dict(attn_mask=mask, enable_gqa=heads[0] != heads[1], **options)
    grad_out = random_like(q.shape[:-1] + v.shape[-1:], seed=L)
    ours = out_and_grads(ours_fn("cpu", opts), q, k, v, grad_out)
    plain = out_and_grads(expected_fn(opts), q, k, v, grad_out)
    exact_opts = {**opts, "attn_mask": None if mask is None else mask.double()}
    exact = out_and_grads(expected_fn(exact_opts), q.double(), k.double(), v.double(),
                          grad_out)
    assert_rule(ours, plain, exact, f"cpu {L}x{S}")


def test_reference_softcap_and_window_written_out():
    """pykernels.reference (the softcap reference above) against the definitions: a huge
    softcap is no softcap (F), and softcap against softmax(c tanh(s / c) + mask) @ v written
    with einsum; windows against F with the window as a mask."""
    q, k, v = make_qkv((2, 4), (2, 2), 9, 13, 6, 5, seed=7, scale=2.0)
    mask = make_mask("float_head", (2, 4), 9, 13, seed=8)
    torch.testing.assert_close(
        reference.scaled_dot_product_attention(q, k, v, mask, softcap=1e9, enable_gqa=True),
        F.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True), rtol=1e-12,
        atol=1e-12)
    cap, scale = 1.7, 0.45
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = cap * torch.tanh(torch.einsum("zhie,zhje->zhij", q, kk) * scale / cap) + mask
    p = torch.exp(s - s.amax(-1, keepdim=True))
    p = p / p.sum(-1, keepdim=True)
    expected = torch.einsum("zhij,zhjd->zhid", p, vv)
    torch.testing.assert_close(reference.scaled_dot_product_attention(
        q, k, v, mask, scale=scale, enable_gqa=True, softcap=cap), expected, rtol=1e-12,
        atol=1e-12)
    for window in [(0, 0), (3, 0), (None, 2), (4, None), (20, 20)]:
        for causal in (False, True):
            torch.testing.assert_close(
                reference.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                       enable_gqa=True, window=window),
                torch_sdpa(q, k, v, is_causal=causal, enable_gqa=True, window=window),
                rtol=1e-12, atol=1e-12)


# ---- shapes, layouts, arguments -----------------------------------------------------------

def backend_params(cpu, triton):
    """(backend, arg) params: each of ``cpu`` on cpu, the fewer ``triton`` on triton."""
    return [pytest.param(b, a, id=f"{b}-{a}") for b in CPU_BACKENDS
            for a in (triton if b == "triton" else cpu)]


@pytest.mark.parametrize("backend, rank", backend_params([2, 3, 5], [2, 5]))
def test_input_ranks_match_torch(backend, rank):
    """(L, E) and (H, L, E) inputs, and extra batch dims (B1, B2, H, L, E), each with a mask
    broadcast over the leading dims."""
    lead = {2: (), 3: (3,), 5: (2, 3, 2) if backend == "cpu" else (2, 1, 2)}[rank]
    q, k, v = make_qkv(lead, lead, 19, 11, 8, 6, seed=rank)
    mask = make_mask("float_head", lead[-1:], 19, 11, seed=rank)  # (L, S) or (H, L, S)
    grad_out = random_like(q.shape[:-1] + (6,), seed=rank)
    for opts in (dict(), dict(attn_mask=mask), dict(is_causal=True, window=(2, None))):
        ours = out_and_grads(ours_fn(backend, opts), q, k, v, grad_out)
        exact = out_and_grads(expected_fn(opts), q, k, v, grad_out)
        assert ours[0].shape == (*lead, 19, 6)
        assert_all_close(ours, exact, f"{backend} rank {rank} {list(opts)}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_five_dim_gqa_and_mask_broadcast_over_extra_batch_dims(backend):
    b2 = 3 if backend == "cpu" else 2
    q, k, v = make_qkv((2, b2, 4), (2, b2, 2), 7, 9, 8, 8, seed=5)
    grad_out = random_like(q.shape, seed=5)
    masks = [make_mask("key_padding", (2, b2, 4), 7, 9),               # (2, 1, 1, 1, 9)
             torch.rand(b2, 1, 7, 9, generator=torch.Generator().manual_seed(1)) > 0.4,
             torch.randn(9, dtype=torch.float64)]                       # (S,)
    for mask in masks[:2] if backend == "triton" else masks:
        opts = dict(attn_mask=mask, enable_gqa=True)
        assert_all_close(out_and_grads(ours_fn(backend, opts), q, k, v, grad_out),
                         out_and_grads(expected_fn(opts), q, k, v, grad_out),
                         f"{backend} mask {tuple(mask.shape)}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs(backend):
    """q, k, v transposed from (B, L, H, E) as attention layers make them, a key with a
    strided length, a value with a strided feature dim, a transposed mask and a transposed
    grad_out."""
    g = torch.Generator().manual_seed(9)
    B, H, L, S, E, Ev = (2, 3, 21, 18, 8, 5) if backend == "cpu" else (2, 2, 17, 9, 8, 5)

    def rand(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64)

    q = rand(B, L, H, E).transpose(1, 2)
    k = rand(B, 2 * S, H, E).transpose(1, 2)[:, :, ::2]
    v = rand(B, H, S, 2 * Ev)[..., ::2]
    mask = (torch.rand(S, L, generator=g) > 0.25).t()
    fmask = rand(B, S, H, L).permute(0, 2, 3, 1)
    grad_out = rand(B, L, H, Ev).transpose(1, 2)
    assert not any(t.is_contiguous() for t in (q, k, v, mask, fmask, grad_out))
    options = [dict(attn_mask=mask), dict(attn_mask=fmask, window=(4, 1)),
               dict(is_causal=True, softcap=3.0), dict()]
    for opts in options[:2] if backend == "triton" else options:
        assert_all_close(out_and_grads(ours_fn(backend, opts), q, k, v, grad_out),
                         out_and_grads(expected_fn(opts), q, k, v, grad_out),
                         f"{backend} non-contiguous {list(opts)}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 2, 5, 7), (2, 2, 0, 7), (2, 2, 5, 0)],
                         ids=["no_batch", "no_queries", "no_keys"])
def test_empty_inputs(backend, shape):
    """Empty tensors are valid: no keys gives 0, like F."""
    Z, H, L, S = shape
    q, k, v = make_qkv((Z, H), (Z, H), L, S, 4, 3, seed=1)
    grad_out = random_like((Z, H, L, 3))
    for opts in (dict(), dict(is_causal=True), dict(window=(1, 1), softcap=2.0)):
        ours = out_and_grads(ours_fn(backend, opts), q, k, v, grad_out)
        exact = out_and_grads(expected_fn(opts), q, k, v, grad_out)
        assert_all_close(ours, exact, f"{backend} empty {shape}")
        assert not any(t.abs().sum() for t in ours[:2] if S == 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("scale", [0.0, 1e-3, 2.5, -1.25])
def test_scale_argument(backend, scale):
    q, k, v = make_qkv((1, 2), (1, 2), 13, 10, 8, 8, seed=4)
    grad_out = random_like(q.shape, seed=4)
    opts = dict(scale=scale, is_causal=True)
    assert_all_close(out_and_grads(ours_fn(backend, opts), q, k, v, grad_out),
                     out_and_grads(expected_fn(opts), q, k, v, grad_out), f"scale {scale}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_window_forms(backend):
    """A list is a window; (None, None), or sides wider than the sequences, bound nothing;
    window (0, 0) is the diagonal."""
    q, k, v = make_qkv((1, 2), (1, 2), 11, 11, 4, 4, seed=6)
    plain = pykernels.scaled_dot_product_attention(q, k, v, backend=backend)
    torch.testing.assert_close(plain, F.scaled_dot_product_attention(q, k, v), rtol=1e-12,
                               atol=1e-12)
    for window in [(None, None), (11, 11), (1000, 10**6)]:
        torch.testing.assert_close(pykernels.scaled_dot_product_attention(
            q, k, v, window=window, backend=backend), plain, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(pykernels.scaled_dot_product_attention(
        q, k, v, window=[2, 1], backend=backend), torch_sdpa(q, k, v, window=(2, 1)),
        rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(pykernels.scaled_dot_product_attention(
        q, k, v, window=(0, 0), backend=backend), v, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["torch"])
def test_huge_window_sides_are_unbounded(backend):
    """Sides near 2**63 are unbounded (they once overflowed int64 index arithmetic in the cpu
    kernel and the reference: rows silently lost their keys)."""
    q, k, v = make_qkv((1, 2), (1, 2), 5, 6, 4, 3, seed=0)
    big = 2**63 - 1
    for window, same_as in [((big, big), None), ((0, big), (0, None)), ((big, 0), (None, 0))]:
        torch.testing.assert_close(
            pykernels.scaled_dot_product_attention(q, k, v, window=window, backend=backend),
            torch_sdpa(q, k, v, window=same_as), rtol=1e-12, atol=1e-13,
            msg=lambda m, w=window: f"window {w}: {m}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gqa_equals_repeated_heads(backend):
    """enable_gqa: query head h reads kv head h // (Hq / Hkv), and dk, dv sum over the group
    (against explicit repeat_interleave in plain torch); enable_gqa with equal heads is a
    no-op."""
    q, k, v = make_qkv((2, 6), (2, 2), 15, 12, 8, 4, seed=10)
    grad_out = random_like(q.shape[:-1] + (4,), seed=10)
    opts = dict(enable_gqa=True, window=(3, 3))
    ours = out_and_grads(ours_fn(backend, opts), q, k, v, grad_out)
    exact = out_and_grads(lambda q, k, v: torch_sdpa(
        q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), window=(3, 3)), q, k, v,
        grad_out)
    assert_all_close(ours, exact, f"{backend} gqa")
    q2 = q[:, :2]
    same = pykernels.scaled_dot_product_attention(q2, k, v, enable_gqa=True, backend=backend)
    assert torch.equal(same, pykernels.scaled_dot_product_attention(q2, k, v, backend=backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_extreme_values(backend):
    """Scores of order +-1e2..1e3 (q * 40), float masks with +-1e4 and -inf entries, rows
    with one key left or at -1e4 everywhere: float64 tight, float32 never NaN/inf and within
    the rule. In float32 the rule runs with q unscaled: rows saturated by scores of 1e2 leave
    the gradients an absolute error ~ eps |dO| |v| |q| from Delta = rowsum(dO * out)
    (FlashAttention's formulation) where the plain softmax backward cancels exactly. And with
    masks of 1e4 the factor is 4, not 2: plain PyTorch's error there is one rounding of each
    score (2^-24 * 1e4 relative in P), and the backward's P = exp(s - lse) adds one rounding
    of lse, of the same size (only lse is saved, as in FlashAttention)."""
    Z = 2 if backend == "cpu" else 1
    q, k, v = make_qkv((Z, 2), (Z, 2), 23, 29, 8, 8, seed=12)
    g = torch.Generator().manual_seed(13)
    mask = torch.randn(Z, 2, 23, 29, generator=g, dtype=torch.float64) * 1e4
    mask[..., ::3] = -INF
    mask[0, 0, 5, :-1] = -INF  # a row with one key left
    mask[-1, 1, 7] = -1e4      # a row at -1e4 everywhere
    grad_out = random_like(q.shape, seed=12)
    options = [dict(attn_mask=mask, softcap=50.0), dict(is_causal=True, window=(5, None)),
               dict(attn_mask=mask), dict(softcap=20.0)]
    for opts in options[:2] if backend == "triton" else options:
        what = f"{backend} extreme {list(opts)}"
        exact = out_and_grads(expected_fn(opts), q * 40, k, v, grad_out)
        ours = out_and_grads(ours_fn(backend, opts), q * 40, k, v, grad_out)
        assert_all_close(ours, exact, what, rtol=1e-9, atol=1e-9)
        low, exact_low = dict(opts), dict(opts)
        if "attn_mask" in opts:
            low["attn_mask"] = mask.float()
            exact_low["attn_mask"] = mask.float().double()
        q32, k32, v32 = q.float(), k.float(), v.float()
        for t in out_and_grads(ours_fn(backend, low), q32 * 40, k32, v32, grad_out):
            assert torch.isfinite(t).all(), what
        exact32 = out_and_grads(expected_fn(exact_low), q32.double(), k32.double(),
                                v32.double(), grad_out)
        assert_rule(out_and_grads(ours_fn(backend, low), q32, k32, v32, grad_out),
                    out_and_grads(expected_fn(low), q32, k32, v32, grad_out), exact32, what,
                    factor=4.0 if "attn_mask" in opts else 2.0)


# ---- fully masked rows ----------------------------------------------------------------------

def _empty_row_cases(Z, L, S):
    """(options, rows that must be empty) with every way a row can lose all its keys."""
    g = torch.Generator().manual_seed(14)
    bool_mask = torch.rand(Z, 3, L, S, generator=g) > 0.3
    bool_mask[:, :, 2] = False                  # row 2: all False
    bool_mask[0, 1, 4] = False                  # one row of one head
    float_mask = torch.randn(L, S, generator=g, dtype=torch.float64)
    float_mask[3] = -INF                        # row 3: all -inf, broadcast to every head
    band = torch.ones(L, S, dtype=torch.bool)
    band[5, 3:] = False                         # with window (2, None): row 5 has nothing left
    return [
        (dict(attn_mask=bool_mask), [(slice(None), slice(None), 2), (0, 1, 4)]),
        (dict(attn_mask=float_mask), [(slice(None), slice(None), 3)]),
        (dict(window=(0, 0)), [(slice(None), slice(None), slice(S, None))]),
        (dict(window=(1, None), is_causal=True), [(slice(None), slice(None), slice(S + 1, None))]),
        (dict(attn_mask=band, window=(2, None)), [(slice(None), slice(None), 5)]),
        (dict(attn_mask=bool_mask, softcap=2.0, enable_gqa=True), [(slice(None), slice(None), 2)]),
    ]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fully_masked_rows_give_zero_and_zero_gradient(backend, dtype):
    Z, L, S = 2 if backend == "cpu" else 1, 13, 8  # L > S: windows empty the last rows
    for i, (opts, rows) in enumerate(_empty_row_cases(Z, L, S)):
        heads_kv = 1 if opts.get("enable_gqa") else 3
        q, k, v = make_qkv((Z, 3), (Z, heads_kv), L, S, 8, 5, dtype=dtype, seed=i)
        if opts.get("attn_mask") is not None and opts["attn_mask"].is_floating_point():
            opts = {**opts, "attn_mask": opts["attn_mask"].to(dtype)}
        grad_out = random_like(q.shape[:-1] + (5,), seed=i)
        ours = out_and_grads(ours_fn(backend, opts), q, k, v, grad_out)
        what = f"{backend} {dtype} {list(opts)}"
        for t in ours:
            assert torch.isfinite(t).all(), what
        for row in rows:
            assert not ours[0][row].any() and not ours[1][row].any(), f"{what} row {row}"
        if dtype == torch.float64:
            assert_all_close(ours, out_and_grads(expected_fn(opts), q, k, v, grad_out), what)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_nan_input_makes_nan_rows_like_torch(dtype):
    """A NaN in a query row makes that row's output NaN, as in F.scaled_dot_product_attention,
    not a silently 'fully masked' zero row (its scores' max is NaN, never -inf)."""
    q, k, v = make_qkv((1, 2), (1, 2), 20, 24, 8, 8, dtype=dtype, seed=16)
    q = q.detach().clone()
    q[0, 1, 3, 2] = float("nan")
    for opts in ({}, {"is_causal": True}):
        ours = pykernels.scaled_dot_product_attention(q, k, v, backend="cpu", **opts)
        plain = torch_sdpa(q, k, v, **opts)
        assert torch.equal(ours.isnan(), plain.isnan()), opts
        assert ours.isnan().any()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_every_row_masked(backend):
    q, k, v = make_qkv((2, 2), (2, 2), 9, 6, 4, 4, seed=15)
    grad_out = random_like(q.shape, seed=15)
    for opts in (dict(attn_mask=torch.zeros(9, 6, dtype=torch.bool)),
                 dict(attn_mask=torch.full((2, 1, 9, 6), -INF, dtype=torch.float64)),
                 dict(window=(None, 0), attn_mask=torch.ones(9, 6).triu(1).bool()),
                 dict(attn_mask=torch.zeros(9, 6, dtype=torch.bool), dropout_p=0.5)):
        ours = out_and_grads(ours_fn(backend, opts), q, k, v, grad_out)
        for name, t in zip(NAMES, ours, strict=True):
            assert torch.equal(t, torch.zeros_like(t)), f"{backend} {list(opts)} {name}"


# ---- dropout ----------------------------------------------------------------------------------

def keep_mask(backend, shape, p, seed, hkv=None, **opts):
    """The dropout keep mask D (Z, Hq, L, S) a call with torch.manual_seed(seed) uses: with
    q = 0 every allowed score is 0, so with v = I out = D / (S (1 - p)) on allowed entries."""
    Z, H, L, S = shape
    hkv = hkv or H
    g = torch.Generator().manual_seed(seed)
    q = torch.zeros(Z, H, L, 4, dtype=torch.float64)
    k = torch.randn(Z, hkv, S, 4, generator=g, dtype=torch.float64)
    v = torch.eye(S, dtype=torch.float64).expand(Z, hkv, S, S)
    torch.manual_seed(seed)
    out = pykernels.scaled_dot_product_attention(q, k, v, dropout_p=p, backend=backend,
                                                 enable_gqa=hkv != H, **opts)
    keep = out > 0
    if not opts:  # every score allowed: kept entries are exactly 1 / (S (1 - p))
        torch.testing.assert_close(out[keep], torch.full_like(out[keep], 1 / (S * (1 - p))),
                                   rtol=1e-12, atol=0)
    return keep


def explicit_dropout_attention(q, k, v, keep, p, attn_mask=None, is_causal=False,
                               enable_gqa=False, window=None, softcap=None):
    """(softmax(s) * D / (1 - p)) @ v in plain torch, D given (float64)."""
    if enable_gqa:
        group = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(group, -3), v.repeat_interleave(group, -3)
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    L, S = s.shape[-2:]
    allowed = window_allowed(L, S, window or (None, None))
    if is_causal:
        allowed &= torch.ones(L, S, dtype=torch.bool).tril()
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        allowed = allowed & attn_mask
    elif attn_mask is not None:
        s = s + attn_mask
    s = s.masked_fill(~allowed, -INF)
    probs = torch.softmax(s, -1).nan_to_num(0.0)
    return (probs * keep / (1 - p)) @ v


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_fraction(backend, p):
    """The fraction of kept scores is 1 - p (within 5 sigma), overall and per head, and no two
    heads or rows share a mask."""
    shape = (2, 4, 64, 128) if backend == "cpu" else (1, 2, 17, 64)
    keep = keep_mask(backend, shape, p, seed=int(p * 100))
    n = keep.numel()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(keep.double().mean().item() - (1 - p)) < 5 * sigma
    per_head = keep.flatten(2).double().mean(-1)
    assert (per_head - (1 - p)).abs().max() < 5 * math.sqrt(p * (1 - p) / keep[0, 0].numel())
    flat = keep.flatten(0, 2)
    assert len({tuple(row.tolist()) for row in flat}) == flat.shape[0]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dropout_output_mean_with_unit_values(backend):
    """With v = 1 each output is sum_j P_ij D_ij / (1 - p): mean 1, variance
    sum_j P_ij^2 p / (1 - p) per row."""
    p = 0.3
    shape = (2, 4, 96, 160) if backend == "cpu" else (1, 2, 33, 48)
    Z, H, L, S = shape
    q, k, _ = make_qkv((Z, H), (Z, H), L, S, 8, 1, seed=16)
    v = torch.ones(Z, H, S, 3, dtype=torch.float64)
    torch.manual_seed(16)
    out = pykernels.scaled_dot_product_attention(q, k, v, dropout_p=p, backend=backend)
    torch.testing.assert_close(out[..., 0], out[..., 2], rtol=1e-13, atol=1e-13)
    probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), -1)
    sigma = math.sqrt((probs**2).sum(-1).mean().item() * p / (1 - p) / (Z * H * L))
    assert abs(out[..., 0].mean().item() - 1) < 5 * sigma


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dropout_reproducible_under_manual_seed(backend):
    q, k, v = make_qkv((2, 2), (2, 2), 17, 19, 8, 8, seed=17)

    def call():
        return pykernels.scaled_dot_product_attention(q, k, v, dropout_p=0.4, backend=backend)

    torch.manual_seed(3)
    first, second = call(), call()  # a fresh mask per call
    torch.manual_seed(3)
    again = call()
    torch.manual_seed(4)
    other = call()
    assert torch.equal(first, again)
    assert not torch.equal(first, second) and not torch.equal(first, other)
    # Nothing is dropped without dropout, and the generator is not touched.
    torch.manual_seed(3)
    state = torch.get_rng_state()
    plain = pykernels.scaled_dot_product_attention(q, k, v, backend=backend)
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(plain, F.scaled_dot_product_attention(q, k, v), rtol=1e-12,
                               atol=1e-12)


@needs_triton
@pytest.mark.parametrize("options", [dict(), dict(hkv=1, window=(2, 9), is_causal=True)],
                         ids=["plain", "gqa-window-causal"])
def test_dropout_cpu_and_triton_drop_the_same_elements(options):
    """Both backends draw D from the same Philox stream: the same seed gives the same mask."""
    shape = (2, 2, 21, 40)
    for seed, p in [(0, 0.5), (123, 0.17)]:
        cpu = keep_mask("cpu", shape, p, seed, **options)
        triton = keep_mask("triton", shape, p, seed, **options)
        assert torch.equal(cpu, triton), f"seed {seed} p {p}"
        assert 0 < cpu.sum() < cpu.numel()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("options", [
    dict(),
    dict(attn_mask="bool_head", enable_gqa=True),
    dict(is_causal=True, window=(4, None), softcap=3.0),
    dict(attn_mask="float"),
], ids=["plain", "bool-mask-gqa", "causal-window-softcap", "float-mask"])
def test_dropout_forward_and_backward_use_one_mask(backend, options):
    """Output and all three gradients equal the plain-torch composition with the keep mask
    read back for the same seed (forward and backward both regenerate that mask, whatever
    q, k, v are)."""
    Z, H, L, S = (2, 4, 37, 29) if backend == "cpu" else (1, 2, 19, 21)
    hkv = H // 2 if options.get("enable_gqa") else H
    options = dict(options)
    if isinstance(options.get("attn_mask"), str):
        options["attn_mask"] = make_mask(options["attn_mask"], (Z, H), L, S, seed=18)
    p, seed = 0.35, 19
    keep = keep_mask(backend, (Z, H, L, S), p, seed, hkv=hkv)
    q, k, v = make_qkv((Z, H), (Z, hkv), L, S, 8, 6, seed=18)
    grad_out = random_like((Z, H, L, 6), seed=18)

    def ours(q, k, v):
        torch.manual_seed(seed)
        return pykernels.scaled_dot_product_attention(q, k, v, dropout_p=p, backend=backend,
                                                      **options)

    exact = out_and_grads(lambda q, k, v: explicit_dropout_attention(q, k, v, keep, p,
                                                                     **options),
                          q, k, v, grad_out)
    assert_all_close(out_and_grads(ours, q, k, v, grad_out), exact, f"{backend} dropout")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("options", [dict(is_causal=True), dict(window=(2, 1), softcap=2.0)],
                         ids=["causal", "window-softcap"])
def test_dropout_gradcheck_with_reseeded_calls(backend, options):
    """gradcheck of a fixed-seed call: each forward gradcheck makes draws the same mask."""
    q, k, v = make_qkv((1, 2), (1, 1), 9, 7, 4, 3, seed=20)
    inputs = tuple(t.requires_grad_() for t in (q, k, v))

    def fn(q, k, v):
        torch.manual_seed(21)
        return pykernels.scaled_dot_product_attention(q, k, v, dropout_p=0.3, enable_gqa=True,
                                                      backend=backend, **options)

    torch.manual_seed(0)
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)
    # and the identity <dO, out> = <dv, v> (out is linear in v through the same masked P)
    out = fn(*inputs)
    grad_out = random_like(out.shape, seed=22)
    (dv,) = torch.autograd.grad(out, inputs[2], grad_out)
    torch.testing.assert_close((out * grad_out).sum(), (dv * inputs[2]).sum(), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dropout_no_grad_path_same_mask(backend):
    q, k, v = make_qkv((1, 3), (1, 3), 17, 17, 8, 8, seed=23)
    torch.manual_seed(5)
    with torch.no_grad():
        no_grad = pykernels.scaled_dot_product_attention(q, k, v, dropout_p=0.2,
                                                         backend=backend)
    torch.manual_seed(5)
    with_grad = pykernels.scaled_dot_product_attention(q.requires_grad_(), k, v, dropout_p=0.2,
                                                       backend=backend)
    assert no_grad.grad_fn is None and with_grad.requires_grad
    assert torch.equal(no_grad, with_grad.detach())


# ---- autograd plumbing, backend selection, determinism ---------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_only_requested_gradients_and_no_grad(backend):
    q, k, v = make_qkv((2, 2), (2, 2), 11, 9, 8, 8, seed=24)
    k.requires_grad_()
    out = pykernels.scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend)
    out.backward(random_like(out.shape))
    kr = k.detach().requires_grad_()
    F.scaled_dot_product_attention(q, kr, v, is_causal=True).backward(random_like(out.shape))
    assert q.grad is None and v.grad is None
    torch.testing.assert_close(k.grad, kr.grad, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        no_grad = pykernels.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                         backend=backend)
    assert no_grad.grad_fn is None and torch.equal(no_grad, out.detach())


def test_backend_selection(monkeypatch, auto_runs_kernels):
    used = spy_kernels(monkeypatch)
    q, k, v = make_qkv((1, 2), (1, 2), 9, 9, 4, 4, seed=26)
    expected = F.scaled_dot_product_attention(q, k, v)
    for dtype in (torch.float64, torch.float32):
        out = pykernels.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype))
        torch.testing.assert_close(out, expected.to(dtype))
    # "auto" on CPU tensors from the size crossover on (here, with the fixture: any size):
    # the fused C++ kernels
    assert used == ["cpu", "cpu"]
    used.clear()
    out = pykernels.scaled_dot_product_attention(q, k, v, backend="torch")
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert used == []
    with pykernels.use_backend("torch"):
        pykernels.scaled_dot_product_attention(q, k, v)
    assert used == []
    monkeypatch.setenv("PYKERNELS_BACKEND", "cpu")
    pykernels.scaled_dot_product_attention(q, k, v)
    assert used == ["cpu"]
    if HAS_TRITON:
        with pykernels.use_backend("triton"):
            out = pykernels.scaled_dot_product_attention(q, k, v)
        assert used == ["cpu", "triton"]
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_torch_backend_differentiates_float_masks():
    """Only the torch backend takes a float mask that requires grad (the kernels refuse)."""
    q, k, v = make_qkv((1, 2), (1, 2), 5, 6, 3, 3, seed=27)
    mask = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, m: pykernels.scaled_dot_product_attention(
        q, k, v, attn_mask=m, softcap=2.0, window=(1, 2), backend="torch"),
        (q.requires_grad_(), mask), fast_mode=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_repeated_backward_is_bitwise_identical(backend):
    """Every backward sums in a fixed order: two runs give the same bits, with no switch."""
    Z, H, L, S = (2, 4, 300, 280) if backend == "cpu" else (1, 2, 33, 20)
    q, k, v = make_qkv((Z, H), (Z, H // 2), L, S, 16, 8, dtype=torch.float32, seed=28)
    grad_out = random_like((Z, H, L, 8), seed=28)
    runs = []
    for _ in range(2):
        torch.manual_seed(29)
        runs.append(out_and_grads(ours_fn(backend, dict(
            enable_gqa=True, is_causal=True, dropout_p=0.1, softcap=5.0)), q, k, v, grad_out))
    for name, a, b in zip(NAMES, *runs, strict=True):
        assert torch.equal(a, b), f"{backend} {name} differs between two runs"


@pytest.mark.parametrize("enabled", [True, False])
def test_use_deterministic_is_a_deprecated_no_op(enabled):
    """Used as before (a context manager), it warns; the results inside are the usual."""
    q, k, v = make_qkv((1, 2), (1, 2), 9, 7, 8, 8, dtype=torch.float64, seed=3)
    before = pykernels.scaled_dot_product_attention(q, k, v, backend="torch")
    with pytest.warns(FutureWarning, match="already deterministic"):
        with pykernels.use_deterministic(enabled):
            inside = pykernels.scaled_dot_product_attention(q, k, v, backend="torch")
    assert torch.equal(before, inside)


def test_cpu_results_do_not_depend_on_the_thread_count():
    """csrc/cpu/attention.cpp sums in a fixed order: one thread and several give the same
    bits. Z * Hkv = 4 units of work: one thread runs the one-sweep backward, 8 threads (more
    than 4 / 2) the two-sweep one, which must walk the same tiles in the same order."""
    q, k, v = make_qkv((2, 4), (2, 2), 300, 270, 32, 16, dtype=torch.float32, seed=30)
    grad_out = random_like((2, 4, 300, 16), seed=30)
    opts = dict(enable_gqa=True, window=(100, 20), dropout_p=0.2)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, max(2, threads), 8):
            torch.set_num_threads(n)
            torch.manual_seed(31)
            runs.append(out_and_grads(ours_fn("cpu", opts), q, k, v, grad_out))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for name, a, b in zip(NAMES, runs[0], other, strict=True):
            assert torch.equal(a, b), name


# ---- registration: opcheck, torch.compile ------------------------------------------------------


def _compile_case():
    q, k, v = make_qkv((2, 4), (2, 2), 23, 31, 8, 6, seed=34)
    mask = make_mask("bool_head", (2, 4), 23, 31, seed=34)
    grad_out = random_like((2, 4, 23, 6), seed=34)
    return q, k, v, mask, grad_out


def test_torch_compile_fullgraph():
    q, k, v, mask, grad_out = _compile_case()

    def fn(q, k, v):
        return pykernels.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True,
                                                      window=(6, 3), softcap=4.0, backend="cpu")

    torch._dynamo.reset()
    compiled = out_and_grads(torch.compile(fn, fullgraph=True), q, k, v, grad_out)
    eager = out_and_grads(fn, q, k, v, grad_out)
    assert_all_close(compiled, eager, "compiled vs eager", rtol=1e-13, atol=1e-14)
    opts = dict(attn_mask=mask, enable_gqa=True, window=(6, 3), softcap=4.0)
    assert_all_close(compiled, out_and_grads(expected_fn(opts), q, k, v, grad_out),
                     "compiled vs reference")


def test_torch_compile_fullgraph_dropout():
    """The seed is drawn inside the traced function: with Inductor's fallback_random (eager's
    generator) the compiled call drops exactly what eager drops under the same manual_seed;
    with Inductor's own generator it is still reproducible under manual_seed, and forward and
    backward still share one mask (<dO, out> = <dv, v>)."""
    q, k, v, mask, grad_out = _compile_case()

    def fn(q, k, v):
        return pykernels.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.3,
                                                      enable_gqa=True, backend="cpu")

    def seeded(f, seed=35):
        def call(q, k, v):
            torch.manual_seed(seed)
            return f(q, k, v)
        return call

    eager = out_and_grads(seeded(fn), q, k, v, grad_out)
    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):
        compiled = out_and_grads(seeded(torch.compile(fn, fullgraph=True)), q, k, v, grad_out)
    assert_all_close(compiled, eager, "compiled (fallback_random) vs eager", rtol=1e-13,
                     atol=1e-14)
    torch._dynamo.reset()
    compiled_fn = torch.compile(fn, fullgraph=True)
    first = out_and_grads(seeded(compiled_fn), q, k, v, grad_out)
    again = out_and_grads(seeded(compiled_fn), q, k, v, grad_out)
    other = out_and_grads(seeded(compiled_fn, 36), q, k, v, grad_out)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])
    out, _, _, dv = first
    torch.testing.assert_close((out * grad_out).sum(), (dv * v).sum(), rtol=1e-12, atol=1e-12)



def test_mask_not_broadcasting_as_in_torch():
    """The shapes the op refuses, F refuses too (and the other way round)."""
    q, k, v = make_qkv((2, 4), (2, 4), 5, 6, 8, 8)
    for shape, ok in [((5, 6), True), ((6,), True), ((2, 1, 1, 6), True), ((4, 5, 1), True),
                      ((5, 5), False), ((3, 4, 5, 6), False), ((2, 4, 5, 6, 1), False)]:
        mask = torch.ones(shape, dtype=torch.bool)
        with contextlib.nullcontext() if ok else pytest.raises(ValueError, match="attn_mask"):
            out = pykernels.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                         backend="cpu")
            torch.testing.assert_close(out, reference.scaled_dot_product_attention(q, k, v, mask))
            if len(shape) > 1:  # F's CPU kernels do not take a 1-D mask
                torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, mask))
        if not ok:
            with pytest.raises(RuntimeError):
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# ---- GPU (cuda marker: skipped without a CUDA device) ----------------------------------------

def attention_gpu_backends():
    return [pytest.param(b, id=b) for b in gpu_kernel_backends()]


GPU_CASES = {
    # name: (Z, Hq, Hkv, L, S, E, Ev, options)
    "1025-e64": (2, 8, 8, 1025, 1025, 64, 64, dict()),
    "2047-e128-causal": (2, 8, 8, 2047, 2047, 128, 128, dict(is_causal=True)),
    "L777-S3001-e64x96": (2, 4, 4, 777, 3001, 64, 96, dict()),
    "S777-L3001-causal": (1, 4, 4, 3001, 777, 64, 64, dict(is_causal=True)),
    "4099-gqa4-causal": (1, 8, 2, 4099, 4099, 128, 128, dict(is_causal=True)),
    "4096-window-softcap": (1, 8, 4, 4096, 4096, 128, 128, dict(window=(511, 0),
                                                                   softcap=30.0)),
    "2053-bool-head-mask": (2, 4, 4, 2053, 2053, 64, 64, dict(attn_mask="bool_head")),
    "1531-float-mask-window": (2, 4, 4, 1531, 1999, 64, 64, dict(attn_mask="float",
                                                                   window=(300, 300))),
    "1000-e256": (1, 4, 4, 1000, 1000, 256, 256, dict(is_causal=True)),
    "333-e16-e32": (4, 4, 1, 333, 333, 16, 32, dict(window=(None, 7))),
    "8192-e128-causal": (1, 4, 4, 8192, 8192, 128, 128, dict(is_causal=True)),
    "16384-e128": (1, 2, 2, 16384, 16384, 128, 128, dict()),
    "16384-e64-causal-gqa": (1, 2, 1, 16384, 16384, 64, 64, dict(is_causal=True)),
    # Lengths and head dims off every tile size: one row and key; 17 queries on 97 keys with
    # every head-dim bucket (16 and 24 pad to 32, 80 and 48 to 128, 200 to 256).
    "1-1-e16": (2, 2, 2, 1, 1, 16, 16, dict()),
    "1-97-e24-causal": (2, 2, 1, 1, 97, 24, 24, dict(is_causal=True)),
    "17-97-e80x48-float-head-mask": (2, 4, 2, 17, 97, 80, 48, dict(attn_mask="float_head")),
    "97-17-e200x256-window-softcap": (1, 2, 2, 97, 17, 200, 256, dict(window=(3, 5),
                                                                        softcap=5.0)),
    "17-97-e256x40-key-padding": (2, 2, 2, 17, 97, 256, 40, dict(attn_mask="key_padding")),
}
SLOW_GPU = {"8192-e128-causal", "16384-e128", "16384-e64-causal-gqa"}


def gpu_rule_case(backend, name, dtype, seed=0):
    Z, hq, hkv, L, S, E, Ev, options = GPU_CASES[name]
    options = dict(options, enable_gqa=hq != hkv)
    q, k, v = make_qkv((Z, hq), (Z, hkv), L, S, E, Ev, dtype=dtype, device="cuda", seed=seed)
    if isinstance(options.get("attn_mask"), str):
        options["attn_mask"] = make_mask(options["attn_mask"], (Z, hq), L, S, dtype=dtype,
                                         device="cuda", seed=seed)
    grad_out = random_like((Z, hq, L, Ev), seed=seed, device="cuda")
    ours = out_and_grads(ours_fn(backend, options), q, k, v, grad_out)
    # plain PyTorch in the same dtype: the reference composition (scores in dtype, as
    # FlashAttention's tests compare against), exact: float64 on the same rounded values
    plain = out_and_grads(lambda q, k, v: reference.scaled_dot_product_attention(
        q, k, v, **options), q, k, v, grad_out)
    mask = options.get("attn_mask")
    exact_options = {**options, "attn_mask": mask.double() if mask is not None
                     and mask.is_floating_point() else mask}
    exact = out_and_grads(lambda q, k, v: reference.scaled_dot_product_attention(
        q, k, v, **exact_options), q.double(), k.double(), v.double(), grad_out)
    assert ours[0].dtype == dtype
    assert_rule(ours, plain, exact, f"{backend} {dtype} {name}")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", attention_gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n in SLOW_GPU else n for n in GPU_CASES])
def test_gpu_low_precision_rule(backend, dtype, name):
    gpu_rule_case(backend, name, dtype)
    torch.cuda.empty_cache()


@pytest.mark.cuda
@pytest.mark.parametrize("backend", attention_gpu_backends())
@pytest.mark.parametrize("name", [n for n in GPU_CASES if n not in SLOW_GPU])
def test_gpu_float32_rule(backend, name):
    """float32 (cuda: the exact-FMA SIMT path, no TF32) under the same rule."""
    gpu_rule_case(backend, name, torch.float32)
    torch.cuda.empty_cache()


@pytest.mark.cuda
@pytest.mark.parametrize("backend", attention_gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_fully_masked_rows_and_extremes(backend, dtype):
    Z, H, L, S = 2, 4, 300, 200
    q, k, v = make_qkv((Z, H), (Z, H), L, S, 64, 64, dtype=dtype, device="cuda", seed=40,
                       scale=4.0)
    mask = make_mask("bool_head", (Z, H), L, S, device="cuda", seed=40)
    mask[:, :, 7] = False
    grad_out = random_like((Z, H, L, 64), seed=40, device="cuda")
    for opts in (dict(attn_mask=mask), dict(window=(0, 0)), dict(attn_mask=mask, softcap=20.0)):
        ours = out_and_grads(ours_fn(backend, opts), q, k, v, grad_out)
        for t in ours:
            assert torch.isfinite(t).all()
        empty = [7] if "attn_mask" in opts else list(range(S, L))
        assert not ours[0][:, :, empty].any() and not ours[1][:, :, empty].any()


@pytest.mark.cuda
@pytest.mark.parametrize("backend", attention_gpu_backends())
def test_gpu_dropout_same_mask_as_cpu(backend):
    """The cuda tensors' keep mask equals the cpu backend's for the same seed (the seed comes
    from the CPU generator; one Philox scheme everywhere), and the gradients use it."""
    Z, H, L, S, p, seed = 2, 4, 129, 200, 0.3, 41
    cpu_keep = keep_mask("cpu", (Z, H, L, S), p, seed)
    q = torch.zeros(Z, H, L, 16, device="cuda")
    k = torch.randn(Z, H, S, 16, device="cuda")
    v = torch.eye(S, device="cuda").expand(Z, H, S, S).contiguous()
    torch.manual_seed(seed)
    out = pykernels.scaled_dot_product_attention(q, k, v, dropout_p=p, backend=backend)
    assert torch.equal(out.cpu() > 0, cpu_keep)
    qq, kk, vv = make_qkv((Z, H), (Z, H), L, S, 64, 64, dtype=torch.float32, device="cuda",
                          seed=seed)
    grad_out = random_like((Z, H, L, 64), seed=seed, device="cuda")

    def ours(q, k, v):
        torch.manual_seed(seed)
        return pykernels.scaled_dot_product_attention(q, k, v, dropout_p=p, backend=backend)

    keep = cpu_keep.cuda()
    got = out_and_grads(ours, qq, kk, vv, grad_out)
    exact = out_and_grads(lambda q, k, v: explicit_dropout_attention(q, k, v, keep, p),
                          qq.double(), kk.double(), vv.double(), grad_out)
    for name, a, e in zip(NAMES, got, exact, strict=True):
        torch.testing.assert_close(a.double(), e, rtol=2e-3, atol=2e-3, msg=name)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", attention_gpu_backends())
@pytest.mark.parametrize("options", [
    dict(),
    dict(is_causal=True, enable_gqa=True, softcap=3.0),
    dict(attn_mask="bool_head", window=(20, 3), enable_gqa=True),
], ids=["plain", "causal-gqa-softcap", "mask-window-gqa"])
def test_gpu_dropout_matches_cpu_backend(backend, options):
    """float32 with dropout: the GPU backend's output and gradients equal the cpu backend's
    for the same seed (one Philox keep mask, drawn on the device and on the host)."""
    Z, H, L, S, p, seed = 2, 4, 97, 130, 0.25, 45
    hkv = H // 2 if options.get("enable_gqa") else H
    q, k, v = make_qkv((Z, H), (Z, hkv), L, S, 40, 24, dtype=torch.float32, seed=seed)
    grad_out = random_like((Z, H, L, 24), seed=seed)
    if isinstance(options.get("attn_mask"), str):
        options = dict(options, attn_mask=make_mask(options["attn_mask"], (Z, H), L, S,
                                                    seed=seed))

    def run(name, device):
        opts = {k: (o.to(device) if isinstance(o, torch.Tensor) else o)
                for k, o in options.items()}

        def fn(q, k, v):
            torch.manual_seed(seed)
            return pykernels.scaled_dot_product_attention(q, k, v, dropout_p=p, backend=name,
                                                          **opts)

        return out_and_grads(fn, q.to(device), k.to(device), v.to(device),
                             grad_out.to(device))

    ours = run(backend, "cuda")
    cpu = run("cpu", "cpu")
    for name, a, e in zip(NAMES, ours, cpu, strict=True):
        torch.testing.assert_close(a.cpu(), e, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", attention_gpu_backends())
def test_gpu_deterministic_backward(backend):
    q, k, v = make_qkv((2, 8), (2, 2), 1025, 1025, 128, 128, dtype=torch.bfloat16,
                       device="cuda", seed=42)
    grad_out = random_like((2, 8, 1025, 128), seed=42, device="cuda")
    runs = [out_and_grads(ours_fn(backend, dict(is_causal=True, enable_gqa=True)), q, k, v,
                          grad_out) for _ in range(2)]
    for other in runs[1:]:
        for name, a, b in zip(NAMES, runs[0], other, strict=True):
            assert torch.equal(a, b), name


@pytest.mark.cuda
@pytest.mark.parametrize("backend", attention_gpu_backends())
def test_gpu_opcheck_and_compile(backend):
    q, k, v = make_qkv((2, 4), (2, 2), 97, 130, 64, 64, dtype=torch.bfloat16, device="cuda",
                       seed=43)
    rng = torch.tensor([5, 7], dtype=torch.int64)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), None, 0.125, True, -1,
            -1, 0.0, 0.2, rng)
    opcheck(torch.ops.pykernels.attention_forward, (*args, backend))
    mask = make_mask("bool_head", (2, 4), 97, 130, device="cuda", seed=43)

    def fn(q, k, v):
        return pykernels.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True,
                                                      softcap=30.0, backend=backend)

    torch._dynamo.reset()
    grad_out = random_like((2, 4, 97, 64), seed=43, device="cuda")
    compiled = out_and_grads(torch.compile(fn, fullgraph=True), q, k, v, grad_out)
    eager = out_and_grads(fn, q, k, v, grad_out)
    for name, c, e in zip(NAMES, compiled, eager, strict=True):
        torch.testing.assert_close(c, e, msg=name)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_default_backend(dtype):
    """'auto' on CUDA tensors ('triton' for the half types until a GPU run ranks the
    backends, 'torch' for float32) runs and meets the rule."""
    q, k, v = make_qkv((2, 4), (2, 4), 65, 65, 64, 64, dtype=dtype, device="cuda", seed=44)
    out = pykernels.scaled_dot_product_attention(q, k, v, is_causal=True)
    plain = reference.scaled_dot_product_attention(q, k, v, is_causal=True)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    assert out.dtype == dtype
    assert_low_precision_close(out, plain, exact, name=f"default backend {dtype}")


@pytest.mark.cuda
def test_gpu_head_dim_error_names_backends_that_work():
    """For CUDA tensors the error does not suggest 'cpu' (it once did)."""
    q = torch.randn(1, 1, 8, 512, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="supports head dims up to 256") as info:
        pykernels.scaled_dot_product_attention(q, q, q, backend="triton")
    assert "'torch'" in str(info.value) and "'cpu'" not in str(info.value)
