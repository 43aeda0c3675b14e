"""pykernels.models against their plain torch.nn twins (pykernels.models.reference).

Float64 on the cpu backend: the fused and reference models, loaded with one state_dict,
give the same outputs, losses and every parameter's gradient to rounding, and train along
the same loss curve. One small Transformer case runs the triton backend (interpreter).
"""

import pytest
import torch
from conftest import cpu_kernel_backends
from model_checks import assert_same_grads, assert_same_state, grads

import pykernels
from pykernels import models
from pykernels.models import reference

DT = torch.float64


pytestmark = pytest.mark.usefixtures("cpu_backend_one_thread")


def twins(name, *args, seed=0, **kwargs):
    """(fused, reference) model ``name`` in float64, each built under the same seed."""
    built = []
    for family in (models, reference):
        torch.manual_seed(seed)
        built.append(getattr(family, name)(*args, **kwargs).to(DT))
    return built


def run(model, *inputs):
    """(output or logits, loss, grads): backward of the loss, or of a fixed random
    projection of the output when there is no loss."""
    model.zero_grad(set_to_none=True)
    out = model(*inputs)
    out, loss = out if isinstance(out, tuple) else (out, None)
    if loss is None:
        g = torch.Generator().manual_seed(99)
        (out * torch.randn(out.shape, generator=g, dtype=DT)).sum().backward()
    else:
        loss.backward()
    return out, loss, grads(model)


def tokens(batch, length, vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


# ---- the twins agree -----------------------------------------------------------------------

def test_twins_same_init_and_names():
    for name, args in (("MLP", (13, [17, 9], 5)), ("TransformerBlock", (16, 4)),
                       ("Transformer", (11, 16, 2, 2, 8))):
        fused, ref = twins(name, *args)
        assert_same_state(fused, ref)
        assert [n for n, _ in fused.named_parameters()] == \
            [n for n, _ in ref.named_parameters()]


@pytest.mark.parametrize("hidden, activation", [
    (23, "relu"), ([31, 17], "gelu"), ([8, 8, 8], "gelu_tanh"), ([19], "silu"),
    ([7, 5], "sigmoid"), (12, "tanh"), ([9, 6], "leaky_relu")])
def test_mlp_matches_reference(hidden, activation):
    fused, ref = twins("MLP", 13, hidden, 5, activation=activation)
    x = torch.randn(37, 13, dtype=DT)
    y = torch.randint(0, 5, (37,))
    y[3] = -100  # ignored, as in F.cross_entropy
    logits, loss, g = run(fused, x, y)
    logits_ref, loss_ref, g_ref = run(ref, x, y)
    torch.testing.assert_close(logits, logits_ref, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-13)
    assert_same_grads(g, g_ref)
    out, no_loss, g = run(fused, x)
    assert no_loss is None
    assert_same_grads(g, run(ref, x)[2])


@pytest.mark.parametrize("causal", [False, True])
def test_block_matches_reference(causal):
    fused, ref = twins("TransformerBlock", 24, 3, ff_dim=40, causal=causal, activation="silu")
    x = torch.randn(3, 7, 24, dtype=DT)
    out, _, g = run(fused, x)
    out_ref, _, g_ref = run(ref, x)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-13)
    assert_same_grads(g, g_ref)


@pytest.mark.parametrize("causal, tie", [(True, True), (False, False), (True, False)])
def test_transformer_matches_reference(causal, tie):
    fused, ref = twins("Transformer", 29, 16, 2, 2, 9, causal=causal, tie_weights=tie)
    idx, targets = tokens(3, 9, 29), tokens(3, 9, 29, seed=2)
    targets[0, :2] = -100
    logits, loss, g = run(fused, idx, targets)
    logits_ref, loss_ref, g_ref = run(ref, idx, targets)
    assert logits is None  # the fused loss never forms the logits
    assert logits_ref.shape == (27, 29)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-13)
    assert_same_grads(g, g_ref)
    assert (fused.lm_head.weight is fused.tok_emb.weight) == tie
    out, _, g = run(fused, idx)
    out_ref, _, g_ref = run(ref, idx)
    assert out.shape == (3, 9, 29)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-13)
    assert_same_grads(g, g_ref)


def test_causal_transformer_ignores_the_future():
    fused, _ = twins("Transformer", 13, 16, 2, 1, 8)
    idx = tokens(2, 8, 13)
    changed = idx.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 13
    torch.testing.assert_close(fused(idx)[0][:, :5], fused(changed)[0][:, :5])


@pytest.mark.skipif("triton" not in cpu_kernel_backends(), reason="needs the Triton interpreter")
@pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
def test_transformer_triton_backend():
    fused, ref = twins("Transformer", 7, 16, 2, 1, 4, ff_dim=16)
    idx, targets = tokens(2, 4, 7), tokens(2, 4, 7, seed=2)
    with pykernels.use_backend("triton"):
        _, loss, g = run(fused, idx, targets)
    _, loss_ref, g_ref = run(ref, idx, targets)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-13)
    assert_same_grads(g, g_ref)


# ---- state_dict, dropout, bad input --------------------------------------------------------

@pytest.mark.parametrize("name, args", [("MLP", (13, [17, 9], 5)),
                                        ("TransformerBlock", (16, 4)),
                                        ("Transformer", (11, 16, 2, 2, 8))])
def test_state_dict_round_trips(name, args):
    fused, ref = twins(name, *args, seed=0)
    other_fused, other_ref = twins(name, *args, seed=1)
    other_fused.load_state_dict(ref.state_dict(), strict=True)
    assert_same_state(other_fused, ref)
    other_ref.load_state_dict(fused.state_dict(), strict=True)
    assert_same_state(other_ref, fused)


def test_dropout_train_and_eval():
    fused, ref = twins("Transformer", 13, 16, 2, 2, 8, dropout=0.3)
    idx, targets = tokens(4, 8, 13), tokens(4, 8, 13, seed=2)
    _, loss, g = run(fused, idx, targets)  # training mode: dropout in every block
    assert torch.isfinite(loss) and all(v is not None for v in g.values())
    assert fused(idx)[0].ne(fused(idx)[0]).any()
    fused.eval()
    ref.eval()
    first = fused(idx)[0]
    torch.testing.assert_close(fused(idx)[0], first, rtol=0, atol=0)
    torch.testing.assert_close(first, ref(idx)[0], rtol=1e-12, atol=1e-13)
    mlp, mlp_ref = twins("MLP", 6, [32, 32], 3, dropout=0.5)
    x = torch.randn(9, 6, dtype=DT)
    assert mlp(x)[0].ne(mlp(x)[0]).any()
    mlp.eval()
    mlp_ref.eval()
    torch.testing.assert_close(mlp(x)[0], mlp_ref(x)[0], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("build, error, match", [
    (lambda: models.MLP(0, 8, 2), ValueError, "in_features"),
    (lambda: models.MLP(4, [8, -1], 2), ValueError, r"hidden_features\[i\]"),
    (lambda: models.MLP(4, 8.5, 2), ValueError, "hidden_features"),
    (lambda: models.MLP(4, 8, 2, activation="swish"), ValueError, "activation"),
    (lambda: models.MLP(4, 8, 2, dropout=1.0), ValueError, "dropout"),
    (lambda: models.TransformerBlock(10, 3), ValueError, "divisible by n_heads"),
    (lambda: models.TransformerBlock(8, 2, ff_dim=0), ValueError, "ff_dim"),
    (lambda: models.Transformer(0, 8, 2, 1, 4), ValueError, "vocab_size"),
    (lambda: models.Transformer(5, 8, 2, 1, None), ValueError, "max_seq_len"),
])
def test_bad_arguments(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_bad_inputs():
    model = models.Transformer(11, 8, 2, 1, max_seq_len=6)
    with pytest.raises(ValueError, match=r"idx has length 7, more than max_seq_len \(6\)"):
        model(torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(TypeError, match="idx must be"):
        model(torch.zeros(2, 6))
    with pytest.raises(TypeError, match="idx must be"):
        model(torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="targets must be"):
        model(torch.zeros(2, 6, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="target"):  # out-of-range class, from the fused loss
        model(torch.zeros(2, 6, dtype=torch.long), torch.full((2, 6), 11))


# ---- training ------------------------------------------------------------------------------

def loss_curve(model, batches, steps):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    curve = []
    for step in range(steps):
        inputs = batches[step % len(batches)]
        opt.zero_grad(set_to_none=True)
        loss = model(*inputs)[1]
        loss.backward()
        opt.step()
        curve.append(loss.item())
    return torch.tensor(curve, dtype=DT)


@pytest.mark.parametrize("name", ["MLP", "Transformer"])
def test_training_parity(name):
    """200 AdamW steps from one init on a learnable task (MLP: a fixed random labelling;
    Transformer: next token = current + 1 mod V): the curves coincide to float64 noise."""
    g = torch.Generator().manual_seed(5)
    if name == "MLP":
        fused, ref = twins("MLP", 10, [32, 32], 4, activation="gelu")
        x = torch.randn(4, 24, 10, generator=g, dtype=DT)
        batches = [(xb, (xb[:, 0] > 0).long() + 2 * (xb[:, 1] > 0).long()) for xb in x]
    else:
        fused, ref = twins("Transformer", 12, 16, 2, 2, 8)
        idx = torch.randint(0, 12, (4, 6, 8), generator=g)
        batches = [(ib, (ib + 1) % 12) for ib in idx]
    curve = loss_curve(fused, batches, 200)
    curve_ref = loss_curve(ref, batches, 200)
    assert (curve - curve_ref).abs().max() < 1e-8, (curve - curve_ref).abs().max()
    assert curve[-10:].mean() < 0.5 * curve[:10].mean()
    for (name_f, p), (_, q) in zip(fused.named_parameters(), ref.named_parameters(),
                                   strict=True):
        torch.testing.assert_close(p, q, rtol=1e-7, atol=1e-9, msg=name_f)


# ---- torch.compile -------------------------------------------------------------------------

def test_transformer_training_step_compiles_fullgraph():
    """Forward and backward of the fused Transformer's loss under
    torch.compile(fullgraph=True) (a graph break raises) give eager's loss and gradients."""
    torch._dynamo.reset()
    model, _ = twins("Transformer", 13, 16, 2, 2, 8)
    idx, targets = tokens(2, 8, 13), tokens(2, 8, 13, seed=2)
    _, loss, g = run(model, idx, targets)
    compiled = torch.compile(lambda i, t: model(i, t)[1], fullgraph=True)
    model.zero_grad(set_to_none=True)
    compiled_loss = compiled(idx, targets)
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-12, atol=1e-13)
    assert_same_grads(grads(model), g)
