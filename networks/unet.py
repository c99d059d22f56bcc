"""The EDM2 U-Net, configuration G of the paper (docs/design.md §4, Fig. 21).

Module and parameter names follow the reference implementation (`enc.16x16_block0.conv_res0.weight`,
...), so that official checkpoints load without a rename table.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .batched_weights import effective_weights
from .dropout import dropout
from .mp import MPConv, MPFourier, cosine_attention, mp_cat, mp_silu, mp_sum, normalize, resample
from .skip_scaling import SkipScaling


class Block(torch.nn.Module):
    """Encoder or decoder block: resample, residual branch modulated by the embedding, optional attention."""

    CONVS = ("conv_res0", "conv_res1", "conv_skip", "attn_qkv", "attn_proj")  # layers on the activations, in order

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
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
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

    def convs(self) -> list[MPConv]:
        """The layers applied to the activations, in a fixed order (the order of `forward`'s `weights`)."""
        return [getattr(self, n) for n in self.CONVS if getattr(self, n) is not None]

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor | None = None,
        c: torch.Tensor | None = None,
        weights: Sequence[torch.Tensor] | None = None,
        fast_dropout: bool = False,
        reference_attention: bool = False,
    ) -> torch.Tensor:
        """x: [N, C, H, W]; emb: the conditioning embedding [N, emb_channels], or c: this block's modulation
        emb_linear(emb) + 1 [N, out_channels] already computed (UNet computes all blocks' in one product);
        weights: the effective weights of `convs()` in x's dtype, already computed (UNet does all layers' at once),
        or None; fast_dropout: the keep-mask from networks/dropout.py's kernel where it runs (CUDA);
        reference_attention: attention in the reference's order of operations (`cosine_attention`)."""
        w = {} if weights is None else dict(zip([n for n in self.CONVS if getattr(self, n) is not None], weights))
        x = resample(x, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x, weight=w.get("conv_skip"))
            x = normalize(x, dim=1)  # pixel norm keeps the encoder's main path at unit magnitude

        y = self.conv_res0(mp_silu(x), weight=w.get("conv_res0"))
        if c is None:
            c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout != 0:
            y = dropout(y, self.dropout, fast=fast_dropout)
        y = self.conv_res1(y, weight=w.get("conv_res1"))

        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x, weight=w.get("conv_skip"))
        x = mp_sum(x, y, t=self.res_balance)

        if self.num_heads:
            y = cosine_attention(self.attn_qkv(x, weight=w.get("attn_qkv")), self.num_heads, reference_attention)
            x = mp_sum(x, self.attn_proj(y, weight=w.get("attn_proj")), t=self.attn_balance)

        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x


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
        skip_scaling: str = "none",  # ScaleLong mode of the long skips (networks/skip_scaling.py)
        kappa: float = 0.7,  # CS base: skip i (1 = outermost) is multiplied by kappa^(i-1)
        ls_reduction: int = 16,  # reduction r of the LS gates (networks/skip_scaling.py)
    ):
        super().__init__()
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        if img_resolution % (1 << (len(cblock) - 1)) != 0:
            raise ValueError(
                f"UNet: img_resolution {img_resolution} must be divisible by 2^(levels-1) = {1 << (len(cblock) - 1)}"
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
        self.skip_scale = SkipScaling(
            skip_scaling, skip_channels, kappa=kappa, ls_reduction=ls_reduction, skip_positions=skip_positions
        )
        self._modulation_cache: tuple[tuple, torch.Tensor] | None = None
        # Runtime speed switch (training on CUDA), not part of the model: with gradients, every layer's effective
        # weight is computed up front in one batched operation (networks/batched_weights.py) instead of per layer.
        self.batched_weights = False
        # Runtime speed switch: dropout masks from one Philox call per four elements (networks/dropout.py) on CUDA.
        self.fast_dropout = False
        # Runtime switch, set by the loader: the dtype in which the gains enter Eq. 47's gain / sqrt(fan_in). The
        # official code forms that factor in its stored gain's dtype, float16 in official snapshots; with float32 here
        # the factor of an official file would differ by up to 2^-11 relative (docs/design.md).
        self.gain_dtype = torch.float32
        # Runtime switch: the reference's order of operations (True: attention with explicit scores, one modulation
        # product per block), or the fast one (False: fused SDPA, all blocks' modulations in one product); None: the
        # reference's on the CPU (the official values to the last bit), the fast one on other devices.
        self.reference_order: bool | None = None
        # Runtime switch (compiled multi-GPU training, --grad-sync overlap): qualified block names where a new
        # compiled piece starts (overlap_breaks()), so that backward hands over each piece's gradients as it ends.
        self.graph_breaks: tuple[str, ...] = ()
        self._block_index = {n: i for i, n in enumerate(n for n in self.block_names() if not n.endswith("_conv"))}

    def modulation_weight(self, normalized: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """The emb_linear weights of all blocks, each times its emb_gain / sqrt(fan_in), stacked in block order
        [sum of out_channels, emb_channels] (float32). One [N, emb] x [emb, sum] product then modulates every
        block: the per-block products are too small to fill the GPU (dozens of launches of a few tiles each).
        Kept between calls at inference until a weight or gain changes. `normalized`: the blocks' emb_linear weights
        already through normalize(w) / sqrt(fan_in) (float32), as the batched path computes them."""
        blocks = [b for b in self.blocks() if isinstance(b, Block)]
        if normalized is not None:
            return torch.cat([w * b.emb_gain for w, b in zip(normalized, blocks)])
        cacheable = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        if cacheable:
            key = tuple((t.data_ptr(), t._version) for b in blocks for t in (b.emb_linear.weight, b.emb_gain))
            key += (self.gain_dtype,)
            if self._modulation_cache is not None and self._modulation_cache[0] == key:
                return self._modulation_cache[1]
        w = torch.cat([b.emb_linear.effective_weight(b.emb_gain.to(self.gain_dtype)) for b in blocks])
        if cacheable:
            self._modulation_cache = (key, w)
        return w

    def blocks(self) -> list[torch.nn.Module]:
        """The encoder and decoder modules in the order forward runs them."""
        return list(self.enc.values()) + list(self.dec.values())

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_modulation_cache": None}

    def block_names(self) -> list[str]:
        """Qualified names ('enc.64x64_conv', 'enc.64x64_block0', ..., 'dec.64x64_block3') in forward order."""
        return [f"enc.{n}" for n in self.enc] + [f"dec.{n}" for n in self.dec]

    def parts(self) -> list[list[str]]:
        """The blocks of each piece the network is compiled in: split before every name in `graph_breaks`."""
        parts: list[list[str]] = [[]]
        for name in self.block_names():
            if name in self.graph_breaks and parts[-1]:
                parts.append([])
            parts[-1].append(name)
        return parts

    def overlap_breaks(self) -> tuple[str, ...]:
        """Where to cut for overlapping gradient all-reduces with backward (--grad-sync overlap): three pieces, the
        encoder's upper half, the lower half of both sides, the decoder's upper half. Backward finishes them last
        to first; the middle piece holds most of the weights, and the first piece's backward (high resolution,
        much arithmetic, few weights) has time to hide their all-reduce."""
        levels = len([n for n in self.enc if n.endswith("_down")]) + 1
        half = levels // 2
        lo, hi = self.img_resolution >> half, self.img_resolution >> (half - 1)
        return (f"enc.{lo}x{lo}_down", f"dec.{hi}x{hi}_up") if half >= 1 else ()

    def part_parameters(self) -> list[list[torch.nn.Parameter]]:
        """The parameters of each piece (`parts()`), in the order backward completes them (last piece first). The
        embedding and all modulation weights belong to the first piece, where they are used; so do the ScaleLong
        gates, which may be shared between pieces (autograd hands a shared parameter's gradient over once, after
        its last use in backward, the first piece's)."""
        parts = self.parts()
        groups: list[list[torch.nn.Parameter]] = []
        for k, names in enumerate(parts):
            group = []
            for name in names:
                side, key = name.split(".", 1)
                module = (self.enc if side == "enc" else self.dec)[key]
                group += [p for n, p in module.named_parameters() if not n.startswith(("emb_linear.", "emb_gain"))]
            if k == 0:
                group += [
                    p for m in (self.emb_noise, self.emb_label, self.skip_scale) if m is not None
                    for p in m.parameters()
                ]
                group += [p for b in self.blocks() if isinstance(b, Block) for p in (b.emb_linear.weight, b.emb_gain)]
            if k == len(parts) - 1:
                group += [self.out_conv.weight, self.out_gain]
            groups.append(group)
        return groups[::-1]

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        blocks = [b for b in self.blocks() if isinstance(b, Block)]
        batched = self.batched_weights and torch.is_grad_enabled()
        embs = [self.emb_noise] + ([self.emb_label] if self.emb_label is not None else [])
        emb_w = mod_w = None
        if batched:  # normalize(w) / sqrt(fan_in) of the embedding layers in one operation (Eq. 47)
            linears = effective_weights([m.weight for m in embs] + [b.emb_linear.weight for b in blocks], torch.float32)
            emb_w, mod_w = iter(linears[: len(embs)]), linears[len(embs) :]
        emb = self.emb_noise(self.emb_fourier(noise_labels), weight=next(emb_w) if batched else None)
        if self.emb_label is not None:
            labels = class_labels * math.sqrt(class_labels.shape[1])
            emb = mp_sum(emb, self.emb_label(labels, weight=next(emb_w) if batched else None), t=self.label_balance)
        emb = mp_silu(emb)  # stays float32: the modulation is cast per block
        reference = self.reference_order if self.reference_order is not None else x.device.type == "cpu"
        if reference and not batched:  # each block's own product, as the reference (cuBLAS may round a wider one apart)
            mods = [b.emb_linear(emb, gain=b.emb_gain.to(self.gain_dtype)) + 1 for b in blocks]
        else:
            sizes = [b.out_channels for b in blocks]
            mods = (emb @ self.modulation_weight(mod_w).t() + 1).split(sizes, dim=1)  # Eq. 47 per block, in one product

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips: list[torch.Tensor] = []
        parts = self.parts()
        if len(parts) > 3:
            raise ValueError(
                f"UNet: graph_breaks {list(self.graph_breaks)} make {len(parts)} pieces; at most 3 are supported"
            )
        x = self._run_part(parts[0], x, skips, mods, batched, reference)
        # Straight-line code: torch.compile resumes after a graph break here, not inside a loop.
        if len(parts) > 1:
            torch._dynamo.graph_break()  # a new compiled piece: backward hands over the later pieces' gradients first
            x = self._run_part(parts[1], x, skips, mods, batched, reference)
        if len(parts) > 2:
            torch._dynamo.graph_break()
            x = self._run_part(parts[2], x, skips, mods, batched, reference)
        return self.out_conv(x, gain=self.out_gain.to(self.gain_dtype))

    def _run_part(self, names: list[str], x: torch.Tensor, skips: list[torch.Tensor], mods: Sequence[torch.Tensor],
                  batched: bool, reference: bool = False) -> torch.Tensor:
        """Run the named blocks; encoder outputs are pushed onto `skips`, decoder blocks pop theirs. With `batched`,
        the effective weights of all the part's layers come from one operation; `reference`: attention in the
        reference's order of operations."""
        modules = [(name, (self.enc if name.startswith("enc.") else self.dec)[name.split(".", 1)[1]]) for name in names]
        if batched:
            layers = [[m] if isinstance(m, MPConv) else m.convs() for _, m in modules]
            weights = iter(effective_weights([c.weight for group in layers for c in group], x.dtype))
        for name, block in modules:
            if isinstance(block, MPConv):  # the input convolution
                x = block(x, weight=next(weights) if batched else None)
            else:
                if name.startswith("dec.") and "block" in name:
                    skip = skips.pop()
                    x = mp_cat(x, self.skip_scale(skip, len(skips) + 1), t=self.concat_balance)
                ws = [next(weights) for _ in block.convs()] if batched else None
                x = block(x, c=mods[self._block_index[name]], weights=ws, fast_dropout=self.fast_dropout,
                          reference_attention=reference)
            if name.startswith("enc."):
                skips.append(x)
        return x
