"""ScaleLong: scaling of a U-shaped network's long skip connections before they are merged (SPEC 9).

Huang et al., "ScaleLong: Towards More Stable Training of Diffusion Model via Scaling Network Long Skip
Connection" (NeurIPS 2023, arXiv 2310.13545). Skip i (i = 1 joins the outermost encoder and decoder ends,
i = n the innermost) is multiplied by a coefficient before the decoder merges it:

| mode           | coefficient of skip i                                                              |
| ---            | ---                                                                                |
| `none`         | 1 (the network is unchanged: no op, no parameter)                                  |
| `inv_sqrt2`    | 1/sqrt(2) for every skip ("1/sqrt(2)-CS")                                          |
| `cs`           | kappa^(i-1), kappa in (0, 1] (the paper recommends [0.5, 0.95])                    |
| `ls`           | a learned SENet gate, one module shared by all skips of the same width            |
| `ls_nonshared` | a learned SENet gate per skip                                                      |

The paper's argument: the oscillation range of hidden features and of gradients grows with the sum of
the squared skip coefficients, so smaller coefficients (decaying towards the inner skips) stabilise
training.

LS gate (SENet shape): s = channel means of the skip (average over pixels / tokens); g = sigmoid(W2
relu(W1 s)) with W1: C -> C/r, W2: C/r -> C, r = 16 (at least 4 hidden units for narrow skips); the skip is multiplied by g per channel. W1 and W2 are
magnitude-preserving linear layers (MPConv, no bias, forced weight normalization like every weight of the
network), so the gate trains with the same optimizer settings as the rest.

Sharing with unequal widths: the EDM2 U-Net's skips have the widths of their levels (e.g. 32, 64, 64 ...),
so one C -> C gate cannot serve all of them; `ls` shares one gate among the skips of each width (the U-ViT's
skips all have one width, so there `ls` is exactly one shared gate).

Interaction with mp_cat (the magnitude-preserving U-Net and U-ViT merge by mp_cat(x, skip, t), Eq. 103):
mp_cat weights its inputs by fixed constants that assume unit-magnitude inputs, and does not look at the
actual magnitudes. So a coefficient c on the skip acts like lowering the skip's balance from t to an
effective t c / ((1 - t) + t c) and shrinks the merged tensor's RMS by sqrt(((1 - t)^2 + t^2 c^2) / ((1 - t)^2
+ t^2)) (c = 1/sqrt(2), t = 0.5: 0.866). We deliberately do not renormalise after the gate: renormalising
would hand the lost magnitude back and cancel the damping that ScaleLong is about. The next block's
weight-normalized layers see a slightly smaller input, which the learned gains absorb.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .mp import MPConv

SKIP_SCALING_MODES = ("none", "inv_sqrt2", "cs", "ls", "ls_nonshared")
LEARNED_MODES = ("ls", "ls_nonshared")
# Narrow skips (C < 4 r) would leave the gate one or two ReLU units, which a bias-free layer easily starts
# with all dead (the gate then stays at sigmoid(0) = 0.5 and never learns); 4 units make that unlikely.
MIN_GATE_HIDDEN = 4


def check_skip_scaling(mode: str, kappa: float, ls_reduction: int, num_skips: int, where: str = "skip_scaling") -> None:
    """Raise a ValueError naming the argument for an unknown mode, kappa outside (0, 1], a bad reduction,
    or a scaling mode on a network without long skips."""
    if mode not in SKIP_SCALING_MODES:
        raise ValueError(f"{where}: skip_scaling must be one of {list(SKIP_SCALING_MODES)}, got {mode!r}")
    if isinstance(kappa, bool) or not isinstance(kappa, (int, float)) or not (0 < kappa <= 1):
        raise ValueError(f"{where}: kappa must be a number in (0, 1] (the paper uses 0.5 to 0.95), got {kappa!r}")
    if isinstance(ls_reduction, bool) or not isinstance(ls_reduction, int) or ls_reduction < 1:
        raise ValueError(f"{where}: ls_reduction must be a positive integer (SENet's r, 16), got {ls_reduction!r}")
    if mode != "none" and num_skips == 0:
        raise ValueError(f"{where}: skip_scaling={mode!r} needs long skip connections, but this network has none")


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
        ls_reduction: int = 16,  # SENet reduction r of the LS gates
        channel_dim: int = 1,  # channel axis of the skips: 1 for [N, C, H, W], 2 for [N, L, C]
    ):
        super().__init__()
        check_skip_scaling(mode, kappa, ls_reduction, len(skip_channels))
        self.mode = mode
        self.kappa = kappa
        self.channel_dim = channel_dim
        self.skip_channels = list(skip_channels)
        self.gates = None
        self.gate_index: list[int] = []  # skip i uses gates[gate_index[i - 1]]
        # The gates draw their initial weights without advancing the global generator, so that every other
        # weight of an LS network is the one the same seed gives without gates: the modes differ only by them.
        with torch.random.fork_rng(devices=[]):
            if mode == "ls":
                widths = sorted(set(self.skip_channels))
                self.gates = torch.nn.ModuleList(SEGate(c, ls_reduction) for c in widths)
                self.gate_index = [widths.index(c) for c in self.skip_channels]
            elif mode == "ls_nonshared":
                self.gates = torch.nn.ModuleList(SEGate(c, ls_reduction) for c in self.skip_channels)
                self.gate_index = list(range(len(self.skip_channels)))

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
