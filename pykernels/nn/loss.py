"""pykernels.nn.CrossEntropyLoss and LinearCrossEntropyLoss: drop-in loss modules."""

import torch

from ..ops.cross_entropy import cross_entropy
from ..ops.linear_cross_entropy import linear_cross_entropy


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """torch.nn.CrossEntropyLoss on the fused kernel, plus ``z_loss``, ``softcap`` and
    ``inplace_backward`` (see :func:`pykernels.cross_entropy`).

    A subclass of torch's: the same ``weight`` buffer, attributes and state_dict.
    """

    def __init__(self, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                 z_loss=0.0, softcap=None, *, inplace_backward=False, backend=None):
        super().__init__(weight=weight, ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing)
        self.z_loss = z_loss
        self.softcap = softcap
        self.inplace_backward = inplace_backward
        self.backend = backend

    @classmethod
    def from_torch(cls, loss, z_loss=0.0, softcap=None, inplace_backward=False, backend=None):
        """The fused loss with ``loss``'s options, sharing its ``weight`` tensor."""
        if not isinstance(loss, torch.nn.CrossEntropyLoss):
            raise TypeError(f"loss must be a torch.nn.CrossEntropyLoss, got "
                            f"{type(loss).__name__}")
        return cls(loss.weight, loss.ignore_index, loss.reduction, loss.label_smoothing,
                   z_loss, softcap, inplace_backward=inplace_backward, backend=backend)

    def forward(self, input, target):
        return cross_entropy(input, target, self.weight, ignore_index=self.ignore_index,
                             reduction=self.reduction, label_smoothing=self.label_smoothing,
                             z_loss=self.z_loss, softcap=self.softcap,
                             inplace_backward=self.inplace_backward, backend=self.backend)

    def extra_repr(self):
        text = f"reduction={self.reduction}, ignore_index={self.ignore_index}"
        for name, default in (("label_smoothing", 0.0), ("z_loss", 0.0), ("softcap", None),
                              ("inplace_backward", False)):
            if getattr(self, name) != default:
                text += f", {name}={getattr(self, name)}"
        return text


class LinearCrossEntropyLoss(torch.nn.Module):
    """The loss of a linear classifier head, ``cross_entropy(input @ W.T + b, target)``, on
    :func:`pykernels.linear_cross_entropy`: the (N, num_classes) logits never exist.

    Laid out like torch.nn.LinearCrossEntropyLoss (torch >= 2.13): the head is the
    submodule ``linear`` (a torch.nn.Linear) and the class weights the buffer ``weight``,
    so the state_dicts are interchangeable.
    """

    def __init__(self, in_features, num_classes, bias=False, *, device=None, dtype=None,
                 weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                 z_loss=0.0, softcap=None, chunk_size=None, inplace_backward=False,
                 backend=None):
        super().__init__()
        if weight is not None and tuple(weight.shape) != (num_classes,):
            raise ValueError(f"weight must have shape ({num_classes},), got "
                             f"{tuple(weight.shape)}")
        self.linear = torch.nn.Linear(in_features, num_classes, bias=bias, device=device,
                                      dtype=dtype)
        self.register_buffer("weight", weight)
        self.in_features = in_features
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_size = chunk_size
        self.inplace_backward = inplace_backward
        self.backend = backend

    def forward(self, input, target):
        return linear_cross_entropy(
            input, self.linear.weight, target, linear_bias=self.linear.bias,
            weight=self.weight, reduction=self.reduction, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
            chunk_size=self.chunk_size, inplace_backward=self.inplace_backward,
            backend=self.backend)

    def extra_repr(self):
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, "
                f"bias={self.linear.bias is not None}, reduction={self.reduction}, "
                f"ignore_index={self.ignore_index}")
