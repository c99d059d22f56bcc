"""ScaleLong: scaling of a U-shaped network's long skip connections before they are merged (docs/design.md §9).

Huang et al., "ScaleLong: Towards More Stable Training of Diffusion Model via Scaling Network Long Skip
Connection" (NeurIPS 2023, arXiv 2310.13545). Skip i (i = 1 joins the outermost encoder and decoder ends,
i = n the innermost) is multiplied by a coefficient before the decoder merges it:

| mode           | coefficient of skip i                                                              |
| ---            | ---                                                                                |
| `none`         | 1 (the network is unchanged: no op, no parameter)                                  |
| `inv_sqrt2`    | 1/sqrt(2) for every skip ("1/sqrt(2)-CS")                                          |
| `cs`           | kappa^(i-1), kappa in (0, 1] (the paper recommends [0.5, 0.95])                    |
| `ls`           | a learned per-position gate, one module shared by all skips of the same length    |
| `ls_nonshared` | a learned per-position gate per skip                                               |
| `ls_channel`   | a learned per-channel (SENet) gate, shared by all skips of the same width          |
| `ls_channel_nonshared` | a learned per-channel (SENet) gate per skip                                |

The paper's argument: the oscillation range of hidden features and of gradients grows with the sum of
the squared skip coefficients, so smaller coefficients (decaying towards the inner skips) stabilise
training.

LS gate of the paper (`ls`, `ls_nonshared`; `TokenGate`): the paper's learned scaling for the U-ViT gates
each token. s = the mean over the channels of every token / position (one number per position, L numbers for
a skip of L positions); g = sigmoid(W2 relu(W1 s)) with W1: L -> L/r, W2: L/r -> L, r = 16; the skip is
multiplied by g, one coefficient per position (shape [N, L, 1] for tokens, [N, 1, H, W] for the U-Net's
feature maps, which is the direct analogue there: a position of a feature map plays the part of a token).
`ls` shares one gate by all skips of one length (the U-ViT's skips all have L = extra tokens + patches, so
there it is exactly one gate, as in the paper), `ls_nonshared` has one per skip.

Per-channel gate (`ls_channel`, `ls_channel_nonshared`; `SEGate`, SENet's squeeze-and-excitation): s = the
channel means (average over positions), W1: C -> C/r, W2: C/r -> C, the skip is multiplied by g per
channel. This project's earlier `ls` was this gate; it stays available under its own name for both backbones.

Both gates use magnitude-preserving linear layers (MPConv: no bias, forced weight normalization like every
weight of the network) so that they train with the same optimizer settings as the rest; the hidden width is
at least MIN_GATE_HIDDEN (4) units, which equals L // r or C // r whenever L, C >= 4 r.

Sharing with unequal sizes: the EDM2 U-Net's skips have the widths and resolutions of their levels, so one
gate cannot serve all of them; the shared modes share one gate among the skips of each size.

Interaction with mp_cat (the magnitude-preserving U-Net and U-ViT merge by mp_cat(x, skip, t), Eq. 103):
mp_cat weights its inputs by fixed constants that assume unit-magnitude inputs, and does not look at the
actual magnitudes. So a coefficient c on the skip acts like lowering the skip's balance from t to an
effective t c / ((1 - t) + t c) and shrinks the merged tensor's RMS by sqrt(((1 - t)^2 + t^2 c^2) / ((1 - t)^2
+ t^2)) (c = 1/sqrt(2), t = 0.5: 0.866). We deliberately do not renormalise after the gate: renormalising
would hand the lost magnitude back and cancel the damping that ScaleLong is about. The next block's
weight-normalized layers see a slightly smaller input, which the learned gains absorb.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from .mp import MPConv

SKIP_SCALING_MODES = ("none", "inv_sqrt2", "cs", "ls", "ls_nonshared", "ls_channel", "ls_channel_nonshared")
LEARNED_MODES = ("ls", "ls_nonshared", "ls_channel", "ls_channel_nonshared")
TOKEN_MODES = ("ls", "ls_nonshared")  # the paper's per-position gates
CHANNEL_MODES = ("ls_channel", "ls_channel_nonshared")  # SENet's per-channel gates
# Model files of format version 1 were written when `ls` / `ls_nonshared` meant the per-channel gate.
LEGACY_MODE_NAMES = {"ls": "ls_channel", "ls_nonshared": "ls_channel_nonshared"}
# Narrow skips (C < 4 r) would leave the gate one or two ReLU units, which a bias-free layer easily starts
# with all dead (the gate then stays at sigmoid(0) = 0.5 and never learns); 4 units make that unlikely.
MIN_GATE_HIDDEN = 4


def check_skip_scaling(mode: str, kappa: float, ls_reduction: int, num_skips: int, where: str = "skip_scaling") -> None:
    """Raise a ValueError naming the argument for an unknown mode, kappa outside (0, 1], a bad reduction,
    or a scaling mode on a network without long skips."""
    SkipScalingSettings(mode, kappa, ls_reduction, where=where)
    if mode != "none" and num_skips == 0:
        raise ValueError(f"{where}: skip_scaling={mode!r} needs long skip connections, but this network has none")


@dataclasses.dataclass(frozen=True)
class SkipScalingSettings:
    """The ScaleLong settings of a backbone, checked once here: Precond builds them from its flat keyword arguments
    (the model-file format) and hands them to the U-Net or U-ViT, which build their SkipScaling from them."""

    mode: str = "none"  # one of SKIP_SCALING_MODES
    kappa: float = 0.7  # CS base: skip i (1 = outermost) is multiplied by kappa^(i-1); in (0, 1]
    ls_reduction: int = 16  # reduction r of the LS gates (hidden width L // r or C // r)
    where: dataclasses.InitVar[str] = "skip_scaling"  # the name errors start with

    def __post_init__(self, where: str) -> None:
        if self.mode not in SKIP_SCALING_MODES:
            raise ValueError(f"{where}: skip_scaling must be one of {list(SKIP_SCALING_MODES)}, got {self.mode!r}")
        kappa = self.kappa
        if isinstance(kappa, bool) or not isinstance(kappa, (int, float)) or not (0 < kappa <= 1):
            raise ValueError(f"{where}: kappa must be a number in (0, 1] (the paper uses 0.5 to 0.95), got {kappa!r}")
        r = self.ls_reduction
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"{where}: ls_reduction must be a positive integer (the gates' r, 16), got {r!r}")

    @classmethod
    def of(cls, value: SkipScalingSettings | str) -> SkipScalingSettings:
        """The settings themselves, or a mode name with the default kappa and reduction."""
        return value if isinstance(value, SkipScalingSettings) else cls(value)


def cs_coefficients(num_skips: int, kappa: float) -> list[float]:
    """kappa^(i-1) for skips i = 1 (outermost) .. num_skips (innermost)."""
    return [kappa ** (i - 1) for i in range(1, num_skips + 1)]


class SEGate(torch.nn.Module):
    """Squeeze-and-excitation gate: channel means -> linear C -> C/r -> ReLU -> linear -> sigmoid."""

    def __init__(
        self,
        channels: int,  # width C of the skips it gates
        reduction: int = 16,  # r: the hidden width is max(C // r, MIN_GATE_HIDDEN)
    ):
        super().__init__()
        hidden = max(channels // reduction, MIN_GATE_HIDDEN)
        self.squeeze = MPConv(channels, hidden, kernel=[])
        self.excite = MPConv(hidden, channels, kernel=[])

    def forward(self, skip: torch.Tensor, channel_dim: int) -> torch.Tensor:
        """The gate in (0, 1), shaped to broadcast onto `skip` ([N, C, H, W] with channel_dim 1, or
        [N, L, C] with channel_dim 2)."""
        spatial = [d for d in range(1, skip.ndim) if d != channel_dim]
        s = skip.to(torch.float32).mean(dim=spatial)  # [N, C]
        g = torch.sigmoid(self.excite(torch.relu(self.squeeze(s))))
        shape = [skip.shape[0]] + [1] * (skip.ndim - 1)
        shape[channel_dim] = skip.shape[channel_dim]
        return g.reshape(shape).to(skip.dtype)


class TokenGate(torch.nn.Module):
    """The paper's LS gate: means over the channels -> linear L -> L/r -> ReLU -> linear -> sigmoid, one
    coefficient per token / position."""

    def __init__(
        self,
        positions: int,  # L: tokens of the skips it gates (H * W for feature maps)
        reduction: int = 16,  # r: the hidden width is max(L // r, MIN_GATE_HIDDEN)
    ):
        super().__init__()
        hidden = max(positions // reduction, MIN_GATE_HIDDEN)
        self.positions = positions
        self.squeeze = MPConv(positions, hidden, kernel=[])
        self.excite = MPConv(hidden, positions, kernel=[])

    def forward(self, skip: torch.Tensor, channel_dim: int) -> torch.Tensor:
        """The gate in (0, 1), shaped to broadcast onto `skip`: [N, L, 1] for [N, L, C] tokens (channel_dim 2),
        [N, 1, H, W] for [N, C, H, W] feature maps (channel_dim 1)."""
        s = skip.to(torch.float32).mean(dim=channel_dim, keepdim=True)  # one number per position
        shape = s.shape
        g = torch.sigmoid(self.excite(torch.relu(self.squeeze(s.reshape(skip.shape[0], -1)))))
        return g.reshape(shape).to(skip.dtype)


class SkipScaling(torch.nn.Module):
    """Multiplies long skip i (1 = outermost) by its coefficient; call as `scaler(skip, i)`.

    With mode 'none' it returns the skip itself and holds no parameters, so a network built with it has the
    same state-dict keys and the same numbers as one without. The instruments of training/instruments.py
    hook this module to see every skip.
    """

    def __init__(
        self,
        mode: str,  # one of SKIP_SCALING_MODES
        skip_channels: Sequence[int],  # width of skip i at index i - 1 (outermost first)
        kappa: float = 0.7,  # CS base: skip i gets kappa^(i-1)
        ls_reduction: int = 16,  # reduction r of the LS gates (hidden width L // r or C // r)
        channel_dim: int = 1,  # channel axis of the skips: 1 for [N, C, H, W], 2 for [N, L, C]
        skip_positions: Sequence[int] | None = None,  # positions L (tokens, or H * W) of skip i at index i - 1
    ):
        super().__init__()
        check_skip_scaling(mode, kappa, ls_reduction, len(skip_channels))
        self.mode = mode
        self.kappa = kappa
        self.channel_dim = channel_dim
        self.skip_channels = list(skip_channels)
        if mode in TOKEN_MODES and (skip_positions is None or len(skip_positions) != len(self.skip_channels)):
            raise ValueError(f"SkipScaling: skip_scaling={mode!r} needs skip_positions, one per skip")
        self.skip_positions = list(skip_positions) if skip_positions is not None else None
        self.gates = None
        self.gate_index: list[int] = []  # skip i uses gates[gate_index[i - 1]]
        # The gates draw their initial weights without advancing the global generator, so that every other
        # weight of an LS network is the one the same seed gives without gates: the modes differ only by them.
        with torch.random.fork_rng(devices=[]):
            if mode in LEARNED_MODES:
                sizes, make = (
                    (self.skip_positions, TokenGate) if mode in TOKEN_MODES else (self.skip_channels, SEGate)
                )
                if mode in ("ls", "ls_channel"):  # one gate per distinct size, in increasing size
                    distinct = sorted(set(sizes))
                    self.gates = torch.nn.ModuleList(make(n, ls_reduction) for n in distinct)
                    self.gate_index = [distinct.index(n) for n in sizes]
                else:
                    self.gates = torch.nn.ModuleList(make(n, ls_reduction) for n in sizes)
                    self.gate_index = list(range(len(sizes)))

    @property
    def num_skips(self) -> int:
        return len(self.skip_channels)

    def coefficient(self, index: int) -> float | None:
        """The constant coefficient of skip `index` (1-based from the outermost); None for learned gates."""
        if not 1 <= index <= self.num_skips:
            raise ValueError(f"SkipScaling: skip index must be in 1..{self.num_skips}, got {index}")
        if self.mode == "none":
            return 1.0
        if self.mode == "inv_sqrt2":
            return 1 / math.sqrt(2)
        if self.mode == "cs":
            return self.kappa ** (index - 1)
        return None

    def forward(self, skip: torch.Tensor, index: int) -> torch.Tensor:
        if self.mode == "none":
            return skip
        if self.gates is not None:
            gate = self.gates[self.gate_index[index - 1]]
            return skip * gate(skip, self.channel_dim)
        return skip * self.coefficient(index)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, kappa={self.kappa}, skips={self.num_skips}"
