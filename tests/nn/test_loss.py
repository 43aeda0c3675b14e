"""pykernels.nn.CrossEntropyLoss and LinearCrossEntropyLoss against torch.nn's losses."""

import pytest
import torch
from conftest import cpu_kernel_backends

import pykernels
from pykernels import reference


@pytest.mark.parametrize("backend", cpu_kernel_backends())
def test_cross_entropy_loss_module_matches_torch(backend):
    torch.manual_seed(11)
    weight = torch.rand(13, dtype=torch.float64) + 0.5
    ours = pykernels.nn.CrossEntropyLoss(weight, ignore_index=2, label_smoothing=0.1,
                                         backend=backend)
    plain = torch.nn.CrossEntropyLoss(weight, ignore_index=2, label_smoothing=0.1)
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    assert ours.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(9, 13, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 13, (9,))
    loss, (grad,) = ours(x, t), torch.autograd.grad(ours(x, t), x)
    loss_ref, (grad_ref,) = plain(x, t), torch.autograd.grad(plain(x, t), x)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-12)


def test_cross_entropy_loss_module_from_torch_and_extras():
    torch.manual_seed(12)
    plain = torch.nn.CrossEntropyLoss(torch.rand(7) + 0.5, reduction="sum")
    ours = pykernels.nn.CrossEntropyLoss.from_torch(plain, z_loss=1e-2, softcap=5.0)
    assert ours.weight is plain.weight and ours.reduction == "sum"
    x, t = torch.randn(5, 7, dtype=torch.float64), torch.randint(0, 7, (5,))
    expected = reference.cross_entropy(x, t, plain.weight.double(), reduction="sum",
                                       z_loss=1e-2, softcap=5.0)
    torch.testing.assert_close(ours.double()(x, t), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="loss"):
        pykernels.nn.CrossEntropyLoss.from_torch(torch.nn.MSELoss())


@pytest.mark.skipif(not hasattr(torch.nn, "LinearCrossEntropyLoss"),
                    reason="torch.nn.LinearCrossEntropyLoss needs torch >= 2.13")
@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_loss_module_state_dict_and_values(bias):
    torch.manual_seed(13)
    weight = torch.rand(29, dtype=torch.float64) + 0.5
    ours = pykernels.nn.LinearCrossEntropyLoss(16, 29, bias=bias, weight=weight, chunk_size=4,
                                               dtype=torch.float64)
    plain = torch.nn.LinearCrossEntropyLoss(16, 29, bias=bias, weight=weight,
                                            dtype=torch.float64, ignore_index=-100)
    plain.load_state_dict(ours.state_dict())
    ours.load_state_dict(plain.state_dict())
    assert ours.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(11, 16, dtype=torch.float64)
    t = torch.randint(0, 29, (11,))
    t[3] = -100
    loss = ours(x, t)
    loss_ref = plain(x, t)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-10, atol=1e-12)
    params = list(ours.parameters())
    grads = torch.autograd.grad(loss, params)
    grads_ref = torch.autograd.grad(loss_ref, list(plain.parameters()))
    for g, r in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_linear_cross_entropy_loss_module_rejects_bad_weight():
    with pytest.raises(ValueError, match="weight"):
        pykernels.nn.LinearCrossEntropyLoss(8, 5, weight=torch.ones(4))
