"""A U-ViT backbone built from the magnitude-preserving primitives (docs/design.md §9; Bao et al., "All are Worth
Words", CVPR 2023, as used by the ScaleLong paper).

Layout: the image (with a constant channel of ones, as in the EDM2 U-Net) is cut into p x p patches and
mapped to tokens; a time token (Fourier features of c_noise) and, for conditional networks, a class token
are put in front. depth = 2k + 1 transformer blocks: k 'in' blocks, a 'mid' block and k 'out' blocks; the
output of in-block j is a long skip that out-block k-1-j merges first (mp_cat with its input, then a linear
layer 2C -> C), so long skip i = 1 joins the first in-block and the last out-block (the outermost). The
extra tokens are dropped, the patch tokens mapped back to pixels, and a 3x3 convolution with a learned gain
(initialised 0, like the U-Net's out_gain) gives F.

Magnitude preservation, so that the EDM2 training recipe (Adam at lr ~1e-2, forced weight normalization,
no biases, no loss scaling) applies unchanged: every weight is an MPConv; a transformer block pre-normalises
each token to unit RMS (in place of LayerNorm), uses cosine attention, and adds its attention and MLP
branches with mp_sum. Positions: a fixed 2D sine-cosine embedding (unit RMS) mixed into the patch tokens with
mp_sum; a learned one would be a weight outside forced weight normalization.
"""

from __future__ import annotations

import math

import torch

from .mp import CosineAttention, Dropout, MPConv, MPFourier, mp_cat, mp_silu, mp_sum, normalize
from .skip_scaling import SkipScaling, SkipScalingSettings

POS_BALANCE = 0.5  # mp_sum weight of the position embedding against the patch content


def sincos_position_embedding(grid: int, channels: int) -> torch.Tensor:
    """[grid * grid, channels] fixed 2D sine-cosine embedding (half the channels for rows, half for columns),
    scaled to unit RMS per token."""
    if channels % 4 != 0:
        raise ValueError(f"UViT: model_channels must be divisible by 4 for the 2D position embedding, got {channels}")
    quarter = channels // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")
    parts = []
    for coord in (rows.flatten(), cols.flatten()):
        angle = coord[:, None] * omega[None, :]
        parts += [angle.sin(), angle.cos()]
    return (torch.cat(parts, dim=1) * math.sqrt(2)).to(torch.float32)  # sin/cos have RMS 1/sqrt(2)


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, (H/p)(W/p), C p p], tokens in row-major order."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // patch) * (w // patch), c * patch * patch)


def unpatchify(tokens: torch.Tensor, patch: int, channels: int, resolution: int) -> torch.Tensor:
    """The inverse of patchify: [N, L, C p p] -> [N, C, H, W]."""
    n, grid = tokens.shape[0], resolution // patch
    x = tokens.reshape(n, grid, grid, channels, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, channels, resolution, resolution)


class UViTBlock(torch.nn.Module):
    """Transformer block on [N, L, C] tokens; out-blocks first merge their long skip (concat + linear)."""

    def __init__(
        self,
        channels: int,  # token width C
        num_heads: int,  # attention heads
        mlp_ratio: int = 4,  # MLP hidden width / C
        merge_skip: bool = False,  # an out-block: mp_cat(x, skip) then linear 2C -> C
        concat_balance: float = 0.5,  # mp_cat weight of the skip against the main path
        dropout: float = 0,  # dropout probability in the MLP branch
        res_balance: float = 0.3,  # mp_sum weight of the MLP branch
        attn_balance: float = 0.3,  # mp_sum weight of the attention branch
        clip_act: float | None = 256,  # clip activations to [-clip_act, clip_act]; None: no clipping
    ):
        super().__init__()
        self.num_heads = num_heads
        self.concat_balance = concat_balance
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.skip_linear = MPConv(2 * channels, channels, kernel=[]) if merge_skip else None
        self.attn_qkv = MPConv(channels, 3 * channels, kernel=[])
        self.attn_proj = MPConv(channels, channels, kernel=[])
        self.mlp0 = MPConv(channels, channels * mlp_ratio, kernel=[])
        self.mlp1 = MPConv(channels * mlp_ratio, channels, kernel=[])
        # Parameterless, so no state-dict keys: the speed layer (accel/) may swap them for faster equivalents.
        self.attn = CosineAttention(num_heads)
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """x: tokens [N, L, C]; skip: the long skip an out-block merges."""
        if self.skip_linear is not None:
            x = self.skip_linear(mp_cat(x, skip, dim=2, t=self.concat_balance))

        # The attention takes the U-Net's [N, 3C, H, W] layout: tokens become a column of pixels.
        qkv = self.attn_qkv(normalize(x, dim=2)).transpose(1, 2).unsqueeze(3)
        y = self.attn(qkv).squeeze(3).transpose(1, 2)
        x = mp_sum(x, self.attn_proj(y), t=self.attn_balance)

        y = self.drop(mp_silu(self.mlp0(normalize(x, dim=2))))
        x = mp_sum(x, self.mlp1(y), t=self.res_balance)

        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x


class UViT(torch.nn.Module):
    """U-ViT F(x; c_noise, y) with the call signature of the EDM2 UNet, so Precond can wrap either."""

    def __init__(
        self,
        img_resolution: int,  # input/output resolution (square)
        img_channels: int,  # input/output channels
        label_dim: int,  # class-label width; 0 = unconditional (no class token)
        model_channels: int = 128,  # token width C
        depth: int = 7,  # transformer blocks, odd: (depth - 1) / 2 in, 1 mid, (depth - 1) / 2 out
        patch_size: int = 2,  # patch side p
        mlp_ratio: int = 4,  # MLP hidden width / C
        channels_per_head: int = 32,  # attention head width
        concat_balance: float = 0.5,  # mp_cat weight of the long skips
        dropout: float = 0,  # dropout probability in the MLPs
        res_balance: float = 0.3,  # mp_sum weight of MLP branches
        attn_balance: float = 0.3,  # mp_sum weight of attention branches
        clip_act: float | None = 256,  # activation clipping in every block
        long_skips: bool = True,  # False: a plain ViT (no skips; then skip_scaling must be 'none')
        skip_scaling: SkipScalingSettings | str = "none",  # ScaleLong settings, or a mode (networks/skip_scaling.py)
    ):
        super().__init__()
        for name, value in dict(
            depth=depth, patch_size=patch_size, mlp_ratio=mlp_ratio, model_channels=model_channels
        ).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"UViT: {name} must be a positive integer, got {value!r}")
        if depth % 2 != 1:
            raise ValueError(f"UViT: depth must be odd (in-blocks, one mid-block, as many out-blocks), got {depth}")
        if img_resolution % patch_size != 0:
            raise ValueError(f"UViT: img_resolution {img_resolution} must be divisible by patch_size {patch_size}")
        if model_channels % channels_per_head != 0:
            raise ValueError(
                f"UViT: model_channels {model_channels} must be divisible by channels_per_head {channels_per_head}"
            )
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.patch_size = patch_size
        grid = img_resolution // patch_size
        half = depth // 2
        block = dict(
            channels=model_channels,
            num_heads=model_channels // channels_per_head,
            mlp_ratio=mlp_ratio,
            concat_balance=concat_balance,
            dropout=dropout,
            res_balance=res_balance,
            attn_balance=attn_balance,
            clip_act=clip_act,
        )

        self.out_gain = torch.nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(model_channels)
        self.emb_noise = MPConv(model_channels, model_channels, kernel=[])  # -> the time token
        self.emb_label = MPConv(label_dim, model_channels, kernel=[]) if label_dim else None  # -> the class token
        self.patch_embed = MPConv((img_channels + 1) * patch_size**2, model_channels, kernel=[])
        self.register_buffer(
            "pos_embed", sincos_position_embedding(grid, model_channels)
        )  # in files: meta-device loading
        self.in_blocks = torch.nn.ModuleList(UViTBlock(**block) for _ in range(half))
        self.mid_block = UViTBlock(**block)
        self.out_blocks = torch.nn.ModuleList(UViTBlock(merge_skip=long_skips, **block) for _ in range(half))
        self.patch_out = MPConv(model_channels, img_channels * patch_size**2, kernel=[])
        self.out_conv = MPConv(img_channels, img_channels, kernel=[3, 3])
        self.long_skips = long_skips
        skip_channels = [model_channels] * half if long_skips else []
        # Every skip holds all tokens: the time token, the class token (conditional networks) and the patches.
        skip_positions = [1 + (label_dim > 0) + grid * grid] * len(skip_channels)
        skip = SkipScalingSettings.of(skip_scaling)
        self.skip_scale = SkipScaling(
            skip.mode, skip_channels, kappa=skip.kappa, ls_reduction=skip.ls_reduction, channel_dim=2,
            skip_positions=skip_positions,
        )

    def stage_modules(self) -> dict[str, torch.nn.Module]:
        """The blocks in order, named for the instruments: in0 .. mid .. out{k-1}."""
        stages = {f"in{j}": b for j, b in enumerate(self.in_blocks)}
        stages["mid"] = self.mid_block
        stages.update({f"out{j}": b for j, b in enumerate(self.out_blocks)})
        return stages

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        dtype = x.dtype
        extra = [self.emb_noise(self.emb_fourier(noise_labels))]
        if self.emb_label is not None:
            extra.append(self.emb_label(class_labels * math.sqrt(class_labels.shape[1])))
        extra = torch.stack(extra, dim=1).to(dtype)  # [N, 1 or 2, C]

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        tokens = mp_sum(self.patch_embed(patchify(x, self.patch_size)), self.pos_embed.to(dtype), t=POS_BALANCE)
        x = torch.cat([extra, tokens], dim=1)

        skips = []
        for block in self.in_blocks:
            x = block(x)
            skips.append(x)
        x = self.mid_block(x)
        for block in self.out_blocks:
            if self.long_skips:
                skip = skips.pop()
                x = block(x, self.skip_scale(skip, len(skips) + 1))
            else:
                x = block(x)

        x = self.patch_out(normalize(x[:, extra.shape[1] :], dim=2))
        x = unpatchify(x, self.patch_size, self.img_channels, self.img_resolution)
        return self.out_conv(x, gain=self.out_gain)
