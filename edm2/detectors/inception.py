"""The FID feature detector: Inception-v3 as in the 2015-12-05 TensorFlow graph, 2048-d pool features.

Architecture of Szegedy et al. ("Rethinking the Inception Architecture", 2015) with the quirks of the graph
that every published FID number was computed with:
- the pool branches of the 35x35, 17x17 and first 8x8 blocks average over the valid pixels only (TF's SAME
  average pooling does not count the padding);
- the pool branch of the last 8x8 block (Mixed_7c) is a max pool;
- batch norm with epsilon 0.001, no conv biases, a 1008-way classifier (kept so that the checkpoint loads
  strictly; FID uses the 2048-d average-pooled features before it).

Input handling (`InceptionV3FID.forward`): uint8 RGB [N, 3, H, W] -> float -> bilinear resize to 299x299 the
way the TF graph's ResizeBilinear does it (legacy TF: no half-pixel centres, no antialiasing; output pixel
i samples the input at i * in / out, clamped at the border) -> (x - 128) / 128, as the graph's Sub / Mul
nodes do. pytorch-fid instead uses torch's half-pixel bilinear resize and 2 * x / 255 - 1; the difference
is small but shifts FID in the second decimal, so this module follows the TF graph.

Parameter names are those of the widely used `pt_inception-2015-12-05-6726825d.pth` (pytorch-fid's port of
the TF weights): `Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch_pool.bn.running_var`, ..., `fc.weight`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FEATURE_DIM = 2048  # pool_3 features of the full-width network
INPUT_RESOLUTION = 299  # the graph's resize target
NUM_CLASSES = 1008  # the 2015-12-05 graph's classifier width
BN_EPS = 1e-3


# ----------------------------------------------------------------------------------------------------------
# Input resize


def tf_legacy_bilinear_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of [N, C, H, W] to [N, C, size, size] like TF1's ResizeBilinear (align_corners=False,
    half_pixel_centers=False): output index i reads the input at source = i * in / out, interpolating
    between floor(source) and floor(source) + 1 (clamped to the last pixel). No antialiasing."""
    for dim in (2, 3):
        n_in = x.shape[dim]
        if n_in == size:
            continue
        source = torch.arange(size, dtype=torch.float64, device=x.device) * (n_in / size)
        lo = source.floor().long().clamp_(max=n_in - 1)
        hi = (lo + 1).clamp_(max=n_in - 1)
        frac = (source - lo.to(torch.float64)).to(x.dtype)
        shape = [1, 1, 1, 1]
        shape[dim] = size
        a, b = x.index_select(dim, lo), x.index_select(dim, hi)
        x = a + (b - a) * frac.view(shape)
    return x


# ----------------------------------------------------------------------------------------------------------
# Layers


class FrozenBatchNorm(torch.nn.Module):
    """Batch norm with fixed statistics (inference only): y = (x - mean) / sqrt(var + eps) * weight + bias."""

    def __init__(self, channels: int, eps: float = BN_EPS):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(channels))
        self.bias = torch.nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


class ConvBN(torch.nn.Module):
    """Convolution without bias, frozen batch norm, ReLU: the unit every Inception branch is built of."""

    def __init__(
        self,
        in_channels: int,  # input channels
        out_channels: int,  # output channels
        kernel: int | tuple[int, int],  # kernel size (square or (kh, kw))
        stride: int = 1,  # stride
        padding: int | tuple[int, int] = 0,  # zero padding (the graph's SAME convolutions keep the size)
    ):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding, bias=False)
        self.bn = FrozenBatchNorm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def avg_pool_valid_only(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-1 average over the pixels inside the image (TF SAME pooling: padding is not counted)."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def max_pool_same(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-1 max pool keeping the size (the last block's pool branch in the FID graph)."""
    return F.max_pool2d(x, 3, stride=1, padding=1)


def max_pool_reduce(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-2 max pool without padding (the grid reductions)."""
    return F.max_pool2d(x, 3, stride=2)


# ----------------------------------------------------------------------------------------------------------
# Blocks (attribute names are the checkpoint's)


class Mixed35(torch.nn.Module):
    """35x35 block (Mixed_5b/c/d): 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | valid-average pool -> 1x1."""

    def __init__(self, in_channels: int, pool_channels: int, w):
        super().__init__()
        self.branch1x1 = ConvBN(in_channels, w(64), 1)
        self.branch5x5_1 = ConvBN(in_channels, w(48), 1)
        self.branch5x5_2 = ConvBN(w(48), w(64), 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, w(64), 1)
        self.branch3x3dbl_2 = ConvBN(w(64), w(96), 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(w(96), w(96), 3, padding=1)
        self.branch_pool = ConvBN(in_channels, pool_channels, 1)
        self.out_channels = w(64) + w(64) + w(96) + pool_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(avg_pool_valid_only(x))
        return torch.cat([a, b, c, d], dim=1)


class Reduce35to17(torch.nn.Module):
    """Grid reduction Mixed_6a: 3x3 stride 2 | 1x1 -> 3x3 -> 3x3 stride 2 | max pool stride 2."""

    def __init__(self, in_channels: int, w):
        super().__init__()
        self.branch3x3 = ConvBN(in_channels, w(384), 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, w(64), 1)
        self.branch3x3dbl_2 = ConvBN(w(64), w(96), 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(w(96), w(96), 3, stride=2)
        self.out_channels = w(384) + w(96) + in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([a, b, max_pool_reduce(x)], dim=1)


class Mixed17(torch.nn.Module):
    """17x17 block (Mixed_6b..e) with factorised 7x7 convolutions (1x7 and 7x1) of width c7."""

    def __init__(self, in_channels: int, c7: int, w):
        super().__init__()
        row, col = {"kernel": (1, 7), "padding": (0, 3)}, {"kernel": (7, 1), "padding": (3, 0)}
        self.branch1x1 = ConvBN(in_channels, w(192), 1)
        self.branch7x7_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, **row)
        self.branch7x7_3 = ConvBN(c7, w(192), **col)
        self.branch7x7dbl_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, **col)
        self.branch7x7dbl_3 = ConvBN(c7, c7, **row)
        self.branch7x7dbl_4 = ConvBN(c7, c7, **col)
        self.branch7x7dbl_5 = ConvBN(c7, w(192), **row)
        self.branch_pool = ConvBN(in_channels, w(192), 1)
        self.out_channels = 4 * w(192)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            c = layer(c)
        d = self.branch_pool(avg_pool_valid_only(x))
        return torch.cat([a, b, c, d], dim=1)


class Reduce17to8(torch.nn.Module):
    """Grid reduction Mixed_7a: 1x1 -> 3x3 stride 2 | 1x1 -> 1x7 -> 7x1 -> 3x3 stride 2 | max pool stride 2."""

    def __init__(self, in_channels: int, w):
        super().__init__()
        self.branch3x3_1 = ConvBN(in_channels, w(192), 1)
        self.branch3x3_2 = ConvBN(w(192), w(320), 3, stride=2)
        self.branch7x7x3_1 = ConvBN(in_channels, w(192), 1)
        self.branch7x7x3_2 = ConvBN(w(192), w(192), (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(w(192), w(192), (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(w(192), w(192), 3, stride=2)
        self.out_channels = w(320) + w(192) + in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b = layer(b)
        return torch.cat([a, b, max_pool_reduce(x)], dim=1)


class Mixed8(torch.nn.Module):
    """8x8 block (Mixed_7b/c): 1x1 | 1x1 -> (1x3, 3x1) | 1x1 -> 3x3 -> (1x3, 3x1) | pool -> 1x1.

    The pool is a valid-only average in Mixed_7b and a max pool in Mixed_7c (the FID graph's quirk)."""

    def __init__(self, in_channels: int, w, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        row, col = {"kernel": (1, 3), "padding": (0, 1)}, {"kernel": (3, 1), "padding": (1, 0)}
        self.branch1x1 = ConvBN(in_channels, w(320), 1)
        self.branch3x3_1 = ConvBN(in_channels, w(384), 1)
        self.branch3x3_2a = ConvBN(w(384), w(384), **row)
        self.branch3x3_2b = ConvBN(w(384), w(384), **col)
        self.branch3x3dbl_1 = ConvBN(in_channels, w(448), 1)
        self.branch3x3dbl_2 = ConvBN(w(448), w(384), 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(w(384), w(384), **row)
        self.branch3x3dbl_3b = ConvBN(w(384), w(384), **col)
        self.branch_pool = ConvBN(in_channels, w(192), 1)
        self.out_channels = w(320) + 4 * w(384) + w(192)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], dim=1)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], dim=1)
        d = self.branch_pool(max_pool_same(x) if self.max_pool else avg_pool_valid_only(x))
        return torch.cat([a, b, c, d], dim=1)


# ----------------------------------------------------------------------------------------------------------
# The network


class InceptionV3FID(torch.nn.Module):
    """uint8 RGB images [N, 3, H, W] (any size) -> float32 pool features [N, feature_dim] (2048 at full width)."""

    metric = "fid"

    def __init__(
        self,
        resolution: int = INPUT_RESOLUTION,  # images are resized to resolution x resolution (299 for FID)
        width: float = 1.0,  # channel multiplier; 1 = the published network (tests use narrow ones)
        num_classes: int = NUM_CLASSES,  # classifier outputs (unused for FID; present in the checkpoint)
    ):
        super().__init__()
        if not (isinstance(resolution, int) and resolution >= 75):
            raise ValueError(f"InceptionV3FID: resolution must be an integer >= 75, got {resolution!r}")
        if not (isinstance(width, (int, float)) and 0 < width <= 1):
            raise ValueError(f"InceptionV3FID: width must be in (0, 1], got {width!r}")
        self.init_kwargs = {"resolution": resolution, "width": float(width), "num_classes": num_classes}
        self.resolution = resolution

        def w(channels: int) -> int:
            return max(1, round(channels * width))

        self.Conv2d_1a_3x3 = ConvBN(3, w(32), 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(w(32), w(32), 3)
        self.Conv2d_2b_3x3 = ConvBN(w(32), w(64), 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(w(64), w(80), 1)
        self.Conv2d_4a_3x3 = ConvBN(w(80), w(192), 3)
        self.Mixed_5b = Mixed35(w(192), w(32), w)
        self.Mixed_5c = Mixed35(self.Mixed_5b.out_channels, w(64), w)
        self.Mixed_5d = Mixed35(self.Mixed_5c.out_channels, w(64), w)
        self.Mixed_6a = Reduce35to17(self.Mixed_5d.out_channels, w)
        self.Mixed_6b = Mixed17(self.Mixed_6a.out_channels, w(128), w)
        self.Mixed_6c = Mixed17(self.Mixed_6b.out_channels, w(160), w)
        self.Mixed_6d = Mixed17(self.Mixed_6c.out_channels, w(160), w)
        self.Mixed_6e = Mixed17(self.Mixed_6d.out_channels, w(192), w)
        self.Mixed_7a = Reduce17to8(self.Mixed_6e.out_channels, w)
        self.Mixed_7b = Mixed8(self.Mixed_7a.out_channels, w, max_pool=False)
        self.Mixed_7c = Mixed8(self.Mixed_7b.out_channels, w, max_pool=True)
        self.feature_dim = self.Mixed_7c.out_channels
        self.fc = torch.nn.Linear(self.feature_dim, num_classes)
        self.eval().requires_grad_(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] -> float32 [N, 3, R, R] in [-1, 1) as the TF graph feeds its first convolution."""
        check_uint8_rgb(images, "InceptionV3FID")
        x = tf_legacy_bilinear_resize(images.to(torch.float32), self.resolution)
        return (x - 128) / 128

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = max_pool_reduce(x)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = max_pool_reduce(x)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
            x = block(x)
        for block in (self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))  # pool_3: average over the 8x8 grid


def check_uint8_rgb(images: torch.Tensor, who: str) -> None:
    """ValueError unless images is a uint8 tensor [N, 3, H, W]."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        got = f"{images.dtype} {list(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{who}: expected uint8 RGB images [N, 3, H, W], got {got}")
