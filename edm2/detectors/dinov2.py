"""The FD_DINOv2 feature detector: DINOv2 ViT-L/14 (Oquab et al. 2023), 1024-d class-token features.

A plain pre-norm Vision Transformer: 14x14 patches embedded by a strided convolution, a class token, learned
positional embeddings for a 37x37 grid (518x518 pretraining input) plus the class token, 24 blocks of
    x = x + ls1 * attn(norm1(x)),   x = x + ls2 * mlp(norm2(x))
(16 heads, MLP ratio 4 with exact GELU, LayerScale vectors `gamma`, LayerNorm eps 1e-6, biases everywhere),
a final LayerNorm; the feature is the normalised class token. The checkpoint's `mask_token` is kept (unused
at inference) so that Meta's file loads strictly.

Input handling (`DINOv2ViT.forward`, as in the EDM2 paper's FD_DINOv2): uint8 RGB -> float / 255 -> bicubic
resize with antialiasing to 224x224 -> ImageNet mean / std. A 224 input is a 16x16 patch grid; the 37x37
positional embeddings are resized to it the way DINOv2 does: bicubic (no antialiasing, align_corners False)
with the scale factor (16 + 0.1) / 37 rather than the target size (the +0.1 guards against rounding in the
output size; it also shifts the sampling positions slightly, and that is what the published features used).

Parameter names are those of Meta's `dinov2_vitl14_pretrain.pth`: `cls_token`, `pos_embed`, `mask_token`,
`patch_embed.proj.weight`, `blocks.0.norm1.weight`, `blocks.0.attn.qkv.weight`, `blocks.0.ls1.gamma`,
`blocks.0.mlp.fc1.weight`, ..., `norm.weight`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .inception import check_uint8_rgb

FEATURE_DIM = 1024  # ViT-L width
INPUT_RESOLUTION = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POS_OFFSET = 0.1  # DINOv2's offset in the positional-embedding scale factor
LN_EPS = 1e-6


class LayerScale(torch.nn.Module):
    """Per-channel learned scale of a residual branch."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(torch.nn.Module):
    """Multi-head self-attention with one fused qkv projection; softmax(q k^T / sqrt(d_head)) v."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"Attention: width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, tokens, dim = x.shape
        qkv = self.qkv(x).view(n, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [n, heads, tokens, d_head]
        return self.proj(y.transpose(1, 2).reshape(n, tokens, dim))


class MLP(torch.nn.Module):
    """fc1 -> GELU (exact) -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = torch.nn.Linear(dim, hidden)
        self.fc2 = torch.nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(torch.nn.Module):
    """Pre-norm transformer block with LayerScale on both residual branches."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = torch.nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(torch.nn.Module):
    """Non-overlapping patches -> tokens: a convolution with kernel = stride = patch size."""

    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [N, grid*grid, dim]


def resize_positional_grid(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """Patch positional embeddings [1, M*M, D] -> [1, grid*grid, D]: bicubic with the scale factor
    (grid + 0.1) / M as DINOv2 computes it (see the module docstring)."""
    m = math.isqrt(pos.shape[1])
    if m * m != pos.shape[1]:
        raise ValueError(f"positional embeddings: {pos.shape[1]} patch positions do not form a square grid")
    if grid == m:
        return pos
    dim = pos.shape[2]
    scale = (grid + POS_OFFSET) / m
    x = pos.reshape(1, m, m, dim).permute(0, 3, 1, 2).to(torch.float32)
    x = F.interpolate(x, scale_factor=(scale, scale), mode="bicubic", align_corners=False)
    if x.shape[-2:] != (grid, grid):
        raise RuntimeError(f"positional embeddings: resized to {list(x.shape[-2:])}, expected {grid}x{grid}")
    return x.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos.dtype)


class DINOv2ViT(torch.nn.Module):
    """uint8 RGB images [N, 3, H, W] (any size) -> float32 class-token features [N, embed_dim]."""

    metric = "fd_dinov2"

    def __init__(
        self,
        resolution: int = INPUT_RESOLUTION,  # images are resized to resolution x resolution (224)
        patch_size: int = 14,  # pixels per patch side
        embed_dim: int = FEATURE_DIM,  # token width (= feature dimension)
        depth: int = 24,  # transformer blocks
        num_heads: int = 16,  # attention heads
        mlp_ratio: float = 4.0,  # MLP hidden width / embed_dim
        pos_grid: int = 37,  # side of the pretrained positional-embedding grid (518 / 14)
    ):
        super().__init__()
        if not (isinstance(resolution, int) and isinstance(patch_size, int) and resolution % patch_size == 0):
            raise ValueError(f"DINOv2ViT: resolution {resolution!r} must be a multiple of patch_size {patch_size!r}")
        self.init_kwargs = {
            "resolution": resolution,
            "patch_size": patch_size,
            "embed_dim": embed_dim,
            "depth": depth,
            "num_heads": num_heads,
            "mlp_ratio": float(mlp_ratio),
            "pos_grid": pos_grid,
        }
        self.resolution = resolution
        self.feature_dim = embed_dim
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = torch.nn.Parameter(torch.zeros(1, pos_grid * pos_grid + 1, embed_dim))
        self.mask_token = torch.nn.Parameter(torch.zeros(1, embed_dim))  # masked-modelling token, unused here
        self.blocks = torch.nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = torch.nn.LayerNorm(embed_dim, eps=LN_EPS)
        self.eval().requires_grad_(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] -> float32 [N, 3, R, R]: / 255, bicubic antialiased resize, ImageNet mean / std."""
        check_uint8_rgb(images, "DINOv2ViT")
        x = images.to(torch.float32) / 255
        if x.shape[-2:] != (self.resolution, self.resolution):
            size = (self.resolution, self.resolution)
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images)
        tokens = self.patch_embed(x)
        grid = self.resolution // self.patch_embed.proj.kernel_size[0]
        pos = torch.cat([self.pos_embed[:, :1], resize_positional_grid(self.pos_embed[:, 1:], grid)], dim=1)
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1) + pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]
