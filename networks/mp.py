"""Magnitude-preserving building blocks of the EDM2 network (docs/design.md §3; EDM2 paper, App. B).

Every layer here keeps unit-variance inputs at unit variance, which is what lets the network train
without biases, group norms or loss scaling.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

NORM_EPS = 1e-4


def normalize(x: torch.Tensor, dim: int | Sequence[int] | None = None, eps: float = NORM_EPS) -> torch.Tensor:
    """x / (eps + ||x|| / sqrt(fan)), the norm taken over `dim` (default: all but the first axis).

    For a weight tensor this scales every output unit to norm sqrt(fan_in), i.e. unit variance per
    element. The norm is computed in float32 whatever the dtype of x.
    """
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    # One add with alpha (eps + alpha * norm in one rounding on the CPU), as the reference computes it: two
    # separate operations round differently in about 1 in 8 elements.
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def pixel_norm(x: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """Normalize each pixel's feature vector (channel axis 1) to unit RMS."""
    return normalize(x, dim=1, eps=eps)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU scaled back to unit magnitude for standard normal input (Eq. 81)."""
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Weighted sum (1-t) a + t b, rescaled so that uncorrelated unit inputs give unit output (Eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Concatenate along `dim` so that the two parts contribute with weights (1-t) and t (Eq. 103)."""
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    wa = c / math.sqrt(na) * (1 - t)
    wb = c / math.sqrt(nb) * t
    return torch.cat([wa * a, wb * b], dim=dim)


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether a 4-D tensor is stored NHWC, and not also plain contiguous (as when C or H * W is 1)."""
    return x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def resample(x: torch.Tensor, mode: str = "keep") -> torch.Tensor:
    """'down': 2x2 box average with stride 2; 'up': nearest-neighbour x2; 'keep': identity."""
    if mode == "keep":
        return x
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return upsample_nearest2x(x)
    raise ValueError(f"resample: mode must be 'keep', 'down' or 'up', got {mode!r}")


def upsample_nearest2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour x2 as a broadcast of every pixel to a 2x2 patch: F.interpolate's values, but the gradient
    is a sum over each patch, where interpolate's backward scatters with atomic adds (slow under torch.compile).
    Channels-last input is expanded in its token-major view, so the output stays channels-last without a copy."""
    n, c, h, w = x.shape
    if is_channels_last(x):
        y = x.permute(0, 2, 3, 1)[:, :, None, :, None, :].expand(n, h, 2, w, 2, c)
        return y.reshape(n, 2 * h, 2 * w, c).permute(0, 3, 1, 2)
    return x[:, :, :, None, :, None].expand(n, c, h, 2, w, 2).reshape(n, c, 2 * h, 2 * w)


class MPFourier(torch.nn.Module):
    """Random Fourier features of a scalar (the noise level), sqrt(2) cos(x f + p), in float32 (Eq. 75)."""

    def __init__(
        self,
        num_channels: int,  # number of features
        bandwidth: float = 1,  # std of the frequencies, in cycles per unit
    ):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.to(torch.float32).reshape(-1, 1) * self.freqs.to(torch.float32) + self.phases.to(torch.float32)
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(torch.nn.Module):
    """Convolution (kernel [kh, kw]) or linear layer (kernel []) without bias, with weight normalization.

    The effective weight is normalize(weight) * gain / sqrt(fan_in) (Eq. 47), computed in float32 and cast
    to the activation dtype. Forced weight normalization (Eq. 66), which rewrites the stored weight to unit
    norm per output unit, is done outside forward by `normalize_weight_()` (see
    `Precond.normalize_weights_`), so that forward stays a pure function that torch.compile can trace.
    """

    def __init__(
        self,
        in_channels: int,  # input channels (fan-in per kernel tap)
        out_channels: int,  # output channels
        kernel: Sequence[int],  # [] for a linear layer, [kh, kw] for a convolution
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))
        self._cache: tuple[tuple, torch.Tensor] | None = None  # inference: the last effective weight

    @torch.no_grad()
    def normalize_weight_(self) -> None:
        """Forced weight normalization: overwrite the stored weight by normalize(weight)."""
        w = self.weight
        if w.dtype != torch.float32:
            w.copy_(normalize(w.to(torch.float32)))
            return
        norm = torch.linalg.vector_norm(w, dim=list(range(1, w.ndim)), keepdim=True)
        w.div_(NORM_EPS + norm * math.sqrt(norm.numel() / w.numel()))  # = normalize(w), in place: one pass

    def effective_weight(
        self, gain: float | torch.Tensor = 1, dtype: torch.dtype = torch.float32, channels_last: bool = False
    ) -> torch.Tensor:
        """normalize(weight) * gain / sqrt(fan_in) in `dtype` (Eq. 47). Without autograd and with a constant gain (a
        number or a parameter; sampling), the result is kept until the weight or gain changes, so it is computed once,
        not per call."""
        cacheable = (
            not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and (not isinstance(gain, torch.Tensor) or isinstance(gain, torch.nn.Parameter))
        )
        if cacheable:
            wt = self.weight
            g = (gain.data_ptr(), gain._version, gain.dtype) if isinstance(gain, torch.Tensor) else float(gain)
            key = (wt.data_ptr(), wt._version, wt.dtype, wt.device, dtype, g, channels_last)
            if self._cache is not None and self._cache[0] == key:
                return self._cache[1]
        w = normalize(self.weight.to(torch.float32))
        w = (w * (gain / math.sqrt(w[0].numel()))).to(dtype)
        if channels_last and w.ndim == 4:  # laid out like the activations (channels-last on CUDA): no transposes
            w = w.contiguous(memory_format=torch.channels_last)
        if cacheable:
            self._cache = (key, w)
        return w

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1) -> torch.Tensor:
        w = self.effective_weight(gain, x.dtype, is_channels_last(x))
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": None}  # deep copies (EMA) and pickles leave the cache behind

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel={list(self.weight.shape[2:])}"


class CosineAttention(torch.nn.Module):
    """Self-attention with pixel-normalized queries and keys, in the reference's operations and order (explicit
    scores and softmax over channel-major views), which give its values to the last bit on the CPU. No parameters:
    the speed layer (accel/) swaps it for a fused version with the same function.

    Input qkv: [N, 3C, H, W] laid out as [heads, C/heads, 3] along the channel axis (the reference layout, so that
    official weights load unchanged). Output: [N, C, H, W].
    """

    def __init__(self, num_heads: int):
        super().__init__()
        self.num_heads = num_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        n, c3, h, w = qkv.shape
        y = qkv.reshape(n, self.num_heads, c3 // (3 * self.num_heads), 3, h * w)
        q, k, v = normalize(y, dim=2).unbind(3)  # each [N, heads, C/heads, HW]
        scores = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2]))
        return torch.einsum("nhqk,nhck->nhcq", scores.softmax(dim=3), v).reshape(n, c3 // 3, h, w)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}"


class Dropout(torch.nn.Module):
    """Dropout with probability p in training mode, the identity otherwise or for p = 0 (no random draw then, as the
    reference). No parameters: the speed layer (accel/) swaps it for one with a cheaper keep-mask on CUDA."""

    def __init__(self, p: float = 0):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p!r}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, p=self.p) if self.training and self.p != 0 else x

    def extra_repr(self) -> str:
        return f"p={self.p}"
