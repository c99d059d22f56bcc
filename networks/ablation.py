"""Configurations A-F of the EDM2 paper's ablation ladder (Table 1; docs/design.md "Ablation ladder").

Configuration G, the end of the ladder, is the reference network (networks/unet.py, arch 'edm2-unet'); this module
holds the steps before it, so that the reference stays free of switches. All six share G's topology (the same
encoder / decoder block layout and names) and differ in the layers inside it:

    A, B  ADM-style: convolutions with biases, group normalization, separate noise and label embedding paths that
          modulate by scale and shift, positional noise embedding, dot-product attention (B differs from A only in
          training: hyperparameters and the learned loss weighting, edm2/presets.py)
    C     streamlined: no biases, one embedding that modulates by scale only, Fourier noise features, cosine
          attention, a constant input channel of ones (an implicit bias)
    D     magnitude-preserving learned layers: MPConv (weight normalization in forward, Eq. 47), learned output and
          embedding gains
    E     as D; forced weight normalization and the learning-rate decay are training settings (TrainingConfig)
    F     as E without group normalization: pixel norm on the encoder's main path, as in G
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .mp import CosineAttention, Dropout, MPConv, MPFourier, pixel_norm, resample
from .unet import attention_heads, level_widths

CONFIGS = ("a", "b", "c", "d", "e", "f")  # 'g' is the reference network, arch 'edm2-unet'
GROUPS = 32  # group normalization: at most this many groups, as in ADM


def _flags(config: str) -> dict[str, bool]:
    if config not in CONFIGS:
        raise ValueError(
            f"AblationUNet: config must be one of {list(CONFIGS)} ('g' is arch 'edm2-unet'), got {config!r}"
        )
    rank = CONFIGS.index(config)
    return dict(
        adm=rank <= 1,  # biases, scale-shift modulation, two embedding paths, positional embedding, plain attention
        mp_layers=rank >= 3,  # MPConv learned layers with gains (D)
        group_norm=rank <= 4,  # F removes group normalization
    )


class Conv(torch.nn.Module):
    """A convolution (kernel [kh, kw]) or linear layer (kernel []) with optional bias and no weight normalization:
    the learned layers of configurations A-C. Same call signature as MPConv (a gain multiplies the output)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int], bias: bool, init_scale: float = 1):
        super().__init__()
        fan_in = in_channels * math.prod(kernel)
        # Unit-variance output for unit-variance input (He-style without the ReLU factor), optionally scaled down;
        # init_scale 0 zero-initializes, as ADM does with the last layer of each residual branch.
        init = torch.randn(out_channels, in_channels, *kernel) * (init_scale / math.sqrt(fan_in))
        self.weight = torch.nn.Parameter(init)
        self.bias = torch.nn.Parameter(torch.zeros(out_channels)) if bias else None

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1) -> torch.Tensor:
        w = self.weight.to(x.dtype)
        if w.ndim == 2:
            y = F.linear(x, w, self.bias.to(x.dtype) if self.bias is not None else None)
        else:
            y = F.conv2d(x, w, self.bias.to(x.dtype) if self.bias is not None else None, padding=w.shape[-1] // 2)
        return y * gain if not (isinstance(gain, (int, float)) and gain == 1) else y


class GroupNorm(torch.nn.Module):
    """Group normalization in float32; with learned affine parameters only where the layers have biases (A, B)."""

    def __init__(self, channels: int, affine: bool):
        super().__init__()
        self.groups = min(GROUPS, channels)
        while channels % self.groups:
            self.groups -= 1
        self.norm = torch.nn.GroupNorm(self.groups, channels, eps=1e-5, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.to(torch.float32)).to(x.dtype)


def _layer(flags: dict[str, bool], cin: int, cout: int, kernel: Sequence[int], zero: bool = False) -> torch.nn.Module:
    if flags["mp_layers"]:
        return MPConv(cin, cout, kernel=kernel)
    return Conv(cin, cout, kernel, bias=flags["adm"], init_scale=0 if zero else 1)


def _norm(flags: dict[str, bool], channels: int) -> torch.nn.Module:
    return GroupNorm(channels, affine=flags["adm"]) if flags["group_norm"] else torch.nn.Identity()


class AblationBlock(torch.nn.Module):
    """G's block (networks/unet.py) with the layers of configuration A-F; the residual and attention branches are
    added with plain sums (G's magnitude-preserving sums are its own step)."""

    def __init__(
        self,
        flags: dict[str, bool],
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        flavor: str = "enc",
        resample_mode: str = "keep",
        attention: bool = False,
        channels_per_head: int = 64,
        dropout: float = 0,
    ):
        super().__init__()
        self.flags = flags
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_mode = resample_mode
        self.num_heads = attention_heads(out_channels, channels_per_head) if attention else 0
        cres0 = out_channels if flavor == "enc" else in_channels
        self.norm0 = _norm(flags, cres0)
        self.conv_res0 = _layer(flags, cres0, out_channels, [3, 3])
        # A, B: scale and shift from their own embedding projection; C onwards: a scale only.
        self.emb_linear = _layer(flags, emb_channels, out_channels * (2 if flags["adm"] else 1), [])
        self.emb_gain = torch.nn.Parameter(torch.zeros([])) if flags["mp_layers"] else None
        self.norm1 = _norm(flags, out_channels)
        self.conv_res1 = _layer(flags, out_channels, out_channels, [3, 3], zero=True)
        self.conv_skip = _layer(flags, in_channels, out_channels, [1, 1]) if in_channels != out_channels else None
        if self.num_heads:
            self.attn_norm = _norm(flags, out_channels)
            self.attn_qkv = _layer(flags, out_channels, out_channels * 3, [1, 1])
            self.attn_proj = _layer(flags, out_channels, out_channels, [1, 1], zero=True)
        self.drop = Dropout(dropout)
        # C onwards: the reference's cosine attention (pixel-normalized queries, keys and values).
        self.attn = CosineAttention(self.num_heads) if self.num_heads and not flags["adm"] else None

    def _attention(self, qkv: torch.Tensor) -> torch.Tensor:
        if self.attn is not None:
            return self.attn(qkv)
        n, c3, h, w = qkv.shape
        q, k, v = qkv.reshape(n, self.num_heads, c3 // (3 * self.num_heads), 3, h * w).unbind(3)
        scores = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2]))
        return torch.einsum("nhqk,nhck->nhcq", scores.softmax(dim=3), v).reshape(n, c3 // 3, h, w)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = resample(x, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            if not self.flags["group_norm"]:
                x = pixel_norm(x)  # F: the normalization G has on the encoder's main path

        y = self.conv_res0(F.silu(self.norm0(x)))
        if self.flags["adm"]:
            scale, shift = self.emb_linear(emb).to(y.dtype).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
            y = self.norm1(y) * (scale + 1) + shift
        else:
            gain = self.emb_gain if self.emb_gain is not None else 1
            y = self.norm1(y) * (self.emb_linear(emb, gain=gain) + 1)[:, :, None, None].to(y.dtype)
        y = self.conv_res1(self.drop(F.silu(y)))

        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = x + y
        if self.num_heads:
            x = x + self.attn_proj(self._attention(self.attn_qkv(self.attn_norm(x))))
        return x


class AblationUNet(torch.nn.Module):
    """The U-Net F(x; c_noise, y) of configuration A-F; arguments as networks/unet.UNet's (same meaning)."""

    def __init__(
        self,
        config: str,
        img_resolution: int,
        img_channels: int,
        label_dim: int,
        model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        channel_mult_noise: int | None = None,
        channel_mult_emb: int | None = None,
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (16, 8),
        channels_per_head: int = 64,
        dropout: float = 0,
    ):
        super().__init__()
        self.config = config
        self.flags = flags = _flags(config)
        cblock, cnoise, cemb = level_widths(
            "AblationUNet", img_resolution, model_channels, channel_mult, channel_mult_noise, channel_mult_emb
        )
        self.img_resolution = img_resolution
        self.label_dim = label_dim
        self.cnoise = cnoise
        block = dict(emb_channels=cemb, channels_per_head=channels_per_head, dropout=dropout)

        if flags["adm"]:  # positional noise embedding through a two-layer MLP; the label path added after it
            self.emb_fourier = None
            self.emb_noise0 = _layer(flags, cnoise, cemb, [])
            self.emb_noise = _layer(flags, cemb, cemb, [])
        else:
            self.emb_fourier = MPFourier(cnoise)
            self.emb_noise = _layer(flags, cnoise, cemb, [])
        self.emb_label = _layer(flags, label_dim, cemb, []) if label_dim else None
        self.out_gain = torch.nn.Parameter(torch.zeros([])) if flags["mp_layers"] else None

        self.enc = torch.nn.ModuleDict()
        cout = img_channels + (0 if flags["adm"] else 1)  # C onwards: the constant channel of ones
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = _layer(flags, cin, cout, [3, 3])
            else:
                self.enc[f"{res}x{res}_down"] = AblationBlock(flags, cout, cout, flavor="enc", resample_mode="down",
                                                              **block)
            for idx in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_block{idx}"] = AblationBlock(
                    flags, cin, cout, flavor="enc", attention=res in attn_resolutions, **block
                )
        self.dec = torch.nn.ModuleDict()
        skips = [getattr(b, "out_channels", None) or b.weight.shape[0] for b in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = AblationBlock(flags, cout, cout, flavor="dec", attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = AblationBlock(flags, cout, cout, flavor="dec", **block)
            else:
                self.dec[f"{res}x{res}_up"] = AblationBlock(flags, cout, cout, flavor="dec", resample_mode="up",
                                                            **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f"{res}x{res}_block{idx}"] = AblationBlock(
                    flags, cin, cout, flavor="dec", attention=res in attn_resolutions, **block
                )
        self.out_norm = _norm(flags, cout)
        # A-C: zero-initialized last layer (ADM); D onwards: the learned output gain, zero at initialization.
        self.out_conv = _layer(flags, cout, img_channels, [3, 3], zero=True)

    def blocks(self) -> list[torch.nn.Module]:
        return list(self.enc.values()) + list(self.dec.values())

    def _noise_embedding(self, noise_labels: torch.Tensor) -> torch.Tensor:
        if self.emb_fourier is not None:
            return self.emb_noise(self.emb_fourier(noise_labels))
        half = self.cnoise // 2  # ADM's sinusoidal embedding, max period 10000
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=noise_labels.device) / half)
        angles = noise_labels.to(torch.float32).reshape(-1, 1) * freqs
        return self.emb_noise(F.silu(self.emb_noise0(torch.cat([angles.cos(), angles.sin()], dim=1))))

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        emb = self._noise_embedding(noise_labels)
        if self.emb_label is not None:
            labels = class_labels * math.sqrt(class_labels.shape[1])
            emb = emb + self.emb_label(labels)
        emb = F.silu(emb)

        if not self.flags["adm"]:
            x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, AblationBlock) else block(x)
            skips.append(x)
        for name, block in self.dec.items():
            if "block" in name:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        x = F.silu(self.out_norm(x)) if self.flags["group_norm"] else x
        return self.out_conv(x, gain=self.out_gain if self.out_gain is not None else 1)
