"""pykernels.nn.MultiheadAttention against torch.nn.MultiheadAttention."""

import pytest
import torch
from attention_cases import random_like, spy_kernels

import pykernels

INF = float("inf")


def _mha_pair(seed=50, dtype=torch.float64, **kwargs):
    """(ours, torch's) MultiheadAttention with one state_dict (ours drawn, torch's loaded)."""
    torch.manual_seed(seed)
    ours = pykernels.nn.MultiheadAttention(12, 3, dtype=dtype, **kwargs)
    plain = torch.nn.MultiheadAttention(12, 3, dtype=dtype, **kwargs)
    plain.load_state_dict(ours.state_dict())
    return ours, plain


def _mha_inputs(batch_first, kdim=12, vdim=12, L=7, S=9, N=2, seed=51, unbatched=False):
    g = torch.Generator().manual_seed(seed)

    def rand(length, features):
        shape = ((length, features) if unbatched else
                 (N, length, features) if batch_first else (length, N, features))
        return torch.randn(shape, generator=g, dtype=torch.float64)

    return rand(L, 12), rand(S, kdim), rand(S, vdim)


def _mha_masks(kind, L=7, S=9, N=2, heads=3):
    """(key_padding_mask, attn_mask, is_causal) in torch.nn.MultiheadAttention's convention
    (bool: True = may NOT attend)."""
    g = torch.Generator().manual_seed(52)
    padding = torch.zeros(N, S, dtype=torch.bool)
    padding[1, 6:] = True
    causal = torch.ones(L, S, dtype=torch.bool).triu(1)
    return {
        "none": (None, None, False),
        "key_padding": (padding, None, False),
        "float_key_padding": (torch.zeros(N, S, dtype=torch.float64).masked_fill(padding, -INF),
                              None, False),
        "bool_mask": (None, torch.rand(L, S, generator=g) > 0.7, False),
        "float_mask": (None, torch.randn(L, S, generator=g, dtype=torch.float64), False),
        "per_head_mask": (None, torch.randn(N * heads, L, S, generator=g, dtype=torch.float64),
                          False),
        "causal": (None, causal, True),
        "causal_and_padding": (padding, causal, True),
        "bool_mask_and_padding": (padding, torch.rand(L, S, generator=g) > 0.7, False),
    }[kind]


def _mha_run(module, q, k, v, **kwargs):
    """(output, weights, input grads, parameter grads) of one forward/backward."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, weights = module(*leaves, **kwargs)
    grad_out = random_like(out.shape, seed=53)
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad(out, leaves + params, grad_out, allow_unused=True)
    return out.detach(), weights, grads


MHA_MASKS = ["none", "key_padding", "float_key_padding", "bool_mask", "float_mask",
             "per_head_mask", "causal", "causal_and_padding", "bool_mask_and_padding"]


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("dims", [(12, 12), (7, 5)], ids=["same_dims", "kdim7_vdim5"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_multihead_attention_fused_path_matches_torch(batch_first, dims, bias):
    """need_weights=False: the fused path, output and every gradient as torch's module, for
    every kind of mask."""
    kdim, vdim = dims
    ours, plain = _mha_pair(kdim=kdim, vdim=vdim, bias=bias, batch_first=batch_first)
    assert isinstance(ours, torch.nn.MultiheadAttention)
    assert ours.state_dict().keys() == plain.state_dict().keys()
    q, k, v = _mha_inputs(batch_first, kdim, vdim)
    for kind in MHA_MASKS:
        padding, mask, causal = _mha_masks(kind)
        kwargs = dict(key_padding_mask=padding, attn_mask=mask, is_causal=causal,
                      need_weights=False)
        out, weights, grads = _mha_run(ours, q, k, v, **kwargs)
        ref_out, _, ref_grads = _mha_run(plain, q, k, v, **kwargs)
        assert weights is None
        torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12, msg=kind)
        for i, (a, e) in enumerate(zip(grads, ref_grads, strict=True)):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12,
                                       msg=lambda m, i=i, kind=kind: f"{kind} grad {i}: {m}")


def test_multihead_attention_fused_path_runs_the_kernel(monkeypatch, auto_runs_kernels):
    used = spy_kernels(monkeypatch)
    ours, plain = _mha_pair()
    q, k, v = _mha_inputs(False)
    ours(q, k, v, need_weights=False)
    assert used == ["cpu"]
    used.clear()
    out, weights = ours(q, k, v)  # need_weights=True: torch's own computation
    assert used == [] and weights.shape == (2, 7, 9)


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("average", [True, False], ids=["averaged", "per_head"])
def test_multihead_attention_need_weights_as_torch(batch_first, average):
    ours, plain = _mha_pair(batch_first=batch_first, kdim=7, vdim=5)
    q, k, v = _mha_inputs(batch_first, 7, 5)
    padding, mask, _ = _mha_masks("bool_mask_and_padding")
    kwargs = dict(key_padding_mask=padding, attn_mask=mask, average_attn_weights=average)
    out, weights, grads = _mha_run(ours, q, k, v, **kwargs)
    ref_out, ref_weights, ref_grads = _mha_run(plain, q, k, v, **kwargs)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-10, atol=1e-12)
    assert weights.shape == ((2, 7, 9) if average else (2, 3, 7, 9))
    fused, _, _ = _mha_run(ours, q, k, v, need_weights=False, key_padding_mask=padding,
                           attn_mask=mask)
    torch.testing.assert_close(fused, out, rtol=1e-10, atol=1e-12)


def test_multihead_attention_unbatched_and_eval_dropout():
    ours, plain = _mha_pair(dropout=0.4)
    ours.eval()
    plain.eval()
    q, k, v = _mha_inputs(False, unbatched=True)
    padding = torch.zeros(9, dtype=torch.bool)
    padding[7:] = True
    for kwargs in (dict(), dict(key_padding_mask=padding),
                   dict(attn_mask=_mha_masks("causal")[1], is_causal=True)):
        out, _, grads = _mha_run(ours, q, k, v, need_weights=False, **kwargs)
        ref_out, _, ref_grads = _mha_run(plain, q, k, v, need_weights=False, **kwargs)
        assert out.shape == (7, 12)
        torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
        for a, e in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_multihead_attention_training_dropout():
    """In training mode the fused path drops attention weights: reproducible under
    torch.manual_seed, different from eval mode, and like eval mode without dropout."""
    ours, _ = _mha_pair(dropout=0.3, batch_first=True)
    q, k, v = _mha_inputs(True)
    ours.train()
    torch.manual_seed(54)
    first, _ = ours(q, k, v, need_weights=False)
    torch.manual_seed(54)
    again, _ = ours(q, k, v, need_weights=False)
    ours.eval()
    evaluated, _ = ours(q, k, v, need_weights=False)
    assert torch.equal(first, again) and not torch.allclose(first, evaluated)
    ours.dropout = 0.0
    ours.train()
    torch.testing.assert_close(ours(q, k, v, need_weights=False)[0], evaluated, rtol=0, atol=0)


def test_multihead_attention_is_causal_needs_a_mask_like_torch():
    ours, plain = _mha_pair()
    q, k, v = _mha_inputs(False)
    for module in (ours, plain):
        with pytest.raises(RuntimeError, match="attn_mask"):
            module(q, k, v, need_weights=False, is_causal=True)


def test_multihead_attention_torch_compile_fullgraph():
    ours, plain = _mha_pair(batch_first=True)
    q, k, v = _mha_inputs(True)
    padding, mask, _ = _mha_masks("bool_mask_and_padding")

    def fn(q, k, v):
        return ours(q, k, v, key_padding_mask=padding, attn_mask=mask, need_weights=False)[0]

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)(q, k, v)
    expected = plain(q, k, v, key_padding_mask=padding, attn_mask=mask, need_weights=False)[0]
    torch.testing.assert_close(compiled, expected, rtol=1e-10, atol=1e-12)
