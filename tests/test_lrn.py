"""VGG's LRN layer (A-LRN): the fast path gives torch.nn.LocalResponseNorm's numbers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vgg.models import LocalResponseNorm, build_vgg, forward_macs


def alexnet_lrn(cls):
    return cls(5, alpha=1e-4, beta=0.75, k=2.0)  # as vgg.models builds A-LRN


def forward_backward(layer, x, grad):
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(grad)
    return y, x.grad


@pytest.mark.parametrize("channels", [7, 16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_same_numbers_as_torch_forward_and_gradient(channels, channels_last):
    g = torch.Generator().manual_seed(channels)
    # scaled so that the sum of squares moves the denominator well away from k
    x = torch.randn(5, channels, 6, 7, generator=g) * 150
    grad = torch.randn(5, channels, 6, 7, generator=g)
    if channels_last:
        x, grad = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad))
    y_ref, dx_ref = forward_backward(alexnet_lrn(nn.LocalResponseNorm), x, grad)
    grad_before = grad.clone()
    y, dx = forward_backward(alexnet_lrn(LocalResponseNorm), x, grad)
    assert torch.equal(grad, grad_before)  # the incoming gradient is not written to
    assert (y / x).std() > 0.05  # LRN does something at this scale
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-6)
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("size", [4, 5])
def test_gradient_matches_finite_differences_in_float64(size):
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    layer = LocalResponseNorm(size, alpha=0.1, beta=0.75, k=2.0)
    assert torch.autograd.gradcheck(layer, (x.requires_grad_(),), fast_mode=True)
    other = LocalResponseNorm(size, alpha=0.1, beta=0.6, k=1.0)  # beta without the sqrt shortcut
    torch.testing.assert_close(other(x), nn.LocalResponseNorm(size, 0.1, 0.6, 1.0)(x))


def test_bf16_autocast_keeps_dtype_and_stays_close():
    x = (torch.relu(torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(1))) * 150)
    x = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = alexnet_lrn(LocalResponseNorm)(x)
    ref = alexnet_lrn(nn.LocalResponseNorm)(x.float())
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2)


def test_a_lrn_uses_it_and_empty_batches_and_meta_tensors_pass():
    net = build_vgg("A-LRN", num_classes=3, width=0.125, crop=32)
    assert sum(isinstance(m, LocalResponseNorm) for m in net.features) == 1
    assert forward_macs(net) == forward_macs(build_vgg("A", num_classes=3, width=0.125, crop=32))
    x = torch.zeros(0, 3, 32, 32, requires_grad=True)
    net(x).sum().backward()
    assert x.grad.shape == x.shape
