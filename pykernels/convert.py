"""pykernels.fuse(model): swap the torch.nn layers of any model for their fused twins.

What is swapped (exact types only: a subclass may override forward, so it is skipped):

- ``nn.Linear`` directly followed, inside an ``nn.Sequential``, by ``nn.ReLU``, ``nn.GELU``
  (approximate none or tanh), ``nn.SiLU``, ``nn.Sigmoid``, ``nn.Tanh`` or ``nn.LeakyReLU``
  -> one ``pykernels.nn.Linear(activation=...)`` in the Linear's slot and an ``nn.Identity``
  in the activation's slot. Keeping the slot keeps the Sequential's indices, so the
  state_dict keys (``0.weight``, ``2.weight``, ...) and any code indexing the Sequential
  stay valid.
- ``nn.MultiheadAttention`` -> ``pykernels.nn.MultiheadAttention``.
- ``nn.CrossEntropyLoss`` -> ``pykernels.nn.CrossEntropyLoss`` (same options and weight).
- ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` -> the
  ``pykernels.nn`` layers of the same names (fused feed-forward and attention, torch's
  encoder fast path bypassed), when their activation has a fused kernel; otherwise the layer
  is skipped with the reason and only its attention modules are swapped.

Every new module shares the old one's Parameter and buffer objects (never copies), so the
state_dict keys and values are unchanged, tied weights stay tied, and an optimizer built
before ``fuse`` keeps updating the same tensors. The replaced modules themselves are not
modified: ``fuse`` only rebinds children in their parents.
"""

import copy
from dataclasses import dataclass, field

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


@dataclass
class FuseReport:
    """What :func:`fuse` did. ``model`` is the fused model (a deep copy when
    ``inplace=False``; a new module when the root itself was swapped). ``swapped`` holds
    ``(qualified_name, from_type, to_type)``, ``skipped`` ``(qualified_name, type,
    reason)``; the root's qualified name is ``""``."""

    model: nn.Module
    swapped: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    def __str__(self):
        lines = [f"fuse: {len(self.swapped)} swapped, {len(self.skipped)} skipped"]
        lines += [f"  swapped {name or '<root>'}: {old} -> {new}"
                  for name, old, new in self.swapped]
        lines += [f"  skipped {name or '<root>'} ({kind}): {reason}"
                  for name, kind, reason in self.skipped]
        return "\n".join(lines)


def fuse(module, *, inplace=True):
    """Swap ``module``'s supported layers for fused ones (see the module docstring) and
    return a :class:`FuseReport`; the fused model is ``report.model``. With
    ``inplace=False`` a deep copy is fused and ``module`` is left untouched."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if not inplace:
        module = copy.deepcopy(module)
    report = FuseReport(module)
    memo = {}
    root = _swap(module, "", report, memo)
    if root is not None:
        report.model = root
    else:
        _fuse_children(module, "", report, memo)
    return report


def _qualify(prefix, name):
    return f"{prefix}.{name}" if prefix else name


def _fuse_children(module, prefix, report, memo):
    """Swap the children of ``module`` in place, depth first; ``memo`` maps each visited
    module's id to its replacement (or itself), so a module reachable twice is converted
    once and every parent gets the same replacement."""
    if id(module) in memo:
        return
    memo[id(module)] = module
    if isinstance(module, nn.Sequential):
        _fuse_sequential(module, prefix, report)
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        qualified = _qualify(prefix, name)
        if id(child) in memo:
            module._modules[name] = memo[id(child)]
            continue
        replacement = _swap(child, qualified, report, memo)
        if replacement is None:
            _fuse_children(child, qualified, report, memo)
        else:
            module._modules[name] = replacement


def _swap(module, qualified, report, memo):
    """The fused replacement of ``module`` or None (skips recorded in ``report``)."""
    kind = type(module)
    fused = _SWAPS.get(kind)
    if fused is None:
        base = next((t for t in _SWAPS if isinstance(module, t)), None)
        if base is not None and not isinstance(module, tuple(_SWAPS.values())):
            report.skipped.append((qualified, kind.__name__,
                                   f"subclass of {base.__name__}: its forward may differ"))
        return None
    if kind in (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer) \
            and activation_of(module.activation) is None:
        report.skipped.append((qualified, kind.__name__,
                               f"activation {module.activation!r} has no fused kernel; "
                               f"only its attention is fused"))
        return None
    replacement = fused.from_torch(module)
    memo[id(module)] = replacement
    report.swapped.append((qualified, kind.__name__, f"pykernels.nn.{fused.__name__}"))
    return replacement


def _fuse_sequential(sequential, prefix, report):
    """Linear + activation pairs of ``sequential`` into fused Linears (activation slot ->
    Identity)."""
    keys = list(sequential._modules)
    for key, next_key in zip(keys[:-1], keys[1:], strict=True):
        linear, act = sequential._modules[key], sequential._modules[next_key]
        if not isinstance(linear, nn.Linear) or isinstance(linear, fused_nn.Linear) \
                or act is None:
            continue
        fused = activation_of(act)
        qualified = _qualify(prefix, key)
        pair = f"{type(linear).__name__}+{type(act).__name__}"
        if fused is None:
            if type(act).__module__ == "torch.nn.modules.activation" \
                    and not isinstance(act, nn.MultiheadAttention):
                report.skipped.append((qualified, pair, f"no fused kernel for {act!r}"))
            continue
        if type(linear) is not nn.Linear:
            report.skipped.append((qualified, pair,
                                   f"{type(linear).__name__} is a subclass of Linear: its "
                                   f"forward may differ"))
        elif any(getattr(m, hooks) for m in (linear, act) for hooks in _HOOKS):
            report.skipped.append((qualified, pair, "hooks on the Linear or the activation "
                                                    "would be lost by merging them"))
        else:
            name, slope = fused
            sequential._modules[key] = fused_nn.Linear.from_torch(
                linear, activation=name, negative_slope=slope)
            sequential._modules[next_key] = nn.Identity()
            report.swapped.append((qualified, pair,
                                   f"pykernels.nn.Linear(activation={name}) + Identity"))
