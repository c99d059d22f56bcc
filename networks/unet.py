"""The EDM2 U-Net, configuration G of the paper (docs/design.md §4, Fig. 21).

Module and parameter names follow the reference implementation (`enc.16x16_block0.conv_res0.weight`,
...), so that official checkpoints load without a rename table.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .mp import CosineAttention, Dropout, MPConv, MPFourier, mp_cat, mp_silu, mp_sum, normalize, resample
from .skip_scaling import SkipScaling, SkipScalingSettings


class Block(torch.nn.Module):
    """Encoder or decoder block: resample, residual branch modulated by the embedding, optional attention."""

    def __init__(
        self,
        in_channels: int,  # input channels
        out_channels: int,  # output channels
        emb_channels: int,  # width of the conditioning embedding
        flavor: str = "enc",  # 'enc': skip conv + pixel norm before the residual; 'dec': skip conv after it
        resample_mode: str = "keep",  # 'keep', 'up' or 'down', applied first
        attention: bool = False,  # cosine self-attention after the residual branch
        channels_per_head: int = 64,  # attention head width
        dropout: float = 0,  # dropout probability inside the residual branch
        res_balance: float = 0.3,  # mp_sum weight of the residual branch
        attn_balance: float = 0.3,  # mp_sum weight of the attention branch
        clip_act: float | None = 256,  # clip activations to [-clip_act, clip_act]; None: no clipping
    ):
        super().__init__()
        if flavor not in ("enc", "dec"):
            raise ValueError(f"Block: flavor must be 'enc' or 'dec', got {flavor!r}")
        if resample_mode not in ("keep", "up", "down"):
            raise ValueError(f"Block: resample_mode must be 'keep', 'up' or 'down', got {resample_mode!r}")
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_mode = resample_mode
        self.num_heads = attention_heads(out_channels, channels_per_head) if attention else 0
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None
        # Parameterless, so no state-dict keys: the speed layer (accel/) may swap them for faster equivalents.
        self.drop = Dropout(dropout)
        self.attn = CosineAttention(self.num_heads) if self.num_heads else None
        self.gain_dtype = torch.float32  # see UNet.gain_dtype

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x: [N, C, H, W]; emb: the conditioning embedding [N, emb_channels]."""
        x = resample(x, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm keeps the encoder's main path at unit magnitude

        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=_gain(self.emb_gain, self.gain_dtype)) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        y = self.conv_res1(self.drop(y))

        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        if self.num_heads:
            x = mp_sum(x, self.attn_proj(self.attn(self.attn_qkv(x))), t=self.attn_balance)

        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x


def _gain(gain: torch.nn.Parameter, dtype: torch.dtype) -> torch.Tensor:
    """The gain in the dtype in which Eq. 47's gain / sqrt(fan_in) is formed (the parameter itself if it is already
    in that dtype, which lets MPConv keep the effective weight between sampling calls)."""
    return gain if gain.dtype == dtype else gain.to(dtype)


def attention_heads(channels: int, channels_per_head: int) -> int:
    """Heads of the attention over `channels`; heads that do not tile the channels are a ValueError (no head at
    all, channels below channels_per_head, means no attention, as in the paper's code)."""
    heads = channels // channels_per_head
    if heads > 0 and channels % channels_per_head != 0:
        raise ValueError(f"Block: attention over {channels} channels needs channels_per_head to divide them, got "
                         f"channels_per_head {channels_per_head}")
    return heads


def level_widths(
    who: str,
    img_resolution: int,
    model_channels: int,
    channel_mult: Sequence[int],
    channel_mult_noise: int | None,
    channel_mult_emb: int | None,
) -> tuple[list[int], int, int]:
    """(width per resolution level, noise-embedding width, embedding width) of a U-Net (Fig. 21), with the check
    that every level's resolution is whole; `who` names the network in the error."""
    cblock = [model_channels * m for m in channel_mult]
    cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
    cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
    if img_resolution % (1 << (len(cblock) - 1)) != 0:
        raise ValueError(
            f"{who}: img_resolution {img_resolution} must be divisible by 2^(levels-1) = {1 << (len(cblock) - 1)}"
        )
    return cblock, cnoise, cemb


class UNet(torch.nn.Module):
    """The magnitude-preserving U-Net F(x; c_noise, y) that the preconditioner wraps."""

    def __init__(
        self,
        img_resolution: int,  # input/output resolution (square)
        img_channels: int,  # input/output channels
        label_dim: int,  # class-label width; 0 = unconditional
        model_channels: int = 192,  # base width: the 'channels' of a preset
        channel_mult: Sequence[int] = (1, 2, 3, 4),  # width multiplier per resolution level
        channel_mult_noise: int | None = None,  # noise-embedding width multiplier; None = channel_mult[0]
        channel_mult_emb: int | None = None,  # embedding width multiplier; None = max(channel_mult)
        num_blocks: int = 3,  # blocks per level (the decoder gets one more)
        attn_resolutions: Sequence[int] = (16, 8),  # resolutions with self-attention
        label_balance: float = 0.5,  # mp_sum weight of the label embedding against the noise embedding
        concat_balance: float = 0.5,  # mp_cat weight of the skip against the decoder path
        channels_per_head: int = 64,  # attention head width
        dropout: float = 0,  # dropout probability in the residual branches
        res_balance: float = 0.3,  # mp_sum weight of residual branches
        attn_balance: float = 0.3,  # mp_sum weight of attention branches
        clip_act: float | None = 256,  # activation clipping in every block
        skip_scaling: SkipScalingSettings | str = "none",  # ScaleLong settings, or a mode (networks/skip_scaling.py)
    ):
        super().__init__()
        cblock, cnoise, cemb = level_widths(
            "UNet", img_resolution, model_channels, channel_mult, channel_mult_noise, channel_mult_emb
        )
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        block = dict(
            emb_channels=cemb,
            channels_per_head=channels_per_head,
            dropout=dropout,
            res_balance=res_balance,
            attn_balance=attn_balance,
            clip_act=clip_act,
        )

        self.out_gain = torch.nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        self.emb_label = MPConv(label_dim, cemb, kernel=[]) if label_dim else None

        self.enc = torch.nn.ModuleDict()
        cout = img_channels + 1  # the input gets a constant channel of ones: an implicit bias
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, kernel=[3, 3])
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, flavor="enc", resample_mode="down", **block)
            for idx in range(num_blocks):
                cin, cout = cout, channels
                attn = res in attn_resolutions
                self.enc[f"{res}x{res}_block{idx}"] = Block(cin, cout, flavor="enc", attention=attn, **block)

        self.dec = torch.nn.ModuleDict()
        skips = [getattr(b, "out_channels") for b in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, flavor="dec", attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, flavor="dec", **block)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, flavor="dec", resample_mode="up", **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                attn = res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = Block(cin, cout, flavor="dec", attention=attn, **block)
        self.out_conv = MPConv(cout, img_channels, kernel=[3, 3])
        # Every encoder output is a long skip; the first one (i = 1) meets the last decoder block.
        skip_channels = [b.out_channels for b in self.enc.values()]
        skip_positions = [int(name.split("x")[0]) ** 2 for name in self.enc]  # H * W from the names "{H}x{W}_..."
        skip = SkipScalingSettings.of(skip_scaling)
        self.skip_scale = SkipScaling(
            skip.mode, skip_channels, kappa=skip.kappa, ls_reduction=skip.ls_reduction, skip_positions=skip_positions
        )
        self._gain_dtype = torch.float32

    @property
    def gain_dtype(self) -> torch.dtype:
        """The dtype in which the gains enter Eq. 47's gain / sqrt(fan_in) (out_gain and every block's emb_gain).
        The official code forms that factor in its stored gain's dtype, float16 in official snapshots; with float32
        the factor of an official file would differ by up to 2^-11 relative (docs/design.md). Set by the loaders of
        official files (edm2/official_import.py, edm2/model_files.py); float32 otherwise."""
        return self._gain_dtype

    @gain_dtype.setter
    def gain_dtype(self, dtype: torch.dtype) -> None:
        self._gain_dtype = dtype
        for block in self.blocks():
            if isinstance(block, Block):
                block.gain_dtype = dtype

    def blocks(self) -> list[torch.nn.Module]:
        """The encoder and decoder modules in the order forward runs them."""
        return list(self.enc.values()) + list(self.dec.values())

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            labels = class_labels * math.sqrt(class_labels.shape[1])
            emb = mp_sum(emb, self.emb_label(labels), t=self.label_balance)
        emb = mp_silu(emb)  # stays float32: each block casts its modulation

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)  # the constant channel: an implicit bias
        skips = []
        for block in self.enc.values():
            x = block(x) if isinstance(block, MPConv) else block(x, emb)
            skips.append(x)  # every encoder output is a long skip
        for name, block in self.dec.items():
            if "block" in name:  # skip i = len(skips) + 1 after the pop (1 = the outermost, popped last)
                skip = skips.pop()
                x = mp_cat(x, self.skip_scale(skip, len(skips) + 1), t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=_gain(self.out_gain, self.gain_dtype))
