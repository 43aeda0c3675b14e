"""Re-typing a torch module as its fused subclass without copying its tensors."""

import copy


def clone_as(module, cls):
    """A new ``cls`` object with ``module``'s state: the same Parameter, buffer and submodule
    objects (shared, so weights stay tied and optimizers keep working), attributes and hooks,
    held in containers of its own, so later changes to one module's children or hooks leave
    the other alone. ``cls`` must be a subclass of ``type(module)``'s class that adds no
    state of its own beyond what the caller sets afterwards."""
    clone = cls.__new__(cls)
    clone.__dict__.update({key: copy.copy(value) if isinstance(value, (dict, set)) else value
                           for key, value in module.__dict__.items()})
    return clone
