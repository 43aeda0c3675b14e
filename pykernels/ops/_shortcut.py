"""The shortcut of small eager CPU calls to the torch composition.

Below a family's CPU size crossover "auto" runs the torch composition, eager's own
operators (pykernels.backends.CPU_CROSSOVER). There a call's time is mostly host time, and
the full way's argument checks, autocast and backend resolution (docs/ARCHITECTURE.md,
"One call, end to end") cost about as much as the operators: 8-17 us a call, where eager's
tiny cross-entropy forward takes 8. So each public function first asks whether its call is
one the full way would send straight to the composition, and then calls the composition's
torch functions at once:

* ``eager_cpu`` (here): the backend is left to "auto"; the first tensor is an ordinary CPU
  tensor (exact type: no fake, meta or subclass tensor) of a float dtype; the call is eager
  (not traced by torch.compile), outside torch.func transforms and forward-mode AD (where
  the full way runs the reference composition, pykernels/ops/_contract.py);
* the family's own test, next to its public function: the common arguments (no class
  weights, mask, softcap...) and a size below the family's crossover.

The full way remains the only owner of error messages. The shortcut checks what the torch
functions would accept but the full way rejects (a 1-D weight F.linear would take, a bias
that would broadcast, a non-bool flag); what the torch functions reject themselves (shapes
that do not match, a bad class index, another device) makes them raise, and the public
function then runs the full way, which raises pykernels' own error (``fallback``). A
shortcut call therefore returns exactly what the full way returns, or raises what it
raises: tests/ops/test_shortcut.py compares the two ways on valid and invalid calls.
"""

import torch
import torch.autograd.forward_ad as forward_ad
from torch._C._functorch import maybe_current_level

from ..backends import default_is_auto

PLAIN = (torch.Tensor, torch.nn.Parameter)
_FLOAT = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def eager_cpu(backend, first):
    """Whether a call with ``backend`` and first tensor ``first`` may take the shortcut, as
    far as the family's own arguments do not decide it (module docstring)."""
    return (type(first) in PLAIN and default_is_auto(backend) and first.is_cpu
            and first.dtype in _FLOAT and forward_ad._current_level < 0
            and maybe_current_level() is None and not torch.compiler.is_compiling())
