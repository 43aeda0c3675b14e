"""Checks shared by the model, fuse and distributed suites."""

import torch


def grads(model):
    """{name: gradient} of every parameter (None where it got none)."""
    return {name: None if p.grad is None else p.grad.detach().clone()
            for name, p in model.named_parameters()}


def assert_same_grads(actual, expected, rtol=1e-10, atol=1e-12):
    """Gradient dicts (from ``grads``) agree on every named parameter, names included."""
    assert list(actual) == list(expected)
    for name, g in expected.items():
        assert g is not None and actual[name] is not None, f"{name}: no gradient"
        torch.testing.assert_close(actual[name], g, rtol=rtol, atol=atol,
                                   msg=lambda m, name=name: f"grad of {name}: {m}")


def assert_same_state(a, b):
    """Same state_dict keys, shapes and values."""
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key, value in sa.items():
        assert torch.equal(value, sb[key]), key
