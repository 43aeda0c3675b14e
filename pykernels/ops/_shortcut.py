"""The shortcut of small eager CPU calls to the torch composition.

Below a family's CPU size crossover "auto" runs the torch composition, eager's own
operators (pykernels.backends.CPU_CROSSOVER). There a call's time is mostly host time, and
the full way's argument checks, autocast and backend resolution (docs/ARCHITECTURE.md,
"One call, end to end") cost about as much as the operators: 8-17 us a call, where eager's
tiny cross-entropy forward takes 8. So each public function first asks whether its call may
take the shortcut: ``eager`` (here) for the state the call runs in, then the family's
function in pykernels._C.shortcut (csrc/shortcut.cpp) with the call's own arguments. That
one crossing into C++ checks them (ordinary CPU tensors of a float dtype, the common
arguments, a size below the crossover) and computes the composition with the ATen
operators torch.nn.functional calls, returning the result, or None: then the full way runs.

The full way remains the only owner of error messages. The shortcut checks what the ATen
operators would accept but the full way rejects (a 1-D or meta weight, a bias that would
broadcast, a non-bool flag); where an operator throws (shapes that do not match, a bad class
index, dtypes that differ) it returns None, and the full way raises pykernels' own error.
A shortcut call therefore returns exactly what the full way returns, or raises what it
raises: tests/ops/test_shortcut.py compares the two ways on valid and invalid calls.
"""

import torch
import torch.autograd.forward_ad as forward_ad
from torch._C._functorch import maybe_current_level

from ..backends import default_is_auto, extension

# pykernels._C.shortcut (csrc/shortcut.cpp); without the extension, no shortcut
CALLS = None if extension() is None else extension().shortcut


def eager(backend):
    """Whether a call with ``backend`` may take the shortcut, as far as the state it runs in
    decides: the backend is left to "auto", the call is eager (not traced by
    torch.compile), outside torch.func transforms and forward-mode AD (where the full way
    runs the reference composition, pykernels/ops/_contract.py), and _C is built."""
    return (CALLS is not None and default_is_auto(backend) and forward_ad._current_level < 0
            and maybe_current_level() is None and not torch.compiler.is_compiling())
