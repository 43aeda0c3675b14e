"""The shortcut of small eager CPU calls (pykernels/ops/_shortcut.py) returns exactly what
the full way returns, or raises what it raises.

Every case runs twice on the same inputs: with the default backend (where the shortcut may
be taken) and with backend="auto" by name (the full way: argument checks, autocast,
backend resolution; "auto" then picks the same torch composition on these small tensors).
The outputs and gradients must be equal bit for bit, or both calls must raise the same
exception type with the same message. Valid calls must take the shortcut: their
default-backend call runs with the full way's backend resolution made to fail.
"""

import importlib

import pytest
import torch

import pykernels

MODULES = {"linear_act": "linear_act", "linear_glu": "linear_glu",
           "cross_entropy": "cross_entropy", "linear_cross_entropy": "linear_cross_entropy",
           "attention": "attention"}


def _randn(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(shape, dtype=dtype, device=device)


def _targets(n, classes, *more):
    return torch.randint(0, classes, (n, *more))


def _linear(act="gelu", x=(6, 8), w=(5, 8), b=(5,), **kw):
    """linear_act on tensors of the given shapes (None: no such tensor)."""
    return ("linear_act", lambda: (_randn(*x), _randn(*w), None if b is None else _randn(*b)),
            lambda x, w, b, **k: pykernels.linear_act(x, w, b, act, **kw, **k))


def _glu(act="silu", x=(6, 8), w=(10, 8), b=(10,)):
    return ("linear_glu", lambda: (_randn(*x), _randn(*w), None if b is None else _randn(*b)),
            lambda x, w, b, **k: pykernels.linear_glu(x, w, b, act, **k))


def _ce(logits=(6, 5), target=None, **kw):
    def inputs():
        z = _randn(*logits)
        t = target() if callable(target) else _targets(logits[0], logits[1], *logits[2:])
        return z, t
    return ("cross_entropy", inputs,
            lambda z, t, **k: pykernels.cross_entropy(z, t, **kw, **k))


def _lce(h=(6, 8), w=(7, 8), target=None, **kw):
    def inputs():
        t = target() if callable(target) else _targets(h[0] if len(h) == 2 else 1, w[0])
        return _randn(*h), _randn(*w), t.reshape(h[:-1]) if len(h) < 3 else t
    return ("linear_cross_entropy", inputs,
            lambda h, w, t, **k: pykernels.linear_cross_entropy(h, w, t, **kw, **k))


def _attn(q=(2, 3, 5, 8), k=(2, 3, 7, 8), v=(2, 3, 7, 4), **kw):
    return ("attention", lambda: (_randn(*q), _randn(*k), _randn(*v)),
            lambda q, k, v, **k_: pykernels.scaled_dot_product_attention(q, k, v, **kw, **k_))


VALID = {
    **{f"linear_act-{a}": _linear(a) for a in pykernels.ACTIVATIONS},
    "linear_act-3d-no-bias": _linear("relu", x=(2, 3, 8), b=None),
    "linear_act-leaky-slope": _linear("leaky_relu", negative_slope=0.2),
    "linear_glu-silu": _glu(),
    "linear_glu-gelu-no-bias": _glu("gelu_tanh", b=None),
    "cross_entropy-mean": _ce(),
    "cross_entropy-sum-smoothing": _ce(reduction="sum", label_smoothing=0.1),
    "cross_entropy-none": _ce(reduction="none"),
    "cross_entropy-ignored": _ce(target=lambda: torch.tensor([0, -100, 4, 2, -100, 1])),
    "cross_entropy-other-ignore": _ce(target=lambda: torch.tensor([0, 7, 4, 2, 7, 1]),
                                      ignore_index=7),
    "cross_entropy-all-ignored": _ce(target=lambda: torch.full((6,), -100)),
    "cross_entropy-1d": _ce(logits=(5,), target=lambda: torch.tensor(3)),
    "cross_entropy-spatial": _ce(logits=(3, 5, 4)),
    "linear_cross_entropy-mean": _lce(),
    "linear_cross_entropy-none": _lce(reduction="none", label_smoothing=0.2),
    "linear_cross_entropy-1d": _lce(h=(8,)),
    "attention": _attn(),
    "attention-causal-scale": _attn(is_causal=True, scale=0.3),
    "attention-dropout": _attn(dropout_p=0.25),
}

INVALID = {
    "linear_act-1d-weight": _linear(w=(8,), b=None),
    "linear_act-broadcast-bias": _linear(b=(1,)),
    "linear_act-short-bias": _linear(b=(4,)),
    "linear_act-in-features": _linear(w=(5, 7)),
    "linear_act-bad-activation": _linear("bogus"),
    "linear_act-slope-str": _linear("leaky_relu", negative_slope="0.1"),
    "linear_act-slope-bool": _linear("leaky_relu", negative_slope=True),
    "linear_act-0d-input": _linear(x=()),
    "linear_act-float64-weight": ("linear_act", lambda: (_randn(6, 8), _randn(
        5, 8, dtype=torch.float64), None), lambda x, w, b, **k: pykernels.linear_act(
        x, w, b, "gelu", **k)),
    "linear_act-int-input": ("linear_act", lambda: (torch.ones(6, 8, dtype=torch.int64),
                                                    torch.ones(5, 8, dtype=torch.int64), None),
                             lambda x, w, b, **k: pykernels.linear_act(x, w, b, "relu", **k)),
    "linear_act-meta-weight": ("linear_act", lambda: (_randn(6, 8), _randn(
        5, 8, device="meta"), None), lambda x, w, b, **k: pykernels.linear_act(x, w, b, **k)),
    "linear_act-meta-bias": ("linear_act", lambda: (_randn(6, 8), _randn(5, 8), _randn(
        5, device="meta")), lambda x, w, b, **k: pykernels.linear_act(x, w, b, **k)),
    "linear_glu-odd-weight": _glu(w=(9, 8), b=None),
    "cross_entropy-target-too-big": _ce(target=lambda: torch.tensor([0, 5, 1, 1, 1, 1])),
    "cross_entropy-target-negative": _ce(target=lambda: torch.tensor([0, -3, 1, 1, 1, 1])),
    "cross_entropy-target-shape": _ce(target=lambda: torch.zeros(5, dtype=torch.int64)),
    "cross_entropy-target-int32": _ce(target=lambda: torch.zeros(6, dtype=torch.int32)),
    "cross_entropy-target-meta": _ce(target=lambda: torch.zeros(6, dtype=torch.int64,
                                                                device="meta")),
    "cross_entropy-probabilities-float64": _ce(target=lambda: torch.rand(
        6, 5, dtype=torch.float64)),
    "cross_entropy-no-classes": _ce(logits=(3, 0), target=lambda: torch.zeros(
        3, dtype=torch.int64)),
    "cross_entropy-empty": _ce(logits=(0, 0), target=lambda: torch.zeros(
        0, dtype=torch.int64)),
    "cross_entropy-0d-input": _ce(logits=(), target=lambda: torch.tensor(0)),
    "cross_entropy-smoothing-too-big": _ce(label_smoothing=1.5),
    "cross_entropy-ignore-index-bool": _ce(ignore_index=True),
    "cross_entropy-old-reduction": _ce(reduction="elementwise_mean"),
    "cross_entropy-inplace-int": _ce(inplace_backward=1),
    "cross_entropy-z-loss-int": _ce(z_loss=0),
    "cross_entropy-z-loss-negative": _ce(z_loss=-1.0),
    "linear_cross_entropy-3d": _lce(h=(2, 3, 8), target=lambda: _targets(2, 7, 3)),
    "linear_cross_entropy-bad-target": _lce(target=lambda: torch.tensor([0, 9, 1, 1, 1, 1])),
    "linear_cross_entropy-1d-weight": _lce(w=(8,), target=lambda: _targets(6, 1)),
    "linear_cross_entropy-no-classes": _lce(w=(0, 8), target=lambda: torch.zeros(
        6, dtype=torch.int64)),
    "linear_cross_entropy-meta-weight": ("linear_cross_entropy", lambda: (
        _randn(6, 8), _randn(7, 8, device="meta"), _targets(6, 7)),
        lambda h, w, t, **k: pykernels.linear_cross_entropy(h, w, t, **k)),
    "attention-feature-mismatch": _attn(k=(2, 3, 7, 6)),
    "attention-length-mismatch": _attn(v=(2, 3, 6, 4)),
    "attention-no-features": _attn(q=(2, 3, 5, 0), k=(2, 3, 7, 0)),
    "attention-no-keys": _attn(k=(2, 3, 0, 8), v=(2, 3, 0, 4)),
    "attention-broadcast-batch": _attn(k=(1, 3, 7, 8), v=(1, 3, 7, 4)),
    "attention-heads-mismatch": _attn(k=(2, 1, 7, 8), v=(2, 1, 7, 4)),
    "attention-3d": _attn(q=(3, 5, 8), k=(3, 7, 8), v=(3, 7, 4)),
    "attention-scale-nan": _attn(scale=float("nan")),
    "attention-scale-int": _attn(scale=1),
    "attention-dropout-one": _attn(dropout_p=1.0),
    "attention-causal-int": _attn(is_causal=1),
    "attention-meta-key": ("attention", lambda: (_randn(2, 3, 5, 8), _randn(
        2, 3, 7, 8, device="meta"), _randn(2, 3, 7, 4)),
        lambda q, k, v, **k_: pykernels.scaled_dot_product_attention(q, k, v, **k_)),
}


def _outcome(make, call, backend):
    """("ok", output, gradients of the float inputs) or ("raised", type, message)."""
    torch.manual_seed(0)
    inputs = [t.requires_grad_() if t is not None and t.is_floating_point()
              and t.device.type == "cpu" else t for t in make()]
    torch.manual_seed(1)
    try:
        out = call(*inputs) if backend is None else call(*inputs, backend=backend)
    except Exception as error:
        return "raised", type(error), str(error)
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out)) if out.requires_grad else ()
    return "ok", out.detach(), grads


def _assert_same(case):
    family, make, call = case
    shortcut, full = (_outcome(make, call, backend) for backend in (None, "auto"))
    assert shortcut[0] == full[0], (shortcut, full)
    if shortcut[0] == "raised":
        assert shortcut[1:] == full[1:]
        return
    assert torch.equal(shortcut[1], full[1]) or (shortcut[1].isnan().all()
                                                  and full[1].isnan().all())
    assert len(shortcut[2]) == len(full[2])
    for a, b in zip(shortcut[2], full[2], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_calls_take_the_shortcut_and_match_the_full_way(monkeypatch, name):
    family, make, call = VALID[name]
    module = importlib.import_module(f"pykernels.ops.{MODULES[family]}")
    resolve = module.resolve

    def no_full_way(*args, **kwargs):
        raise AssertionError("the full way ran")

    monkeypatch.setattr(module, "resolve", no_full_way)
    torch.manual_seed(0)
    inputs = make()
    torch.manual_seed(1)
    call(*inputs)  # raises the AssertionError unless the shortcut took the call
    monkeypatch.setattr(module, "resolve", resolve)
    _assert_same(VALID[name])


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_calls_raise_what_the_full_way_raises(name):
    _assert_same(INVALID[name])


@pytest.mark.parametrize("name", ["linear_act-gelu", "linear_glu-silu",
                                  "linear_cross_entropy-mean", "attention"])
def test_under_cpu_autocast_the_shortcut_matches_the_full_way(name):
    """The full way casts the matmul operands to autocast's dtype itself; the shortcut
    leaves that to the torch functions, which autocast casts alike."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _assert_same(VALID[name])


def test_a_chosen_backend_or_environment_skips_the_shortcut(monkeypatch):
    """backend=, use_backend and PYKERNELS_BACKEND are the full way's to honour."""
    module = importlib.import_module("pykernels.ops.cross_entropy")
    seen = []
    resolve = module.resolve
    monkeypatch.setattr(module, "resolve", lambda *a: seen.append(a[0]) or resolve(*a))
    z, t = _randn(6, 5), _targets(6, 5)
    pykernels.cross_entropy(z, t, backend="torch")
    with pykernels.use_backend("torch"):
        pykernels.cross_entropy(z, t)
    monkeypatch.setenv("PYKERNELS_BACKEND", "torch")
    pykernels.cross_entropy(z, t)
    monkeypatch.delenv("PYKERNELS_BACKEND")
    pykernels.cross_entropy(z, t)  # the shortcut: resolve is not called
    assert seen == ["torch", None, None]
