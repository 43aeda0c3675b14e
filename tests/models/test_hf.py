"""pykernels.fuse on HuggingFace transformers models built from tiny configs (nothing is
downloaded), float64: the fused model against a deep copy of the unfused one — outputs,
losses, every parameter's gradient, training, padded batches, cached generation, state_dict
— and the "pykernels" attention and mask functions against transformers' own dense mask
with F.scaled_dot_product_attention."""

import copy
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from model_checks import assert_same_grads, grads

import pykernels

transformers = pytest.importorskip("transformers")
from transformers import masking_utils  # noqa: E402

from pykernels.integrations import transformers as hf  # noqa: E402

DT = torch.float64
VOCAB = 101
pytestmark = pytest.mark.usefixtures("cpu_backend_one_thread")

_SMALL = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 64, "bos_token_id": 1, "eos_token_id": 2,
          "pad_token_id": 0}


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2))


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**_SMALL))


def _mistral():  # GQA and a sliding window shorter than the sequences
    return transformers.MistralForCausalLM(transformers.MistralConfig(**_SMALL,
                                                                      sliding_window=4))


def _qwen2():  # biases on q, k, v
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_SMALL))


def _gemma2():  # sliding and full layers, attention and final logit softcaps, GeGLU
    return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        **_SMALL, head_dim=8, sliding_window=4, attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0, attn_implementation="eager"))


def _bert():
    return transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


MODELS = {"gpt2": _gpt2, "llama": _llama, "mistral": _mistral, "qwen2": _qwen2,
          "gemma2": _gemma2, "bert": _bert}
CAUSAL = ["gpt2", "llama", "mistral", "qwen2", "gemma2"]
# Gemma2 supports only eager attention among transformers' CPU implementations, and its
# softmax runs in float32 even for float64 models: the reference is float32-accurate there.
TOLERANCE = {"gemma2": {"rtol": 1e-6, "atol": 1e-7}}

EXPECTED_SWAPS = {
    "gpt2": ["", "lm_head", "transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"],
    "llama": ["", "lm_head", "model.layers.0.mlp", "model.layers.1.mlp"],
    "mistral": ["", "lm_head", "model.layers.0.mlp", "model.layers.1.mlp"],
    "qwen2": ["", "lm_head", "model.layers.0.mlp", "model.layers.1.mlp"],
    "gemma2": ["", "lm_head", "model.layers.0.mlp", "model.layers.1.mlp"],
    "bert": ["", "bert.encoder.layer.0.intermediate.dense",
             "bert.encoder.layer.1.intermediate.dense", "cls.predictions.transform.dense"],
}


def _pair(name, seed=0):
    """(fused, unfused): a tiny float64 model and a deep copy of it taken before fuse."""
    torch.manual_seed(seed)
    model = MODELS[name]().to(DT)
    reference = copy.deepcopy(model)
    fused = pykernels.fuse(model)
    assert fused is model
    return fused, reference


def _tokens(batch=2, length=11, seed=1):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _labels(ids):
    labels = ids.clone()
    labels[0, 4] = -100
    return labels


def _reference_loss(name, reference, ids, labels, mask=None):
    """The loss from the unfused model's logits, computed here in float64: a causal LM's
    next-token cross-entropy (transformers' own loss casts the logits to float32)."""
    if name == "bert":
        return reference(ids, attention_mask=mask, labels=labels).loss
    logits = reference(ids, attention_mask=mask).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                           ignore_index=-100)


@pytest.mark.parametrize("name", MODELS)
def test_outputs_loss_and_every_gradient(name):
    fused, reference = _pair(name)
    tol = TOLERANCE.get(name, {"rtol": 1e-10, "atol": 1e-12})
    report = pykernels.explain_fuse(copy.deepcopy(reference))
    assert [n for n, _, _ in report.swapped] == EXPECTED_SWAPS[name]
    assert fused.config._attn_implementation == "pykernels"
    ids = _tokens()
    labels = _labels(ids)
    torch.testing.assert_close(fused(ids).logits, reference(ids).logits, **tol)
    out = fused(ids, labels=labels)
    if name in CAUSAL:
        assert out.logits is None  # the fused loss never forms them
    loss = _reference_loss(name, reference, ids, labels)
    torch.testing.assert_close(out.loss, loss, **tol)
    out.loss.backward()
    loss.backward()
    assert_same_grads(grads(fused), grads(reference), **tol)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_training_with_an_optimizer_made_before_fuse(name):
    torch.manual_seed(0)
    model = MODELS[name]().to(DT)
    reference = copy.deepcopy(model)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, reference)]
    pykernels.fuse(model)
    ids = _tokens()
    history = []
    for step in range(20):
        losses = []
        for model_, optimizer in zip((model, reference), optimizers, strict=True):
            optimizer.zero_grad()
            loss = (model_(ids, labels=ids).loss if model_ is model
                    else _reference_loss(name, model_, ids, ids))
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-10), step
        history.append(losses[0])
    assert history[-1] < 0.5 * history[0]  # it fits the batch: the updates took effect


# Not gemma2 with left padding: its eager reference (the only one with softcaps) turns the
# fully masked rows of left padding into NaN, which then reach every row through p @ v.
@pytest.mark.parametrize("name, side", [(name, side) for name in MODELS
                                        for side in ("right", "left")
                                        if (name, side) != ("gemma2", "left")])
def test_padded_batches(name, side):
    """Padding reaches the kernel (transformers' mask interface): the valid positions match
    the unfused model's and, where padded keys are visible to them without the mask (left
    padding, or BERT), differ from the same tokens unpadded."""
    fused, reference = _pair(name)
    tol = TOLERANCE.get(name, {"rtol": 1e-10, "atol": 1e-12})
    ids = _tokens()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0 if side == "left" else 1
    mask[1, -3:] = 0 if side == "right" else 1
    valid = mask.bool()
    out = fused(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[valid], reference(ids, attention_mask=mask).logits[valid],
                               **tol)
    if side == "left" or name == "bert":
        assert not torch.allclose(out[1][valid[1]], fused(ids).logits[1][valid[1]])
    labels = ids.masked_fill(~valid, -100)
    loss = fused(ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(loss, _reference_loss(name, reference, ids, labels, mask), **tol)


@pytest.mark.parametrize("name", CAUSAL)
def test_generate_gives_the_same_tokens(name):
    """Greedy decoding with the KV cache: a prompt (left-padded row included, except for
    Gemma2: see test_padded_batches), then queries of length 1 against longer keys, past
    the sliding window."""
    fused, reference = _pair(name)
    ids = _tokens(length=7)
    mask = torch.ones_like(ids)
    if name != "gemma2":
        mask[1, :2] = 0
    kwargs = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False,
              "pad_token_id": 0}
    tokens = fused.generate(ids, **kwargs)
    assert tokens.shape == (2, 13)
    assert torch.equal(tokens, reference.generate(ids, **kwargs))


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_state_dict_parameters_and_ties(name):
    torch.manual_seed(0)
    model = MODELS[name]().to(DT)
    params = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pykernels.fuse(model)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert list(model.state_dict()) == list(state)
    if name == "gpt2":
        assert model.lm_head.weight is model.transformer.wte.weight
    plain = MODELS[name]().to(DT)
    plain.load_state_dict(model.state_dict(), strict=True)
    for key, value in plain.state_dict().items():
        assert torch.equal(value, state[key]), key
    model.load_state_dict(MODELS[name]().to(DT).state_dict(), strict=True)


def test_loss_options_num_items_shift_labels_and_tuples():
    """num_items_in_batch (gradient accumulation: sum / n; also against transformers' own
    ForCausalLMLoss, float32), shift_labels given, labels passed by position, and the
    return_dict=False tuple, against the cross-entropy of the unfused logits."""
    fused, reference = _pair("llama")
    ids = _tokens()
    labels = _labels(ids)
    logits = reference(ids).logits
    n = torch.tensor(7)
    expected = transformers.loss.loss_utils.ForCausalLMLoss(
        logits.to(DT), labels, VOCAB, num_items_in_batch=n)
    got = fused(ids, labels=labels, num_items_in_batch=n).loss
    torch.testing.assert_close(got, F.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum") / 7)
    torch.testing.assert_close(got.float(), expected, rtol=1e-6, atol=0)
    shifted = torch.roll(labels, 1, dims=1)
    torch.testing.assert_close(fused(ids, labels=labels, shift_labels=shifted).loss,
                               F.cross_entropy(logits.flatten(0, 1), shifted.flatten()))
    positional = fused(ids, None, None, None, None, labels).loss  # labels by position
    torch.testing.assert_close(positional, _reference_loss("llama", reference, ids, labels))
    as_tuple = fused(ids, labels=labels, return_dict=False)  # (loss, cache): no logits
    torch.testing.assert_close(as_tuple[0], _reference_loss("llama", reference, ids, labels))
    assert len(as_tuple) == len(fused(ids, return_dict=False))


def test_explain_fuse_is_a_dry_run_and_fuse_is_idempotent():
    torch.manual_seed(0)
    model = _gpt2().to(DT)
    types = [type(m) for m in model.modules()]
    report = pykernels.explain_fuse(model)
    assert report.model is model and len(report.swapped) == 4 and report.skipped == []
    assert [type(m) for m in model.modules()] == types
    assert model.config._attn_implementation == "sdpa"
    pykernels.fuse(model)
    assert pykernels.explain_fuse(model).swapped == []


def test_a_model_held_by_a_wrapper_is_fused_too():
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = _gpt2()

        def forward(self, ids, labels):
            return self.lm(ids, labels=labels).loss

    torch.manual_seed(0)
    wrapper = Wrapper().to(DT)
    reference = copy.deepcopy(wrapper.lm)
    report = pykernels.explain_fuse(wrapper)
    assert [name for name, _, _ in report.swapped] == [
        "lm", "lm.lm_head", "lm.transformer.h.0.mlp.c_fc", "lm.transformer.h.1.mlp.c_fc"]
    pykernels.fuse(wrapper)
    ids = _tokens()
    torch.testing.assert_close(wrapper(ids, ids), _reference_loss("gpt2", reference, ids, ids))
    assert wrapper.lm.config._attn_implementation == "pykernels"


def test_clip_mlp_quick_gelu_is_reported_gelu_is_fused():
    from transformers.models.clip.modeling_clip import CLIPMLP

    def mlp(act):
        torch.manual_seed(0)
        return CLIPMLP(transformers.CLIPTextConfig(hidden_size=16, intermediate_size=24,
                                                   hidden_act=act)).to(DT)

    quick = mlp("quick_gelu")
    report = pykernels.explain_fuse(quick)
    assert report.swapped == []
    assert report.skipped == [("fc1", "Linear+QuickGELUActivation",
                               "no fused kernel for QuickGELUActivation()")]
    gelu = mlp("gelu")
    reference = copy.deepcopy(gelu)
    pykernels.fuse(gelu)
    assert isinstance(gelu.fc1, pykernels.nn.Linear) and gelu.fc1.activation == "gelu"
    x = torch.randn(3, 5, 16, dtype=DT)
    torch.testing.assert_close(gelu(x), reference(x), rtol=1e-12, atol=1e-13)


# ---- the attention and mask functions on their own ------------------------------------------

MASK_CASES = [  # q_length, kv_length, q_offset, kv_offset, sliding window, padded keys
    (5, 5, 0, 0, None, 0),      # prefill
    (1, 9, 8, 0, None, 2),      # decoding, left padding
    (3, 12, 9, 0, 4, 0),        # window behind the cache's start: keys dropped
    (1, 4, 10, 7, 4, 1),        # sliding-window cache, full
    (6, 6, 0, 0, 4, 2),         # sliding prefill with padding
    (4, 7, 0, 0, "bidirectional", 2),
]


@pytest.mark.parametrize("case", MASK_CASES, ids=str)
def test_mask_layout_matches_transformers_dense_mask(case):
    q_length, kv_length, q_offset, kv_offset, window, padded = case
    batch, heads, kv_heads, dim = 2, 4, 2, 8
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, q_length, dim, generator=g, dtype=DT)
    k, v = (torch.randn(batch, kv_heads, kv_length, dim, generator=g, dtype=DT)
            for _ in range(2))
    attention_mask = torch.ones(batch, kv_offset + kv_length, dtype=torch.bool)
    attention_mask[1, kv_offset:kv_offset + padded] = False
    bidirectional = window == "bidirectional"
    local = None if bidirectional else window
    function = (masking_utils.bidirectional_mask_function if bidirectional
                else masking_utils.causal_mask_function if local is None
                else masking_utils.sliding_window_causal_mask_function(local))
    sizes = {"batch_size": batch, "q_length": q_length, "kv_length": kv_length,
             "q_offset": q_offset, "kv_offset": kv_offset, "mask_function": function,
             "attention_mask": attention_mask, "local_size": local}
    flags = {"allow_is_causal_skip": not bidirectional,
             "allow_is_bidirectional_skip": bidirectional}
    layout = hf.mask_interface(**sizes, **flags, config=SimpleNamespace(sliding_window=local))
    assert isinstance(layout, hf.MaskLayout)
    dense = masking_utils.sdpa_mask(**sizes, allow_is_causal_skip=False)
    out, weights = hf.attention_forward(SimpleNamespace(is_causal=True), q, k, v, layout,
                                        scaling=0.3)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=0.3,
                                              enable_gqa=True).transpose(1, 2)
    rows = dense.any(-1).squeeze(1)  # torch gives NaN where a query sees no key
    assert weights is None and out.shape == (batch, q_length, heads, dim)
    torch.testing.assert_close(out[rows], expected[rows], rtol=1e-12, atol=1e-13)


def test_other_mask_patterns_get_the_dense_mask():
    """Overlays (skips not allowed) and chunked attention (local_size is not the sliding
    window) get transformers' dense mask, not a layout."""
    sizes = {"batch_size": 1, "q_length": 4, "kv_length": 4}
    dense = hf.mask_interface(**sizes, allow_is_causal_skip=False)
    assert torch.equal(dense, masking_utils.sdpa_mask(**sizes, allow_is_causal_skip=False))
    chunked = hf.mask_interface(**sizes, local_size=2, config=SimpleNamespace(
        sliding_window=None), mask_function=masking_utils.chunked_causal_mask_function(
            2, torch.zeros(1, dtype=torch.long)))
    assert isinstance(chunked, torch.Tensor) and not chunked[0, 0, 2, 1]


def test_registered_implementation_is_selectable_by_name():
    """After register(), models take attn_implementation="pykernels" from their config, as
    from_pretrained would pass it; options without a fused equivalent raise."""
    hf.register()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **_SMALL, attn_implementation="pykernels")).to(DT)
    assert model.config._attn_implementation == "pykernels"
    reference = _llama().to(DT)
    reference.load_state_dict(model.state_dict())
    ids = _tokens()
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-10,
                               atol=1e-12)
    q = torch.randn(1, 2, 3, 4, dtype=DT)
    with pytest.raises(NotImplementedError, match="no option for position_bias"):
        hf.attention_forward(None, q, q, q, None, position_bias=q)


def test_import_pykernels_does_not_import_transformers():
    code = "import sys, pykernels; sys.exit('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
