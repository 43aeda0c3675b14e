"""pykernels.fuse: the converted model computes what the original did (float64 outputs and
every parameter's gradient), keeps its state_dict keys and Parameters, and reports what it
swapped and what it skipped, and why."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import pairwise
from model_checks import assert_same_grads, assert_same_state, grads
from torch import nn

import pykernels
from pykernels import models
from pykernels.models import reference

DT = torch.float64


pytestmark = pytest.mark.usefixtures("cpu_backend_one_thread")


def outputs_and_grads(model, *inputs, loss=None):
    """(output, grads) after backward of ``loss(output)`` or of a fixed random projection."""
    model.zero_grad(set_to_none=True)
    out = model(*inputs)
    if loss is None:
        g = torch.Generator().manual_seed(7)
        loss = lambda y: (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum()
    loss(out).backward()
    return out.detach(), grads(model)


def assert_fused_matches(model, *inputs, loss=None, expect_swaps=None):
    """fuse(model) gives what model gave before (output and gradients) under the same
    state_dict keys, and did what explain_fuse said it would; returns (fused, report)."""
    keys = list(model.state_dict())
    out, g = outputs_and_grads(model, *inputs, loss=loss)
    report = pykernels.explain_fuse(model)
    fused = pykernels.fuse(model)
    assert pykernels.explain_fuse(fused).swapped == []  # everything it listed was swapped
    out_f, g_f = outputs_and_grads(fused, *inputs, loss=loss)
    torch.testing.assert_close(out_f, out, rtol=1e-12, atol=1e-13)
    assert_same_grads(g_f, g)
    assert list(fused.state_dict()) == keys
    if expect_swaps is not None:
        assert [(name, new) for name, _, new in report.swapped] == expect_swaps
    return fused, report


# ---- Linear + activation in a Sequential ---------------------------------------------------

ACTS = [(nn.ReLU(), "relu"), (nn.GELU(), "gelu"), (nn.GELU(approximate="tanh"), "gelu_tanh"),
        (nn.SiLU(), "silu"), (nn.Sigmoid(), "sigmoid"), (nn.Tanh(), "tanh"),
        (nn.LeakyReLU(0.2), "leaky_relu")]


def test_sequential_mlp_every_activation():
    torch.manual_seed(0)
    layers = []
    for act, _ in ACTS:
        layers += [nn.Linear(9, 9), act]
    model = nn.Sequential(*layers, nn.Dropout(0.0), nn.Linear(9, 4)).to(DT)
    expected = [(str(2 * i), f"pykernels.nn.Linear(activation={name}) + Identity")
                for i, (_, name) in enumerate(ACTS)]
    fused, report = assert_fused_matches(model, torch.randn(11, 9, dtype=DT),
                                         expect_swaps=expected)
    assert fused[12].activation == "leaky_relu" and fused[12].negative_slope == 0.2
    assert all(isinstance(fused[2 * i + 1], nn.Identity) for i in range(len(ACTS)))
    assert type(fused[15]) is nn.Linear  # a Linear with no activation after it stays
    assert report.skipped == []


def test_parameters_are_shared_not_copied():
    """inplace=True keeps the Parameter objects: an optimizer made before fuse still trains
    the fused model; the replaced modules are not modified."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).to(DT)
    params = list(model.parameters())
    old_linear, old_act = model[0], model[1]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert pykernels.fuse(model) is model and isinstance(model[0], pykernels.nn.Linear)
    assert all(p is q for p, q in zip(model.parameters(), params, strict=True))
    assert type(old_linear) is nn.Linear and isinstance(old_act, nn.ReLU)
    before = model[0].weight.detach().clone()
    model(torch.randn(3, 4, dtype=DT)).sum().backward()
    opt.step()
    assert not torch.equal(model[0].weight, before)


def test_inplace_false_leaves_the_original_untouched():
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.MultiheadAttention(8, 2)).to(DT)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fused = pykernels.fuse(model, inplace=False)
    assert fused is not model
    assert [type(m) for m in model] == [nn.Linear, nn.GELU, nn.MultiheadAttention]
    assert not any(p is q for p in model.parameters() for q in fused.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])
    assert_same_state(fused, model)


# ---- attention, losses, Transformer layers -------------------------------------------------

def test_multihead_attention_and_cross_entropy_in_a_container():
    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(6, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 5))
            self.loss = nn.CrossEntropyLoss(weight=torch.rand(5) + 0.5, label_smoothing=0.1,
                                            ignore_index=2)

        def forward(self, x, y):
            h = self.embed(x)
            h = self.attn(h, h, h, need_weights=False)[0]
            return self.loss(self.head(h).flatten(0, 1), y.flatten())

    torch.manual_seed(0)
    model = Classifier().to(DT)
    x, y = torch.randn(3, 5, 6, dtype=DT), torch.randint(0, 5, (3, 5))
    fused, _ = assert_fused_matches(model, x, y, loss=lambda out: out, expect_swaps=[
        ("attn", "pykernels.nn.MultiheadAttention"),
        ("head.0", "pykernels.nn.Linear(activation=silu) + Identity"),
        ("loss", "pykernels.nn.CrossEntropyLoss")])
    loss = fused.loss
    assert (loss.label_smoothing, loss.ignore_index) == (0.1, 2)
    assert loss.weight is model.loss.weight and torch.equal(loss.weight, model.loss.weight)


def test_bare_multihead_attention_root_is_replaced():
    mha = nn.MultiheadAttention(8, 2).to(DT)
    q = torch.randn(5, 3, 8, dtype=DT)
    report = pykernels.explain_fuse(mha)
    assert report.swapped == [("", "MultiheadAttention", "pykernels.nn.MultiheadAttention")]
    fused = pykernels.fuse(mha)
    assert type(mha) is nn.MultiheadAttention  # a root cannot be rebound: fuse returns it
    assert isinstance(fused, pykernels.nn.MultiheadAttention)
    torch.testing.assert_close(fused(q, q, q, need_weights=False)[0],
                               mha(q, q, q, need_weights=False)[0], rtol=1e-12, atol=1e-13)


LAYER_CASES = pairwise({"norm_first": [False, True], "batch_first": [False, True],
                        "activation": ["relu", "gelu", "relu-module", "gelu-module"]})


def _activation(name):
    return {"relu-module": nn.ReLU(), "gelu-module": nn.GELU()}.get(name, name)


def _sequences(batch_first, *lengths, batch=2, dim=12):
    shape = (lambda n: (batch, n, dim)) if batch_first else (lambda n: (n, batch, dim))
    return [torch.randn(shape(n), dtype=DT) for n in lengths]


@pytest.mark.parametrize("case", LAYER_CASES, ids=str)
def test_transformer_encoder_layer(case):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(12, 3, 20, dropout=0.0, norm_first=case["norm_first"],
                                       batch_first=case["batch_first"],
                                       activation=_activation(case["activation"])).to(DT)
    (src,) = _sequences(case["batch_first"], 7)
    causal = torch.ones(7, 7, dtype=torch.bool).triu(1)  # as the padding mask: torch warns on mixed
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 5:] = True
    fused = pykernels.fuse(layer, inplace=False)
    assert_fused_matches(fused, src, causal, None, True)  # is_causal hint
    fused, _ = assert_fused_matches(layer, src, causal, padding, expect_swaps=[
        ("", "pykernels.nn.TransformerEncoderLayer")])
    assert isinstance(fused.self_attn, pykernels.nn.MultiheadAttention)


@pytest.mark.parametrize("case", LAYER_CASES, ids=str)
def test_transformer_decoder_layer(case):
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(12, 3, 20, dropout=0.0, norm_first=case["norm_first"],
                                       batch_first=case["batch_first"],
                                       activation=_activation(case["activation"])).to(DT)
    tgt, memory = _sequences(case["batch_first"], 6, 9)
    causal = nn.Transformer.generate_square_subsequent_mask(6, dtype=DT)
    memory_padding = torch.zeros(2, 9, dtype=torch.bool)
    memory_padding[0, 7:] = True
    fused, _ = assert_fused_matches(layer, tgt, memory, causal, None, None, memory_padding,
                                    expect_swaps=[("", "pykernels.nn.TransformerDecoderLayer")])
    assert isinstance(fused.multihead_attn, pykernels.nn.MultiheadAttention)


def test_decoder_layer_copy_keeps_what_torch_copies():
    """torch's TransformerDecoderLayer.__setstate__ adds ``activation = F.relu`` to the
    instance dict unless the pickled dict holds it, which a module activation (kept in
    _modules) never does: a deep copy of a layer built with nn.GELU() runs relu (so does every
    layer of an nn.TransformerDecoder, which deep-copies its layer). fuse(inplace=False)
    deep-copies too, and its fused layer computes what torch's copy computes."""
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(12, 3, 20, dropout=0.0, activation=nn.GELU()).to(DT)
    tgt, memory = _sequences(False, 6, 9)
    fused = pykernels.fuse(layer, inplace=False)
    assert fused.fused_activation == "relu"
    torch.testing.assert_close(fused(tgt, memory), copy.deepcopy(layer)(tgt, memory),
                               rtol=1e-12, atol=1e-13)


def test_inference_bypasses_torch_fast_path(monkeypatch):
    """In eval under no_grad torch's encoder layer runs its own fused kernel
    (torch._transformer_encoder_layer_fwd); the converted layer runs pykernels' and agrees."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(12, 4, 20, batch_first=True).to(DT).eval()
    fused = pykernels.fuse(layer, inplace=False)
    calls = []
    attention = pykernels.nn.attention.scaled_dot_product_attention
    monkeypatch.setattr(pykernels.nn.attention, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or attention(*a, **k))
    (src,) = _sequences(True, 7)
    with torch.no_grad():
        torch.testing.assert_close(fused(src), layer(src), rtol=1e-12, atol=1e-13)
    assert calls == [1]


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
def test_encoder_stack_nested_tensor_inference_path():
    """torch.nn.TransformerEncoder turns padded input into a nested tensor in inference; the
    fused layers hand nested input to torch's forward, so the results stay the original's."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(12, 4, 20, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).to(DT).eval()
    assert [name for name, _, _ in pykernels.explain_fuse(encoder).swapped] == ["layers.0",
                                                                                "layers.1"]
    fused = pykernels.fuse(encoder, inplace=False)
    (src,) = _sequences(True, 7)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[0, 4:] = True
    with torch.no_grad():
        torch.testing.assert_close(fused(src, src_key_padding_mask=padding),
                                   encoder(src, src_key_padding_mask=padding),
                                   rtol=1e-12, atol=1e-13)


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True:UserWarning")
def test_full_torch_transformer():
    torch.manual_seed(0)
    model = nn.Transformer(12, 2, num_encoder_layers=1, num_decoder_layers=1,
                           dim_feedforward=16, dropout=0.0, norm_first=True).to(DT)
    src, tgt = _sequences(False, 7, 5)
    _, report = assert_fused_matches(model, src, tgt)
    assert [name for name, _, _ in report.swapped] == ["encoder.layers.0",
                                                       "decoder.layers.0"]


def test_reference_models_fuse_into_the_fused_models():
    """fuse of a pykernels.models.reference model has the fused model's layers and keys.
    Beside the model classes (they differ in their losses, functions fuse cannot see), only
    the bare linears differ: fuse leaves a Linear with no activation after it as it is."""

    def layers(model):
        bare = lambda m: isinstance(m, pykernels.nn.Linear) and m.activation == "none"
        return [nn.Linear if bare(m) else type(m) for m in model.modules()
                if not type(m).__module__.startswith("pykernels.models")]

    for name, args in (("MLP", (5, [8, 8], 3)), ("Transformer", (11, 8, 2, 2, 6))):
        ref = getattr(reference, name)(*args)
        fused = pykernels.fuse(ref, inplace=False)
        built = getattr(models, name)(*args)
        assert layers(fused) == layers(built)
        assert list(fused.state_dict()) == list(built.state_dict())


# ---- what is left alone --------------------------------------------------------------------

def test_skipped_cases_carry_reasons():
    class MyLinear(nn.Linear):
        pass

    class MyAttention(nn.MultiheadAttention):
        pass

    hooked = nn.Linear(4, 4)
    hooked.register_forward_hook(lambda m, i, o: None)
    custom = nn.TransformerEncoderLayer(8, 2, 16, activation=lambda x: x * torch.sigmoid(x))
    model = nn.ModuleDict({
        "softplus": nn.Sequential(nn.Linear(4, 4), nn.Softplus()),
        "subclass": nn.Sequential(MyLinear(4, 4), nn.ReLU()),
        "hooked": nn.Sequential(hooked, nn.Tanh()),
        "attn": MyAttention(8, 2),
        "custom": custom,
        "plain": nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.ReLU()),
    })
    report = pykernels.explain_fuse(model)
    pykernels.fuse(model)
    skipped = {name: (kind, reason) for name, kind, reason in report.skipped}
    assert set(skipped) == {"softplus.0", "subclass.0", "hooked.0", "attn", "custom"}
    assert "no fused kernel for Softplus" in skipped["softplus.0"][1]
    assert skipped["subclass.0"] == ("MyLinear+ReLU", "MyLinear is a subclass of Linear: its "
                                                      "forward may differ")
    assert "hooks" in skipped["hooked.0"][1]
    assert skipped["attn"] == ("MyAttention", "subclass of MultiheadAttention: its forward "
                                              "may differ")
    assert "has no fused kernel; only its attention is fused" in skipped["custom"][1]
    # the custom-activation layer stays torch's, with its attention fused
    assert report.swapped == [("custom.self_attn", "MultiheadAttention",
                               "pykernels.nn.MultiheadAttention")]
    assert type(model["custom"]) is nn.TransformerEncoderLayer
    assert type(model["plain"][0]) is nn.Linear  # not directly followed by its activation
    text = str(report)
    assert text.splitlines()[0] == "fuse: 1 swapped, 5 skipped"
    assert "skipped custom (TransformerEncoderLayer): activation" in text


def test_custom_activation_layer_still_matches():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0,
                                       activation=lambda x: x * torch.sigmoid(x)).to(DT)
    (src,) = _sequences(False, 5, dim=8)
    assert_fused_matches(layer, src, expect_swaps=[("self_attn",
                                                    "pykernels.nn.MultiheadAttention")])


def test_shared_modules_and_second_fuse():
    shared = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    model = nn.Sequential(shared, shared, nn.Linear(4, 2)).to(DT)
    assert [name for name, _, _ in pykernels.explain_fuse(model).swapped] == ["0.0"]
    pykernels.fuse(model)
    assert model[0] is model[1]  # converted once, rebound in both places
    assert pykernels.explain_fuse(model).swapped == []  # already fused


def test_functional_activation_in_layers():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation=F.silu).to(DT)
    (src,) = _sequences(False, 5, dim=8)
    fused, _ = assert_fused_matches(layer, src)
    assert fused.fused_activation == "silu"


def test_fused_layers_built_directly():
    """The fused layers take torch's constructor arguments and initialise as torch does."""
    for fused_cls, torch_cls, inputs in (
            (pykernels.nn.TransformerEncoderLayer, nn.TransformerEncoderLayer, 1),
            (pykernels.nn.TransformerDecoderLayer, nn.TransformerDecoderLayer, 2)):
        built = []
        for cls in (fused_cls, torch_cls):
            torch.manual_seed(0)
            built.append(cls(8, 2, 16, dropout=0.0, activation="gelu", norm_first=True,
                             dtype=DT))
        fused, plain = built
        assert isinstance(fused.self_attn, pykernels.nn.MultiheadAttention)
        assert_same_state(fused, plain)
        args = _sequences(False, 5, 6, dim=8)[:inputs]
        torch.testing.assert_close(fused(*args), plain(*args), rtol=1e-12, atol=1e-13)


def test_not_a_module():
    with pytest.raises(TypeError, match="module must be a torch.nn.Module, got function"):
        pykernels.fuse(lambda x: x)
    with pytest.raises(TypeError, match="module must be a torch.nn.Module, got int"):
        pykernels.explain_fuse(3)
    with pytest.raises(TypeError, match="layer must be a torch.nn.modules"):
        pykernels.nn.TransformerEncoderLayer.from_torch(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="attention must be"):
        pykernels.nn.MultiheadAttention.from_torch(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="activation must be"):
        pykernels.nn.TransformerEncoderLayer(8, 2, activation=torch.nn.ELU())


# ---- pairs held as attributes (torch.fx), gated MLPs, need_weights, the report --------------

class AttributeMLP(nn.Module):
    """fc2(act(fc1(x))) with the layers held as attributes, in a residual block."""

    def __init__(self, act, width=12):
        super().__init__()
        self.norm = nn.LayerNorm(6)
        self.fc1 = nn.Linear(6, width)
        self.act = act
        self.fc2 = nn.Linear(width, 6)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


def test_attribute_held_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(AttributeMLP(nn.GELU(approximate="tanh")),
                          AttributeMLP(nn.LeakyReLU(0.3))).to(DT)
    fused, report = assert_fused_matches(model, torch.randn(4, 5, 6, dtype=DT), expect_swaps=[
        ("0.fc1", "pykernels.nn.Linear(activation=gelu_tanh) + Identity"),
        ("1.fc1", "pykernels.nn.Linear(activation=leaky_relu) + Identity")])
    assert isinstance(fused[0].act, nn.Identity) and fused[1].fc1.negative_slope == 0.3
    assert report.skipped == []


class UsesPreactivation(AttributeMLP):
    def forward(self, x):
        h = self.fc1(self.norm(x))
        return self.fc2(self.act(h)) + h.sum(-1, keepdim=True)


class CallsTwice(AttributeMLP):
    def forward(self, x):
        x = self.norm(x)
        return self.fc2(self.act(self.fc1(x))) + self.fc1(x)[..., :6]


class DataDependent(AttributeMLP):
    def forward(self, x):
        if x.sum() > 0:  # torch.fx cannot trace a branch on a value
            x = -x
        return self.fc2(self.act(self.fc1(self.norm(x))))


def test_attribute_pairs_that_are_not_fused_are_reported():
    torch.manual_seed(0)
    model = nn.ModuleDict({"pre": UsesPreactivation(nn.ReLU()), "twice": CallsTwice(nn.ReLU()),
                           "branch": DataDependent(nn.ReLU()),
                           "softplus": AttributeMLP(nn.Softplus())}).to(DT)
    report = pykernels.explain_fuse(model)
    assert report.swapped == []
    skipped = {name: reason for name, _, reason in report.skipped}
    assert skipped["pre.fc1"] == "forward also uses fc1's output before the activation"
    assert skipped["twice.fc1"] == "fc1 is called more than once in forward"
    assert skipped["branch"].startswith("has linear and activation children but torch.fx "
                                        "cannot trace its forward (TraceError")
    assert skipped["softplus.fc1"] == "no fused kernel for Softplus(beta=1.0, threshold=20.0)"
    assert len(skipped) == 4
    x = torch.randn(3, 6, dtype=DT)
    for block in model.values():
        assert_fused_matches(block, x, expect_swaps=[])


class SwiGLU(nn.Module):
    def __init__(self, names=("gate_proj", "up_proj", "down_proj"), bias=False):
        super().__init__()
        self.names = names
        for name, (n_in, n_out) in zip(names, ((8, 20), (8, 20), (20, 8)), strict=True):
            setattr(self, name, nn.Linear(n_in, n_out, bias=bias))
        self.act_fn = nn.SiLU()

    def forward(self, x):
        gate, up, down = (getattr(self, name) for name in self.names)
        return down(self.act_fn(gate(x)) * up(x))


@pytest.mark.parametrize("bias", [False, True])
def test_gated_mlp_becomes_gated_mlp(bias):
    torch.manual_seed(0)
    model = nn.Sequential(SwiGLU(bias=bias), nn.Linear(8, 3)).to(DT)
    fused, _ = assert_fused_matches(model, torch.randn(5, 7, 8, dtype=DT), expect_swaps=[
        ("0", "pykernels.nn.GatedMLP(activation=silu)")])
    assert type(fused[0]) is pykernels.nn.GatedMLP


def test_gated_mlp_with_other_names_fuses_only_its_gate():
    """Not a GatedMLP (its state_dict keys would change), reported; its gate and activation
    still fuse as a pair."""
    torch.manual_seed(0)
    model = SwiGLU(names=("w1", "w3", "w2")).to(DT)
    _, report = assert_fused_matches(model, torch.randn(5, 8, dtype=DT), expect_swaps=[
        ("w1", "pykernels.nn.Linear(activation=silu) + Identity")])
    assert report.skipped == [("", "SwiGLU", "gated MLP with children ('w1', 'w3', 'w2'): "
                                             "GatedMLP keeps the names gate_proj, up_proj, "
                                             "down_proj")]


def test_need_weights_warns_once_and_the_report_says_so():
    torch.manual_seed(0)
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2, batch_first=True)}).to(DT)
    plain = copy.deepcopy(model)
    report = pykernels.explain_fuse(model)
    assert report.notes == [("attn", pykernels.convert._MHA_NOTE)]
    assert "need_weights=False" in str(report)
    pykernels.fuse(model)
    x = torch.randn(2, 5, 8, dtype=DT)
    with pytest.warns(UserWarning, match="need_weights=True runs PyTorch's attention"):
        out, weights = model["attn"](x, x, x)
    torch.testing.assert_close(out, plain["attn"](x, x, x)[0], rtol=1e-12, atol=1e-13)
    assert weights is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model["attn"](x, x, x)  # once per module
        model["attn"](x, x, x, need_weights=False)


def test_verbose_prints_the_report(capsys):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    text = str(pykernels.explain_fuse(model))
    assert pykernels.fuse(model, verbose=True) is model
    assert capsys.readouterr().out == text + "\n"
    assert text.splitlines()[0] == "fuse: 1 swapped, 0 skipped"
