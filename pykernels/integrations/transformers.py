"""HuggingFace transformers models on pykernels' fused ops, through :func:`pykernels.fuse`.

Imported by ``fuse`` only when transformers already is (``import pykernels`` never imports
transformers). Importing it registers transformers' ``Conv1D`` (GPT-2's linear layer,
weight stored as ``(in, out)``) and its activation modules with ``pykernels.convert``, so
their MLPs fuse like torch's (``NewGELUActivation``/``FastGELUActivation``/
``AccurateGELUActivation``/``GELUTanh`` -> gelu_tanh, ``GELUActivation`` -> gelu,
``SiLUActivation`` -> silu; ``QuickGELUActivation``, ``ClippedGELUActivation``, ``Mish``,
``ReLUSquared``, ... have no kernel and are reported). ``fuse`` on a ``PreTrainedModel``
(or a module holding one) then also

- switches attention to ``"pykernels"``: :func:`attention_forward` registered with
  transformers' ``AttentionInterface`` and :func:`mask_interface` with its
  ``AttentionMaskInterface``, set with ``model.set_attn_implementation``. The mask function
  hands the attention function a :class:`MaskLayout` (causal or not, the query's offset
  in the keys, the sliding window, the (B, S) padding) instead of a dense (B, 1, L, S)
  mask wherever transformers itself would accept no mask at all, so causal, sliding-window
  and cached (query shorter than the keys) attention run on the fused op's ``window``
  option, padding as a (B, 1, 1, S) mask, GQA without repeating K/V, and Gemma2's
  ``attn_logit_softcapping`` on its ``softcap``. Other patterns (image-token overlays,
  packed sequences, chunked attention, static caches) get transformers' own dense mask.
- for a causal LM in :data:`CAUSAL_LMS`, computes the loss of a forward given ``labels``
  with :func:`pykernels.linear_cross_entropy` on the final hidden states and the LM head
  weight, never forming the logits (the output's ``logits`` is None then; without labels
  the logits come back as before). The hook: forward pre/post hooks on the model and the LM
  head swapped for :class:`LMHead` (an ``nn.Linear`` sharing its Parameters, so ties and
  state_dict keys stay). With labels, the pre-hook takes them out of the call and arms the
  head, which records its input and returns an empty ``(..., 0)`` placeholder instead of
  the logits; the post-hook computes the loss from the recorded hidden states. The model's
  own forward therefore still prepares every input its way; the price is a registry,
  since post-processing of the logits between the head and the loss (a scale, a softcap)
  must be known: ``CAUSAL_LMS`` maps each supported class to the config attribute of its
  final logit softcap (or None), and a model whose logits are not the head's output
  raises instead of training on a wrong loss. The loss follows transformers'
  ``ForCausalLMLoss``: labels shifted left (or ``shift_labels`` as given), ``ignore_index``
  (-100), mean over non-ignored tokens, or sum / ``num_items_in_batch`` when given
  (gradient accumulation). Unlike transformers, which casts the logits to float32, the
  loss has the model's precision: a float64 model's stays float64, and an fp16/bf16 model's
  is the op's fp32 reduction rounded to 16 bits (then returned as float32, transformers'
  dtype): up to 2^-9 relative off transformers' value (about 0.01 at a loss of 4), where a
  float32 result would need reduction="none", whose backward recomputes the logits.
"""

import inspect

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import activations as hf_activations
from transformers import masking_utils
from transformers.pytorch_utils import Conv1D

from .. import convert
from ..nn._clone import clone_as
from ..ops.attention import scaled_dot_product_attention
from ..ops.linear_act import linear_act
from ..ops.linear_cross_entropy import linear_cross_entropy

IMPLEMENTATION = "pykernels"

# causal LM class name -> the config attribute holding its final logit softcap (None: the
# logits are the LM head's output unchanged). Each was checked by reading its forward:
# logits = lm_head(hidden_states) [softcapped], loss = loss_function(logits, labels, ...).
CAUSAL_LMS = {
    "GPT2LMHeadModel": None,
    "LlamaForCausalLM": None,
    "MistralForCausalLM": None,
    "Qwen2ForCausalLM": None,
    "GemmaForCausalLM": None,
    "Gemma2ForCausalLM": "final_logit_softcapping",
}

# kwargs of transformers' attention call that change the result and have no fused option
_UNSUPPORTED = ("position_bias", "s_aux", "sinks")


def register_causal_lm(name, softcap_attribute=None):
    """Let :func:`pykernels.fuse` fuse the loss of causal LM class ``name``, whose forward
    must compute ``logits = lm_head(hidden)`` (softcapped by ``config.<softcap_attribute>``
    when given) and pass them with the labels to ``self.loss_function``."""
    CAUSAL_LMS[name] = softcap_attribute


# ---- MLPs: Conv1D and transformers' activations --------------------------------------------

class FusedConv1D(Conv1D):
    """transformers' Conv1D (``x @ weight + bias``, weight ``(in, out)``) with an activation
    fused on :func:`pykernels.linear_act`; the same Parameters and state_dict."""

    @classmethod
    def from_conv1d(cls, layer, activation="none", negative_slope=0.01):
        fused = clone_as(layer, cls)
        fused.activation = activation
        fused.negative_slope = negative_slope
        return fused

    def forward(self, x):
        # weight.t() is the nn.Linear layout linear_act takes; a view, so the gradient
        # reaches the (in, out) Parameter
        return linear_act(x, self.weight.t(), self.bias, self.activation,
                          negative_slope=self.negative_slope)

    def __repr__(self):
        return f"FusedConv1D(nf={self.nf}, nx={self.nx}, activation={self.activation})"


def _register_layers():
    convert.register_linear(Conv1D, FusedConv1D.from_conv1d)
    fused = {"GELUActivation": "gelu", "NewGELUActivation": "gelu_tanh",
             "FastGELUActivation": "gelu_tanh", "AccurateGELUActivation": "gelu_tanh",
             "GELUTanh": "gelu_tanh", "SiLUActivation": "silu"}
    without_kernel = ("QuickGELUActivation", "ClippedGELUActivation", "MishActivation",
                      "LaplaceActivation", "ReLUSquaredActivation", "SqrtSoftplusActivation",
                      "XIELUActivation")
    for name, activation in fused.items():
        if hasattr(hf_activations, name):  # the set varies across transformers versions
            convert.register_activation(getattr(hf_activations, name),
                                        lambda module, a=activation: (a, 0.01))
    for name in without_kernel:
        if hasattr(hf_activations, name):
            convert.register_activation(getattr(hf_activations, name), lambda module: None)


_register_layers()


# ---- attention ------------------------------------------------------------------------------

class MaskLayout:
    """What :func:`mask_interface` hands :func:`attention_forward` in place of a dense mask:
    ``causal``; ``offset`` = the first query's position minus the first key's (a query
    ``i`` sits at key position ``i + offset``); ``window``, the sliding window W (a causal
    query attends to the W keys up to its own position) or None; ``padding``, (B, S) bool,
    True = attend, or None when nothing is padded."""

    __slots__ = ("causal", "offset", "window", "padding")

    def __init__(self, causal, offset, window, padding):
        self.causal, self.offset, self.window, self.padding = causal, offset, window, padding


def mask_interface(batch_size, q_length, kv_length, q_offset=0, kv_offset=0,
                   mask_function=masking_utils.causal_mask_function, attention_mask=None,
                   local_size=None, allow_is_causal_skip=True,
                   allow_is_bidirectional_skip=False, **kwargs):
    """transformers' mask function for the "pykernels" implementation (the signature of
    its ``sdpa_mask``). Where transformers allows skipping the mask (its ``allow_*_skip``
    flags: the pattern is plain causal, sliding-window causal or bidirectional), a
    :class:`MaskLayout`; otherwise transformers' dense boolean mask."""
    config = kwargs.get("config")
    if local_size is None:
        causal = allow_is_causal_skip and mask_function is masking_utils.causal_mask_function
    else:  # chunked attention passes its chunk size as local_size too: check it is the window
        causal = allow_is_causal_skip and local_size == getattr(config, "sliding_window", None)
    bidirectional = (allow_is_bidirectional_skip and local_size is None
                     and mask_function is masking_utils.bidirectional_mask_function)
    # a tensor q_offset comes from static caches (reading it would break compiled graphs)
    if (causal or bidirectional) and isinstance(q_offset, int) and q_offset >= kv_offset:
        padding = masking_utils.prepare_padding_mask(attention_mask, kv_length, kv_offset)
        if padding is not None:
            padding = padding[:, kv_offset:kv_offset + kv_length]
            if bool(padding.all()):
                padding = None
        return MaskLayout(causal, q_offset - kv_offset, local_size if causal else None,
                          padding)
    return masking_utils.sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
        kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
        local_size=local_size, allow_is_causal_skip=False, allow_is_bidirectional_skip=False,
        **kwargs)


def _layout_options(layout, key, value):
    """(key, value, attn_mask, window) for :func:`scaled_dot_product_attention` from a
    MaskLayout. Positions are relative: query i attends key j iff j <= i + offset (causal)
    and j > i + offset - W (window), i.e. window=(W - 1 - offset, offset). Keys before
    offset - (W - 1) are outside every query's window and are dropped, so left >= 0."""
    mask = None if layout.padding is None else layout.padding[:, None, None, :]
    if not layout.causal:
        return key, value, mask, None
    offset = layout.offset
    if layout.window is not None and offset > layout.window - 1:
        start = offset - (layout.window - 1)
        key, value = key[:, :, start:], value[:, :, start:]
        mask = None if mask is None else mask[..., start:]
        offset -= start
    left = None if layout.window is None else layout.window - 1 - offset
    return key, value, mask, (left, offset)


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      is_causal=None, softcap=None, **kwargs):
    """transformers' attention-function contract on
    :func:`pykernels.scaled_dot_product_attention`: query (B, H, L, E), key and value
    (B, Hkv, S, E) -> (output (B, L, H, E), None). The ``sliding_window`` keyword some
    models pass is not read: the mask (a MaskLayout, or a dense mask) already holds the
    window, with the cache's offsets."""
    for name in _UNSUPPORTED:
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"pykernels attention has no option for {name}; use "
                                      f"another attn_implementation for this model")
    window, causal, mask = None, False, attention_mask
    if isinstance(attention_mask, MaskLayout):
        key, value, mask, window = _layout_options(attention_mask, key, value)
    elif attention_mask is None:
        # transformers' contract for no mask (as its sdpa): causal, top-left, unless one query
        causal = query.shape[2] > 1 and (
            is_causal if is_causal is not None else getattr(module, "is_causal", True))
    elif attention_mask.dtype != torch.bool:
        mask = attention_mask.to(query.dtype)  # additive; the op takes the query's dtype
    out = scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=causal,
        scale=scaling, enable_gqa=key.shape[1] != query.shape[1], window=window,
        softcap=softcap)
    return out.transpose(1, 2).contiguous(), None


def register():
    """Register the "pykernels" attention and mask functions with transformers (idempotent);
    afterwards ``from_pretrained(..., attn_implementation="pykernels")`` works too."""
    transformers.AttentionInterface.register(IMPLEMENTATION, attention_forward)
    transformers.AttentionMaskInterface.register(IMPLEMENTATION, mask_interface)


# ---- loss -------------------------------------------------------------------------------------

class LMHead(nn.Linear):
    """A causal LM's head (the same Parameters) that, while armed by the model's pre-hook
    for a forward given labels, records its input instead of computing the logits."""

    @classmethod
    def from_linear(cls, linear):
        head = clone_as(linear, cls)
        head.pending = None
        return head

    def forward(self, input):
        if self.pending is None:
            return super().forward(input)
        self.pending["hidden"] = input
        self.pending["placeholder"] = input.new_empty(*input.shape[:-1], 0)
        return self.pending["placeholder"]


def _arm_loss(model, args, kwargs):
    """Forward pre-hook: a call with labels runs without them, its LM head armed."""
    head = model.get_output_embeddings()
    head.pending = None  # a forward that raised may have left it armed
    labels = kwargs.get("labels")
    if labels is not None:
        kwargs = {**kwargs, "labels": None}
    elif len(args) > 1:  # labels never come first; look for them among the positionals
        position = list(inspect.signature(model.forward).parameters).index("labels")
        if len(args) > position:
            labels, args = args[position], args[:position] + (None,) + args[position + 1:]
    if labels is None:
        return None
    head.pending = {"labels": labels, "shift_labels": kwargs.get("shift_labels"),
                    "num_items_in_batch": kwargs.get("num_items_in_batch"),
                    "ignore_index": kwargs.get("ignore_index", -100)}
    return args, kwargs


def _fused_loss(model, args, kwargs, output):
    """Forward post-hook: the loss of an armed call, from the head's recorded input."""
    head = model.get_output_embeddings()
    pending, head.pending = head.pending, None
    if pending is None:
        return None
    if "hidden" not in pending:
        raise RuntimeError(f"{type(model).__name__}'s forward did not call its LM head, so "
                           f"pykernels could not compute its loss")
    as_tuple = isinstance(output, tuple)
    logits = output[0] if as_tuple else output.logits
    softcap_attribute = CAUSAL_LMS[type(model).__name__]
    softcap = None if softcap_attribute is None else getattr(model.config, softcap_attribute)
    if softcap is None and logits is not pending["placeholder"]:
        raise RuntimeError(f"{type(model).__name__}'s forward changes the LM head's output "
                           f"before its loss: pykernels' fused loss would be wrong; remove "
                           f"it from pykernels.integrations.transformers.CAUSAL_LMS")
    loss = causal_lm_loss(pending["hidden"], head, pending["labels"],
                          num_items_in_batch=pending["num_items_in_batch"],
                          ignore_index=pending["ignore_index"],
                          shift_labels=pending["shift_labels"], softcap=softcap)
    if as_tuple:  # transformers' tuples leave out None fields: the loss leads, no logits
        return (loss,) + output[1:]
    fields = {name: value for name, value in output.items() if name not in ("loss", "logits")}
    return type(output)(loss=loss, **fields)


def causal_lm_loss(hidden, head, labels, *, num_items_in_batch=None, ignore_index=-100,
                   shift_labels=None, softcap=None):
    """transformers' ForCausalLMLoss of ``head(hidden)`` (softcapped) on
    :func:`pykernels.linear_cross_entropy`, the logits never formed."""
    if shift_labels is None:  # position t predicts token t + 1; the last predicts nothing
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    target = shift_labels.reshape(-1).to(hidden.device)
    loss = linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), head.weight, target, linear_bias=head.bias,
        ignore_index=ignore_index, softcap=softcap,
        reduction="mean" if num_items_in_batch is None else "sum")
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    # the op returns the input's dtype; transformers' loss of a half-precision model is float32
    return loss.float() if loss.dtype in (torch.float16, torch.bfloat16) else loss


# ---- fuse -------------------------------------------------------------------------------------

def fuse_models(root, fuser):
    """The model-level part of :func:`pykernels.fuse` (its modules are walked by ``fuse``
    itself) for each outermost transformers model in ``root`` (``root`` itself, or models
    held by a wrapper module): attention implementation and loss."""
    outermost = []
    for prefix, model in root.named_modules():
        if isinstance(model, transformers.PreTrainedModel) and not any(
                outer == "" or prefix.startswith(outer + ".") for outer in outermost):
            outermost.append(prefix)
            _fuse_attention(model, prefix, fuser)
            if isinstance(model, transformers.GenerationMixin):
                _fuse_loss(model, prefix, fuser)


def _fuse_attention(model, prefix, fuser):
    kind = type(model).__name__
    current = model.config._attn_implementation
    if current == IMPLEMENTATION:
        return
    if not model._supports_attention_backend or not model._can_set_attn_implementation():
        fuser.skipped(prefix, kind, "attention: the model does not call transformers' "
                                    "attention interface, so it keeps its attention")
        return
    if not fuser.dry_run:
        register()
        model.set_attn_implementation(IMPLEMENTATION)
    fuser.swapped(prefix, f"{kind} attn_implementation={current!r}",
                  f"attn_implementation={IMPLEMENTATION!r}")


def _fuse_loss(model, prefix, fuser):
    kind = type(model).__name__
    head = model.get_output_embeddings()
    name = next((n for n, m in model.named_modules() if m is head), None)
    if head is None or isinstance(head, LMHead) or name is None:
        return
    qualified = f"{prefix}.{name}" if prefix else name
    if kind not in CAUSAL_LMS:
        fuser.skipped(qualified, f"{kind} loss", "not in pykernels.integrations.transformers."
                                                 "CAUSAL_LMS (see register_causal_lm)")
        return
    if type(head) is not nn.Linear:
        fuser.skipped(qualified, f"{kind} loss", f"the LM head is a {type(head).__name__}, "
                                                 f"not an nn.Linear")
        return
    if not fuser.dry_run:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        parent._modules[child] = LMHead.from_linear(head)
        model.register_forward_pre_hook(_arm_loss, with_kwargs=True)
        model.register_forward_hook(_fused_loss, with_kwargs=True)
    fuser.swapped(qualified, f"{kind} lm_head + loss_function",
                  "pykernels.linear_cross_entropy when labels are given (no logits)")
