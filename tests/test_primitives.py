"""Each magnitude-preserving primitive against its equation, and its magnitude on unit-variance input."""

from __future__ import annotations

import math

import pytest
import torch

from accel import FusedCosineAttention
from networks import (
    CosineAttention, MPConv, MPFourier, Precond, mp_cat, mp_silu, mp_sum, normalize, pixel_norm, resample
)


def rms(x: torch.Tensor) -> float:
    return x.double().square().mean().sqrt().item()


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def test_normalize_equation(gen):
    w = torch.randn(8, 5, 3, 3, generator=gen) * 3
    n = normalize(w)
    fan_in = 5 * 9
    expected = w / (1e-4 + w.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1) / math.sqrt(fan_in))
    assert torch.allclose(n, expected, rtol=1e-6, atol=0)
    assert torch.allclose(n.flatten(1).norm(dim=1), torch.full([8], math.sqrt(fan_in)), rtol=1e-4)


def test_normalize_norm_in_float32_for_half_input(gen):
    x = (torch.randn(4, 300, generator=gen) * 30).half()  # sum of squares overflows float16
    y = normalize(x)
    assert torch.isfinite(y).all()
    assert abs(rms(y) - 1) < 1e-2


def test_pixel_norm_unit_rms_per_pixel(gen):
    x = torch.randn(2, 16, 4, 4, generator=gen) * 5
    y = pixel_norm(x)
    per_pixel = y.square().mean(dim=1).sqrt()
    assert torch.allclose(per_pixel, torch.ones_like(per_pixel), rtol=1e-3)


def test_mp_silu_equation_and_magnitude(gen):
    x = torch.randn(1 << 20, generator=gen)
    assert torch.allclose(mp_silu(x), x * torch.sigmoid(x) / 0.596)
    assert abs(rms(mp_silu(x)) - 1) < 0.02


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 0.9])
def test_mp_sum_equation_and_magnitude(gen, t):
    a, b = torch.randn(2, 1 << 18, generator=gen)
    expected = ((1 - t) * a + t * b) / math.sqrt((1 - t) ** 2 + t**2)
    assert torch.allclose(mp_sum(a, b, t), expected, atol=1e-6)
    assert abs(rms(mp_sum(a, b, t)) - 1) < 0.02


@pytest.mark.parametrize("t", [0.3, 0.5, 0.7])
def test_mp_cat_equation_and_magnitude(gen, t):
    a = torch.randn(64, 96, 8, 8, generator=gen)
    b = torch.randn(64, 32, 8, 8, generator=gen)
    y = mp_cat(a, b, t=t)
    c = math.sqrt((96 + 32) / ((1 - t) ** 2 + t**2))
    assert torch.allclose(y[:, :96], c * (1 - t) / math.sqrt(96) * a, atol=1e-6)
    assert torch.allclose(y[:, 96:], c * t / math.sqrt(32) * b, atol=1e-6)
    assert abs(rms(y) - 1) < 0.02
    # The weights are the contributions' shares: part energies in ratio (1-t)^2 : t^2.
    ratio = y[:, :96].square().sum() / y[:, 96:].square().sum()
    assert abs(ratio.item() / ((1 - t) ** 2 / t**2) - 1) < 0.02


@pytest.mark.parametrize("kernel", [[], [1, 1], [3, 3]])
def test_mpconv_magnitude_and_equation(gen, kernel):
    torch.manual_seed(1)
    conv = MPConv(256, 128, kernel=kernel)
    conv.weight.data.mul_(7)  # any scale: the weight is normalized before use
    x = torch.randn(512 if not kernel else 16, 256, *([16, 16] if kernel else []), generator=gen)
    y = conv(x)
    # Zero padding feeds border pixels fewer inputs; the claim is about pixels with a full receptive field.
    assert abs(rms(y[..., 1:-1, 1:-1] if kernel else y) - 1) < 0.02
    w = normalize(conv.weight) / math.sqrt(conv.weight[0].numel())
    ref = x @ w.t() if not kernel else torch.nn.functional.conv2d(x, w, padding=kernel[0] // 2)
    assert torch.allclose(y, ref, atol=1e-5)
    assert torch.allclose(conv(x, gain=0.5), 0.5 * y, atol=1e-6)


def test_mpconv_forced_normalization(gen):
    conv = MPConv(10, 4, kernel=[3, 3])
    conv.weight.data.mul_(5)
    conv.normalize_weight_()
    norms = conv.weight.flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.full([4], math.sqrt(90.0)), rtol=1e-4)


def test_mpfourier_equation_and_magnitude(gen):
    torch.manual_seed(2)
    f = MPFourier(4096)
    x = torch.randn(8, generator=gen)
    y = f(x)
    assert y.dtype == torch.float32 and y.shape == (8, 4096)
    assert torch.allclose(y, math.sqrt(2) * torch.cos(x[:, None] * f.freqs + f.phases), atol=1e-5)
    assert abs(rms(y) - 1) < 0.03
    assert f(x.half()).dtype == torch.float16


def test_resample(gen):
    x = torch.randn(2, 3, 4, 4, generator=gen)
    down = resample(x, "down")
    assert torch.allclose(down[:, :, 1, 0], x[:, :, 2:4, 0:2].mean(dim=(2, 3)))
    up = resample(x, "up")
    assert up.shape == (2, 3, 8, 8) and torch.equal(up[:, :, 5, 2], x[:, :, 2, 1])
    assert torch.equal(up, torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"))
    # Channels-last input (the CUDA layout) gives the same values and stays channels-last; the gradient of
    # each input pixel is the sum over its 2x2 patch, in both layouts.
    for xin in (x, x.contiguous(memory_format=torch.channels_last)):
        xin = xin.detach().requires_grad_(True)
        up = resample(xin, "up")
        assert torch.equal(up, torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"))
        assert up.is_contiguous(memory_format=torch.channels_last) == (xin.stride(1) == 1)
        g = torch.randn(up.shape, generator=gen)
        up.backward(g)
        assert torch.allclose(xin.grad, g.reshape(2, 3, 4, 2, 4, 2).sum(dim=(3, 5)), atol=1e-6)
    assert resample(x, "keep") is x
    with pytest.raises(ValueError, match="mode"):
        resample(x, "sideways")


@pytest.mark.parametrize("kind", [CosineAttention, FusedCosineAttention])
def test_cosine_attention_matches_explicit_softmax(gen, kind):
    heads, c, hw = 2, 8, 5
    qkv = torch.randn(3, 3 * heads * c, hw, 1, generator=gen)
    y = kind(heads)(qkv)
    v = qkv.reshape(3, heads, c, 3, hw)
    q, k, val = [normalize(t, dim=2) for t in v.unbind(3)]
    w = torch.softmax(torch.einsum("nhcq,nhck->nhqk", q, k) / math.sqrt(c), dim=3)
    expected = torch.einsum("nhqk,nhck->nhcq", w, val).reshape(3, heads * c, hw, 1)
    assert torch.allclose(y, expected, atol=1e-5)


def test_block_keeps_unit_magnitude_at_init():
    torch.manual_seed(3)
    net = Precond(
        16, 4, label_dim=10, model_channels=32, channel_mult=[1, 2], attn_resolutions=[8], channels_per_head=16
    )
    x = torch.randn(8, 5, 16, 16)
    emb = torch.randn(8, 64)
    for name, block in net.unet.enc.items():
        if not name.endswith("_conv"):
            x = block(x, emb)
            assert 0.8 < rms(x) < 1.2, name
        else:
            x = block(x)


def test_forward_traces_as_one_graph():
    """torch.compile sees the whole forward as one graph: nothing in it forces a break."""
    net = Precond(
        16, 4, label_dim=10, model_channels=16, channel_mult=[1, 2], attn_resolutions=[8], channels_per_head=16
    )
    x, sigma, labels = torch.randn(2, 4, 16, 16), torch.tensor([0.5, 3.0]), torch.eye(10)[:2]
    explanation = torch._dynamo.explain(net)(x, sigma, labels)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
