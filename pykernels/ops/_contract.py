"""PyTorch's autograd contract, shared by every op (docs/ARCHITECTURE.md, "Autograd").

Every op is a torch.library custom op whose backward is registered with
``torch.library.register_autograd``: the public function calls the op, nothing else.
Two things that route cannot give on its own are handled here, once for all families:

* Forward-mode AD and ``torch.func`` transforms. A custom op has no jvp rule, so
  ``torch.func.jvp`` / ``forward_ad`` through it give a silent zero tangent, and
  ``torch.func.grad`` raises a message about ``setup_context`` that names no pykernels
  function. Inside such a transform (or when any input carries a tangent) the public
  function therefore runs its plain-PyTorch composition (``pykernels.reference``), whose
  results are PyTorch's by construction. Speed matters less than truth there.
* Higher-order gradients. The kernels' backward is not itself differentiable. When autograd
  records a graph of the backward (``create_graph=True``, which is exactly when grad mode is
  on inside a backward), the registered backward recomputes the forward with the
  composition on the saved inputs, which stay connected to the graph, and differentiates
  that with ``create_graph=True``: second-order results are PyTorch's.

Under ``torch.compile`` neither check runs: Dynamo traces the custom op and its registered
autograd formula, and the transforms above are not applied inside compiled regions here.
"""

import torch
import torch.autograd.forward_ad as forward_ad


def _has_tangent(t):
    return isinstance(t, torch.Tensor) and forward_ad.unpack_dual(t).tangent is not None


def runs_composition(*tensors):
    """Whether a call must run the plain-PyTorch composition: inside a torch.func transform
    (grad, vmap, jvp, jacrev, ...) or with a forward-mode tangent on any of ``tensors``."""
    if torch.compiler.is_compiling():
        return False
    if torch._C._functorch.maybe_current_level() is not None:
        return True
    # forward_ad's level is -1 outside every dual_level() block: the common case costs
    # one integer comparison.
    return forward_ad._current_level >= 0 and any(_has_tangent(t) for t in tensors)


def wants_grad(*tensors):
    """Whether autograd records a call on ``tensors`` (None entries allowed): an op may
    then write in its forward what only its backward needs."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def graph_requested():
    """Inside a registered backward: whether autograd records a graph of the gradient
    (backward or autograd.grad with create_graph=True)."""
    return torch.is_grad_enabled()


def composition_grads(composition, inputs, needs_input_grad, grad_outputs,
                      create_graph=True):
    """The gradients of ``composition(*inputs)``, with a graph of their own unless
    ``create_graph=False`` (for a gradient the kernels do not compute, e.g. with respect
    to probability targets).

    ``inputs`` are the op's saved inputs (graph-connected inside a backward that records a
    graph), ``needs_input_grad`` says which of them get a gradient, ``grad_outputs`` are
    the incoming gradients (one per tensor ``composition`` returns; None for zero).
    Returns one entry per input, None where no gradient is needed or it is zero.
    """
    wanted = [i for i, need in enumerate(needs_input_grad) if need]
    with torch.enable_grad():
        outputs = composition(*inputs)
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs, strict=True)
                 if g is not None and o.requires_grad]
        grads = [None] * len(wanted)
        if pairs and wanted:
            grads = torch.autograd.grad(
                [o for o, _ in pairs], [inputs[i] for i in wanted], [g for _, g in pairs],
                create_graph=create_graph, allow_unused=True)
    result = [None] * len(inputs)
    for i, g in zip(wanted, grads, strict=True):
        result[i] = g
    return tuple(result)
