"""pykernels.fuse(model): swap the layers of any model for their fused twins.

``model = pykernels.fuse(model)`` returns the model (the same object; a deep copy with
``inplace=False``; the replacement when the root itself is swapped).
``pykernels.explain_fuse(model)`` is the dry run: it changes nothing and returns the
:class:`FuseReport` of what ``fuse`` would do; ``fuse(model, verbose=True)`` prints it.

What is swapped (exact types only: a subclass may override forward, so it is skipped):

- A linear layer followed by an activation with a fused kernel -> one fused linear
  (``pykernels.nn.Linear(activation=...)`` for ``nn.Linear``) in the linear's slot and an
  ``nn.Identity`` in the activation's slot, so the state_dict keys and any code indexing the
  container stay valid. Pairs are found

  * inside an ``nn.Sequential``: the linear directly followed by the activation;
  * held as attributes of any module whose ``forward`` calls them in sequence, e.g.
    ``self.fc2(self.act(self.fc1(x)))``: the module's forward is traced with ``torch.fx``
    (its children as leaves), and a pair is fused when the activation is called once, on
    the output of a linear called once whose output nothing else uses. The trace is of
    the module's current mode (train or eval): a forward that uses a linear's output
    elsewhere only in the other mode would be misread. A forward that cannot be traced is
    reported, not fused.

  Linear types (``LINEARS``) and activation types beyond torch.nn's (``ACTIVATIONS``) are
  registries users extend with :func:`register_linear` and :func:`register_activation`.
- A gated MLP, ``down_proj(act(gate_proj(x)) * up_proj(x))`` with children of those names
  (HF's Llama/Mistral/Qwen2/Gemma MLPs) -> ``pykernels.nn.GatedMLP``.
- ``nn.MultiheadAttention`` -> ``pykernels.nn.MultiheadAttention``.
- ``nn.CrossEntropyLoss`` -> ``pykernels.nn.CrossEntropyLoss`` (same options and weight).
- ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` -> the
  ``pykernels.nn`` layers of the same names (fused feed-forward and attention, torch's
  encoder fast path bypassed), when their activation has a fused kernel; otherwise the layer
  is skipped with the reason and only its attention modules are swapped.
- A HuggingFace ``transformers`` model also gets pykernels attention and, for a causal LM,
  the fused linear + cross-entropy loss (``pykernels.integrations.transformers``).

Every new module shares the old one's Parameter and buffer objects (never copies), so the
state_dict keys and values are unchanged, tied weights stay tied, and an optimizer built
before ``fuse`` keeps updating the same tensors. The replaced modules themselves are not
modified: ``fuse`` only rebinds children in their parents.
"""

import copy
import operator
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from . import nn as fused_nn
from .activations import activation_of

_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")

# exact torch type -> its fused subclass (each has a from_torch sharing the Parameters)
_SWAPS = {
    nn.MultiheadAttention: fused_nn.MultiheadAttention,
    nn.CrossEntropyLoss: fused_nn.CrossEntropyLoss,
    nn.TransformerEncoderLayer: fused_nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer: fused_nn.TransformerDecoderLayer,
}

# exact linear-layer type -> make(layer, activation, negative_slope): the fused layer
# computing act(layer(x)) over layer's Parameters (shared)
LINEARS = {nn.Linear: fused_nn.Linear.from_torch}

# exact activation-module type (beyond the torch.nn ones activation_of knows) -> resolve(
# module): (name, negative_slope) of the fused kernel computing it, or None if none does
ACTIVATIONS = {}

_MHA_NOTE = ("runs the fused kernels only when called with need_weights=False (torch's "
             "default is True: then PyTorch's path runs and a warning is given once)")
_MHA_NEVER_NOTE = "add_bias_kv / add_zero_attn: PyTorch's path always runs"


def register_linear(cls, make):
    """Let :func:`fuse` fuse an activation into layers of exact type ``cls``:
    ``make(layer, activation, negative_slope)`` returns the fused layer, sharing ``layer``'s
    Parameters."""
    LINEARS[cls] = make


def register_activation(cls, resolve):
    """Let :func:`fuse` recognise activation modules of exact type ``cls``:
    ``resolve(module)`` returns ``(activation_name, negative_slope)`` of the equal fused
    activation, or None when no kernel computes it (the pair is then reported as skipped)."""
    ACTIVATIONS[cls] = resolve


@dataclass
class FuseReport:
    """What :func:`fuse` did, or :func:`explain_fuse` says it would do. ``model`` is the
    fused model (for ``explain_fuse`` the model as it is). ``swapped`` holds
    ``(qualified_name, from_type, to_type)``, ``skipped`` ``(qualified_name, type,
    reason)``, ``notes`` ``(qualified_name, note)`` on swapped modules that run fused only
    in some calls; the root's qualified name is ``""``."""

    model: nn.Module
    swapped: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def __str__(self):
        lines = [f"fuse: {len(self.swapped)} swapped, {len(self.skipped)} skipped"]
        lines += [f"  swapped {name or '<root>'}: {old} -> {new}"
                  for name, old, new in self.swapped]
        lines += [f"  skipped {name or '<root>'} ({kind}): {reason}"
                  for name, kind, reason in self.skipped]
        lines += [f"  note {name or '<root>'}: {note}" for name, note in self.notes]
        return "\n".join(lines)


def fuse(module, *, inplace=True, verbose=False):
    """Swap ``module``'s supported layers for fused ones (see the module docstring) and
    return the model: ``module`` itself, a fused deep copy with ``inplace=False``, or the
    replacement when ``module`` itself is swapped (e.g. a bare MultiheadAttention).
    ``verbose=True`` prints the :class:`FuseReport`; :func:`explain_fuse` returns it."""
    _check_module(module)
    if not inplace:
        module = copy.deepcopy(module)
    report = _Fuser(dry_run=False).run(module)
    if verbose:
        print(report)
    return report.model


def explain_fuse(module):
    """The :class:`FuseReport` of what :func:`fuse` would swap and skip in ``module``,
    leaving ``module`` unchanged (a dry run: nothing is rebound, registered or copied)."""
    _check_module(module)
    return _Fuser(dry_run=True).run(module)


def _check_module(module):
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")


def _qualify(prefix, name):
    return f"{prefix}.{name}" if prefix else name


def _integrations():
    """The integrations with libraries the caller has imported: transformers' (its models,
    wherever they sit in the model, cannot exist otherwise), so that ``import pykernels``
    never imports it. Importing the integration also registers transformers' linear and
    activation types."""
    if "transformers" not in sys.modules:
        return []
    from .integrations import transformers as hf

    return [hf]


def _resolve_activation(module):
    """(name, negative_slope) of the fused activation equal to ``module``, or None."""
    resolve = ACTIVATIONS.get(type(module))
    return resolve(module) if resolve is not None else activation_of(module)


def _is_activation(module):
    """Whether ``module`` is an activation module (fusable or not): torch.nn's or a
    registered type."""
    return type(module) in ACTIVATIONS or (
        type(module).__module__ == "torch.nn.modules.activation"
        and not isinstance(module, nn.MultiheadAttention))


def _is_linear(module):
    return isinstance(module, tuple(LINEARS))


class _ChildrenAsLeaves(torch.fx.Tracer):
    """Traces one module's forward, recording every submodule call as a single node."""

    def is_leaf_module(self, m, module_qualified_name):
        return True


class _Fuser:
    """One run of fuse (``dry_run``: explain_fuse). ``memo`` maps each visited module's id
    to its replacement (or itself), so a module reachable twice is converted once and every
    parent gets the same replacement; ``graphs`` caches torch.fx traces by module id."""

    def __init__(self, dry_run):
        self.dry_run = dry_run
        self.memo = {}
        self.graphs = {}
        self.report = None

    def run(self, module):
        self.report = FuseReport(module)
        for integration in _integrations():
            integration.fuse_models(module, self)
        root = self.swap(module, "")
        if root is not None:
            if not self.dry_run:
                self.report.model = root
        else:
            self.fuse_children(module, "")
        return self.report

    def swapped(self, name, old, new):
        self.report.swapped.append((name, old, new))

    def skipped(self, name, kind, reason):
        self.report.skipped.append((name, kind, reason))

    def fuse_children(self, module, prefix):
        """Swap the children of ``module`` in place, depth first."""
        if id(module) in self.memo:
            return
        self.memo[id(module)] = module
        if isinstance(module, nn.Sequential):
            self.fuse_sequential(module, prefix)
        elif not type(module).__module__.startswith("pykernels."):
            self.fuse_attribute_pairs(module, prefix)
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            qualified = _qualify(prefix, name)
            if id(child) in self.memo:
                self.rebind(module, name, self.memo[id(child)])
                continue
            replacement = self.swap(child, qualified)
            if replacement is None:
                self.fuse_children(child, qualified)
            else:
                self.rebind(module, name, replacement)

    def rebind(self, parent, name, child):
        if not self.dry_run:
            parent._modules[name] = child

    def swap(self, module, qualified):
        """The fused replacement of ``module`` or None (skips recorded in the report)."""
        kind = type(module)
        fused = _SWAPS.get(kind)
        if fused is None:
            base = next((t for t in _SWAPS if isinstance(module, t)), None)
            if base is None:
                return self.swap_gated_mlp(module, qualified)
            if not isinstance(module, tuple(_SWAPS.values())):
                self.skipped(qualified, kind.__name__,
                             f"subclass of {base.__name__}: its forward may differ")
            return None
        if kind in (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer) \
                and activation_of(module.activation) is None:
            self.skipped(qualified, kind.__name__,
                         f"activation {module.activation!r} has no fused kernel; "
                         f"only its attention is fused")
            return None
        replacement = fused.from_torch(module)
        self.memo[id(module)] = replacement
        self.swapped(qualified, kind.__name__, f"pykernels.nn.{fused.__name__}")
        if kind is nn.MultiheadAttention:
            never = module.bias_k is not None or module.add_zero_attn
            self.report.notes.append((qualified, _MHA_NEVER_NOTE if never else _MHA_NOTE))
        return replacement

    # ---- Linear + activation pairs -----------------------------------------------------

    def fuse_pair(self, parent, linear_key, act_key, qualified):
        """Fuse ``parent``'s children ``linear_key`` (a linear layer) and ``act_key`` (the
        activation applied to its output and nothing else) when they can be; True if the
        pair was fused, False if the activation has no kernel or the pair was skipped."""
        linear, act = parent._modules[linear_key], parent._modules[act_key]
        pair = f"{type(linear).__name__}+{type(act).__name__}"
        fused = _resolve_activation(act)
        if fused is None:
            if _is_activation(act):
                self.skipped(qualified, pair, f"no fused kernel for {act!r}")
            return False
        make = LINEARS.get(type(linear))
        if make is None:
            base = next(t for t in LINEARS if isinstance(linear, t))
            self.skipped(qualified, pair, f"{type(linear).__name__} is a subclass of "
                                          f"{base.__name__}: its forward may differ")
        elif any(getattr(m, hooks) for m in (linear, act) for hooks in _HOOKS):
            self.skipped(qualified, pair, "hooks on the Linear or the activation "
                                          "would be lost by merging them")
        else:
            name, slope = fused
            replacement = make(linear, name, slope)
            self.rebind(parent, linear_key, replacement)
            self.rebind(parent, act_key, nn.Identity())
            self.swapped(qualified, pair,
                         f"{_fused_name(replacement)}(activation={name}) + Identity")
            return True
        return False

    def fuse_sequential(self, sequential, prefix):
        """Linear + activation pairs of ``sequential``, each linear directly followed by its
        activation."""
        keys = list(sequential._modules)
        for key, next_key in zip(keys[:-1], keys[1:], strict=True):
            linear, act = sequential._modules[key], sequential._modules[next_key]
            if _is_linear(linear) and act is not None and _fuses_nothing(linear):
                self.fuse_pair(sequential, key, next_key, _qualify(prefix, key))

    def trace(self, module):
        """``module``'s forward as a torch.fx Graph over its children, or the exception."""
        if id(module) not in self.graphs:
            try:
                self.graphs[id(module)] = _ChildrenAsLeaves().trace(module)
            except Exception as error:  # any failure of fx: report it, fuse nothing here
                self.graphs[id(module)] = error
        return self.graphs[id(module)]

    def candidate_graph(self, module):
        """The fx graph (or the tracing exception) of a module holding both linear and
        activation children, None for other modules."""
        children = [c for c in module._modules.values() if c is not None]
        if not _fuses_nothing(module) or not any(_is_activation(c) for c in children) \
                or not any(_is_linear(c) and _fuses_nothing(c) for c in children):
            return None
        return self.trace(module)

    def fuse_attribute_pairs(self, module, prefix):
        """Linear -> activation pairs held as attributes of ``module`` and called in
        sequence by its forward (found on its fx graph)."""
        graph = self.candidate_graph(module)
        if isinstance(graph, Exception):
            first_line = (str(graph).splitlines() or [""])[0]
            self.skipped(prefix, type(module).__name__,
                         f"has linear and activation children but torch.fx cannot trace its "
                         f"forward ({type(graph).__name__}: {first_line}); put the pair in "
                         f"an nn.Sequential or fuse it by hand")
            return
        if graph is None:
            return
        calls = _module_calls(graph)
        for act_key, act_nodes in calls.items():
            act = module._modules.get(act_key)
            if act is None or not _is_activation(act) or len(act_nodes) != 1:
                continue
            source = _single_input(act_nodes[0])
            if source is None or source.op != "call_module" or source.target not in calls:
                continue
            linear_key = source.target
            linear = module._modules.get(linear_key)
            if linear is None or not _is_linear(linear) or not _fuses_nothing(linear):
                continue
            qualified = _qualify(prefix, linear_key)
            pair = f"{type(linear).__name__}+{type(act).__name__}"
            if len(calls[linear_key]) != 1:
                self.skipped(qualified, pair, f"{linear_key} is called more than once in "
                                              f"forward")
            elif len(source.users) != 1:
                self.skipped(qualified, pair, f"forward also uses {linear_key}'s output "
                                              f"before the activation")
            else:
                self.fuse_pair(module, linear_key, act_key, qualified)

    def swap_gated_mlp(self, module, qualified):
        """A pykernels.nn.GatedMLP over ``module``'s Parameters when ``module`` is a gated
        MLP (see the module docstring), else None."""
        graph = self.candidate_graph(module)
        if graph is None or isinstance(graph, Exception):
            return None  # an untraceable module is reported when its children are visited
        shape = _gated_shape(module, graph)
        if shape is None:
            return None
        gate, up, down, act = (module._modules[key] for key in shape)
        kind = type(module).__name__
        fused = _resolve_activation(act)
        if fused is None:
            self.skipped(qualified, kind, f"gated MLP: no fused kernel for {act!r}")
            return None
        if tuple(shape[:3]) != ("gate_proj", "up_proj", "down_proj"):
            self.skipped(qualified, kind, f"gated MLP with children {shape[:3]}: GatedMLP "
                                          f"keeps the names gate_proj, up_proj, down_proj")
            return None
        if any(type(m) is not nn.Linear for m in (gate, up, down)) \
                or len({m.bias is None for m in (gate, up, down)}) != 1:
            self.skipped(qualified, kind, "gated MLP: gate, up and down must be plain "
                                          "nn.Linear, all with or all without bias")
            return None
        if any(getattr(m, hooks) for m in (module, gate, up, down, act) for hooks in _HOOKS):
            self.skipped(qualified, kind, "gated MLP: hooks would be lost by fusing it")
            return None
        name, slope = fused
        replacement = _gated_mlp(gate, up, down, name, slope, module.training)
        self.memo[id(module)] = replacement
        self.swapped(qualified, kind, f"pykernels.nn.GatedMLP(activation={name})")
        return replacement


def _gated_mlp(gate, up, down, activation, negative_slope, training):
    """A pykernels.nn.GatedMLP holding the Linear modules ``gate``, ``up``, ``down`` (shared,
    so their Parameters and state_dict keys stay); built on the meta device, so its own
    Parameters, replaced at once, never take memory."""
    mlp = fused_nn.GatedMLP(gate.in_features, gate.out_features, activation=activation,
                            bias=gate.bias is not None, negative_slope=negative_slope,
                            device="meta")
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = gate, up, down
    return mlp.train(training)


def _fuses_nothing(linear):
    """Whether ``linear`` is not already a fused layer (a second fuse leaves those)."""
    return not type(linear).__module__.startswith("pykernels.")


def _fused_name(module):
    kind = type(module)
    return f"pykernels.nn.{kind.__name__}" if kind.__module__.startswith("pykernels.nn") \
        else f"{kind.__module__}.{kind.__name__}"


def _module_calls(graph):
    """{child name: [its call_module nodes]} of a traced forward."""
    calls = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    return calls


def _single_input(node):
    """The one positional argument of ``node`` (no keyword arguments), else None."""
    if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], torch.fx.Node):
        return None
    return node.args[0]


_MULTIPLY = (operator.mul, torch.mul)


def _gated_shape(module, graph):
    """``(gate, up, down, act)`` child names when ``module``'s whole forward is
    ``down(act(gate(x)) * up(x))`` on its single input (children called once each, nothing
    else computed), else None."""
    nodes = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    if len(nodes) != 5 or len(inputs) != 1 or len(module._modules) != 4:
        return None
    down = _single_input(output)
    product = down and _single_input(down)
    if down is None or down.op != "call_module" or product is None \
            or product.op != "call_function" or product.target not in _MULTIPLY \
            or len(product.args) != 2 or product.kwargs:
        return None
    act = next((a for a in product.args if isinstance(a, torch.fx.Node)
                and a.op == "call_module" and _is_activation(module._modules[a.target])),
               None)
    up = next((a for a in product.args if a is not act), None)
    gate = act and _single_input(act)
    if gate is None or not isinstance(up, torch.fx.Node) or up.op != "call_module" \
            or gate.op != "call_module" or _single_input(up) is not inputs[0] \
            or _single_input(gate) is not inputs[0]:
        return None
    names = (gate.target, up.target, down.target, act.target)
    if len(set(names)) != 4 or not all(_is_linear(module._modules[n]) for n in names[:3]):
        return None
    return names
