"""pipeline.modeling.conv: channels-last convolutions whose weight gradient comes from NCHW."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from pipeline.modeling import conv as conv_module
from pipeline.modeling.conv import Conv2d, conv2d

CL = torch.channels_last


@pytest.fixture(autouse=True)
def small_maps_qualify(monkeypatch):
    """Test-sized maps take the NCHW weight gradient (by default only large ones do)."""
    monkeypatch.setattr(conv_module, "MIN_PIXELS", 1)
    monkeypatch.setattr(conv_module, "MIN_CHANNELS", 1)


def leaves(*shapes, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        t = torch.randn(*shape, generator=generator, dtype=dtype)
        if t.dim() == 4:
            t = t.contiguous(memory_format=CL)
        out.append(t.requires_grad_())
    return out


@pytest.mark.parametrize(
    "kernel, stride, padding, dilation, groups, bias",
    [(3, 1, 1, 1, 1, True), (3, 2, 1, 1, 1, False), (3, 1, 2, 2, 1, True), (5, 2, 2, 1, 2, True)],
)
def test_matches_conv2d_and_takes_the_nchw_weight_gradient(
    kernel, stride, padding, dilation, groups, bias
):
    x, w, b = leaves((2, 8, 13, 11), (6, 8 // groups, kernel, kernel), (6,))
    b = b if bias else None
    ours = conv2d(x, w, b, stride, padding, dilation, groups)
    theirs = F.conv2d(x, w, b, stride, padding, dilation, groups)
    assert type(ours.grad_fn).__name__ == "_ConvNCHWWeightGradBackward"
    assert_close(ours, theirs, rtol=0, atol=0)
    grad = torch.randn_like(theirs)
    inputs = (x, w) if b is None else (x, w, b)
    for a, e in zip(
        torch.autograd.grad(ours, inputs, grad),
        torch.autograd.grad(theirs, inputs, grad),
        strict=True,
    ):
        assert_close(a, e, rtol=1e-4, atol=1e-4)  # sums of 100s of products, in another order
        assert a.stride() == e.stride()  # the weight gradient stays channels-last, as the weight


def test_gradcheck():
    x, w, b = leaves((1, 3, 5, 4), (2, 3, 3, 3), (2,), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x, w, b: conv2d(x, w, b, 1, 1), (x, w, b))


def test_input_without_gradient():
    (w,) = leaves((4, 3, 3, 3))
    x = torch.randn(2, 3, 9, 9).contiguous(memory_format=CL)
    (grad_w,) = torch.autograd.grad(conv2d(x, w, None, 1, 1).sum(), (w,))
    (expected,) = torch.autograd.grad(F.conv2d(x, w, None, 1, 1).sum(), (w,))
    assert_close(grad_w, expected)


def test_small_maps_and_few_channels_keep_conv2d(monkeypatch):
    monkeypatch.setattr(conv_module, "MIN_PIXELS", 50)
    monkeypatch.setattr(conv_module, "MIN_CHANNELS", 4)
    (w,) = leaves((4, 4, 3, 3))
    (w3,) = leaves((4, 3, 3, 3))
    big, small = leaves((1, 4, 10, 5), (1, 4, 7, 7))
    (narrow,) = leaves((1, 3, 10, 5))
    assert type(conv2d(big, w, padding=1).grad_fn).__name__ == "_ConvNCHWWeightGradBackward"
    assert type(conv2d(small, w, padding=1).grad_fn).__name__ == "ConvolutionBackward0"
    assert type(conv2d(narrow, w3, padding=1).grad_fn).__name__ == "ConvolutionBackward0"


def test_plain_conv2d_where_channels_last_is_not_slower():
    x, w = leaves((2, 4, 6, 6), (4, 4, 3, 3))
    (w1,) = leaves((4, 4, 1, 1))
    cases = {
        "1x1 kernel": lambda: conv2d(x, w1),
        "NCHW input": lambda: conv2d(x.contiguous(), w, padding=1),
        "frozen weight": lambda: conv2d(x, w.detach(), padding=1),
        "string padding": lambda: conv2d(x, w, padding="same"),
    }
    for name, call in cases.items():
        assert type(call().grad_fn).__name__ == "ConvolutionBackward0", name
    with torch.no_grad():
        assert conv2d(x, w, padding=1).grad_fn is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv2d(x, w, padding=1)
    assert out.dtype == torch.bfloat16  # autocast's own convolution, not the rerouted one


def test_module_is_a_drop_in_conv2d():
    torch.manual_seed(0)
    ours = Conv2d(4, 5, 3, padding=1).to(memory_format=CL)
    plain = torch.nn.Conv2d(4, 5, 3, padding=1).to(memory_format=CL)
    plain.load_state_dict(ours.state_dict())
    assert isinstance(ours, torch.nn.Conv2d)
    assert ours.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(2, 4, 7, 7).contiguous(memory_format=CL)
    ours(x).square().sum().backward()
    plain(x).square().sum().backward()
    assert_close(ours.weight.grad, plain.weight.grad)
    assert_close(ours.bias.grad, plain.bias.grad)
