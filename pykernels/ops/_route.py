"""How an eager call reaches an op's implementation without the custom-op machinery.

Every op is a ``torch.library`` custom op (docs/ARCHITECTURE.md, "Autograd"): the route
torch.compile traces, opcheck verifies, and fake tensors, dispatch modes and tensor
subclasses see. Calling it costs host time of its own, though: Python-side argument
binding, a redispatch through each dispatch key and an autograd wrapper around the
registered formula, several times what a tiny kernel takes. A plain eager call (ordinary
CPU or CUDA tensors, no torch.compile tracing, no dispatch mode) takes a shorter way to the
same code: ``apply`` runs an op through a ``torch.autograd.Function`` made of the op's own
implementation, ``setup_context`` and registered backward, and ``call`` runs an op without
autograd (a backward op) by its implementation directly. Ops are declared with this
module's ``custom_op`` and ``register_autograd`` so that both ways know them. The functions
are the very ones registered with the op, so both ways compute the same thing with the same
kernels; only the bookkeeping around them differs.
"""

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_DEVICES = ("cpu", "cuda")


def is_plain(*args):
    """Whether a call with ``args`` may skip the dispatcher: eager (not traced by
    torch.compile), no dispatch mode active (FakeTensorMode, a FlopCounter...), and every
    tensor an ordinary CPU or CUDA tensor (no fake, meta or subclass tensor)."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    for a in args:
        if isinstance(a, torch.Tensor) and (type(a) not in _PLAIN
                                            or a.device.type not in _DEVICES):
            return False
    return True


_impls = {}  # custom op -> its implementation (the decorated function)
_functions = {}  # custom op -> the autograd.Function of its implementation and formulas


def custom_op(name):
    """``torch.library.custom_op(name, mutates_args=())`` that also keeps the decorated
    implementation for ``call`` and ``apply``. (Ops that mutate an argument stay on the
    dispatcher: its in-place bookkeeping bumps the version counter autograd checks.)"""

    def register(impl):
        op = torch.library.custom_op(name, impl, mutates_args=())
        _impls[op] = impl
        return op
    return register


def register_autograd(op, backward, *, setup_context):
    """torch.library.register_autograd, and the same formulas for ``apply``'s eager way."""
    torch.library.register_autograd(op, backward, setup_context=setup_context)
    _functions[op] = _autograd_function(op, _impls[op], setup_context, backward)


def _autograd_function(op, impl, setup_context, backward):
    """The torch.autograd.Function whose forward is ``impl`` followed by the op's
    setup_context, and whose backward is the op's backward. (The forward takes ``ctx``
    itself: with a separate setup_context, Function.apply binds its arguments through
    inspect.signature on every call.)"""

    def forward(ctx, *args):
        output = impl(*args)
        setup_context(ctx, args, output)
        return output

    return type(f"Eager[{op._qualname}]", (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "backward": staticmethod(backward),
    })


def call(op, *args):
    """``op(*args)`` for an op without autograd (a backward), by its implementation when
    the call is plain."""
    return _impls[op](*args) if is_plain(*args) else op(*args)


def apply(op, *args):
    """``op(*args)`` with autograd: by the autograd.Function of its implementation and
    registered formulas when the call is plain, else through the dispatcher."""
    return _functions[op].apply(*args) if is_plain(*args) else op(*args)
