"""Training models side by side for the demo: the fused model and its plain-PyTorch twin
start from the same weights, see the same batches in the same order and take the same
AdamW steps, so their loss curves and accuracies can be compared point by point.

Models follow pykernels.models' convention: ``model(inputs, targets) -> (logits, loss)``
(the fused Transformer returns no logits when given targets) and ``model(inputs) ->
(logits, None)``; targets equal to IGNORE_INDEX do not count.
"""

import contextlib

import torch

from .data import IGNORE_INDEX


class SideBySide:
    """``models``: {name: module}, all with the same initial state_dict."""

    def __init__(self, models, lr, weight_decay=0.0, autocast_dtype=None):
        self.models = models
        self.optimizers = {name: torch.optim.AdamW(m.parameters(), lr=lr,
                                                   weight_decay=weight_decay)
                           for name, m in models.items()}
        self.losses = {name: [] for name in models}  # one per step
        self.autocast_dtype = autocast_dtype

    def _autocast(self, model):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        device_type = next(model.parameters()).device.type
        return torch.autocast(device_type, dtype=self.autocast_dtype)

    def step(self, inputs, targets):
        """One training step of every model on the same batch; {name: loss}."""
        losses = {}
        for name, model in self.models.items():
            model.train()
            optimizer = self.optimizers[name]
            optimizer.zero_grad(set_to_none=True)
            with self._autocast(model):
                _, loss = model(inputs, targets)
            loss.backward()
            optimizer.step()
            losses[name] = loss.item()
            self.losses[name].append(losses[name])
        return losses

    @torch.no_grad()
    def accuracy(self, inputs, targets, batch_size=1024):
        """{name: (token accuracy, sequence accuracy)} over the targets that count: the
        fraction of them predicted right by argmax, and of the rows with all of them right
        (the same thing for a classifier, one target per row)."""
        results = {}
        for name, model in self.models.items():
            model.eval()
            right = counted = rows_right = 0
            for start in range(0, len(inputs), batch_size):
                x, t = inputs[start:start + batch_size], targets[start:start + batch_size]
                with self._autocast(model):
                    logits, _ = model(x)
                counts = t != IGNORE_INDEX
                correct = (logits.argmax(-1) == t) & counts
                right += int(correct.sum())
                counted += int(counts.sum())
                rows_right += int((correct | ~counts).reshape(len(t), -1).all(1).sum())
            results[name] = (right / max(counted, 1), rows_right / max(len(inputs), 1))
        return results
