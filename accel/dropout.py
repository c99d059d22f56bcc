"""Dropout whose random keep-mask costs one Philox call per four elements on CUDA.

torch.compile turns `F.dropout` into a `tl.rand` per element inside the fused kernel around it: ten Philox
rounds for each element, of which three quarters of the output are thrown away. For EDM2-M (dropout 0.1 in every
residual branch) that makes the modulate-SiLU-dropout kernels compute-bound: they take several times the time
needed to move their data (profile figures in the README's Speed section). Here the keep-mask comes from
`tl.rand4x` (four uniform numbers per Philox call) in an opaque operator (`torch.ops.edm2.dropout_keep_mask`),
and the scaling by the mask stays plain tensor arithmetic that the compiler fuses with its neighbours, forward
and backward, as before.

The mask is a different random draw from torch's, with the same distribution: keep each element with probability
1 - p (uniform u >= p), scale kept ones by 1 / (1 - p), as `F.dropout` does. The seed of each call is drawn from
torch's generator on the device, so `torch.manual_seed` (and a resumed training run's restored RNG state) makes
the masks reproducible. Off CUDA (or without Triton) `dropout` is `F.dropout`. `FastDropout` is the module that
accel.SpeedPlan puts in place of the network's `networks.mp.Dropout`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from networks.mp import Dropout, is_channels_last

from .kernels import kernels_available

try:  # Triton comes with CUDA builds of PyTorch; the plain path needs nothing beyond torch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

BLOCK = 1024  # Philox calls per program; each gives four mask elements

if triton is not None:

    @triton.jit
    def _keep_mask_kernel(
        seed_ptr,  # int64 [1]: the seed of this call
        out_ptr,  # bool [numel]: the mask, over the tensor's storage order
        numel,
        p,  # drop probability
        BLOCK: tl.constexpr,
    ):
        seed = tl.load(seed_ptr)
        pid = tl.program_id(0)
        # One 32-bit Philox counter per lane (computed in int64, so no signed overflow past 2^31), feeding four
        # consecutive runs of BLOCK elements.
        counter = (pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)).to(tl.uint32)
        u0, u1, u2, u3 = tl.rand4x(seed, counter)
        start = pid.to(tl.int64) * (4 * BLOCK) + tl.arange(0, BLOCK)
        tl.store(out_ptr + start, u0 >= p, mask=start < numel)
        tl.store(out_ptr + start + BLOCK, u1 >= p, mask=start + BLOCK < numel)
        tl.store(out_ptr + start + 2 * BLOCK, u2 >= p, mask=start + 2 * BLOCK < numel)
        tl.store(out_ptr + start + 3 * BLOCK, u3 >= p, mask=start + 3 * BLOCK < numel)


def _empty_mask(seed: torch.Tensor, shape: list[int], channels_last: bool) -> torch.Tensor:
    fmt = torch.channels_last if channels_last and len(shape) == 4 else torch.contiguous_format
    return torch.empty(shape, dtype=torch.bool, device=seed.device, memory_format=fmt)


@torch.library.custom_op("edm2::dropout_keep_mask", mutates_args=())
def dropout_keep_mask(seed: torch.Tensor, shape: list[int], channels_last: bool, p: float) -> torch.Tensor:
    """A bool tensor of `shape` (channels-last if asked, for a 4-D shape), True with probability 1 - p,
    independently per element, from the int64 `seed` [1], a tensor on the device (no host sync). Only shapes are
    passed, not the tensor to drop from, so that a compiled graph need not write that tensor out for this call."""
    out = _empty_mask(seed, shape, channels_last)
    if out.numel() >= 2**34:
        raise ValueError(f"dropout_keep_mask: {out.numel()} elements; at most 2^34 (Philox counters are 32-bit)")
    if out.numel():
        grid = (triton.cdiv(out.numel(), 4 * BLOCK),)
        _keep_mask_kernel[grid](seed, out, out.numel(), p, BLOCK=BLOCK, num_warps=4)
    return out


@dropout_keep_mask.register_fake
def _(seed: torch.Tensor, shape: list[int], channels_last: bool, p: float) -> torch.Tensor:
    return _empty_mask(seed, shape, channels_last)


def dropout(x: torch.Tensor, p: float, fast: bool = True) -> torch.Tensor:
    """Training-mode dropout of x with probability p (call it only when training). With `fast` and x where the
    kernel runs (CUDA with Triton), the keep-mask comes from `dropout_keep_mask`; otherwise this is F.dropout."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout: p must be in [0, 1), got {p!r}")
    if p == 0:
        return x
    if not (fast and kernels_available(x.device)):
        return F.dropout(x, p=p)
    seed = torch.randint(0, 2**62, (1,), device=x.device)
    keep = dropout_keep_mask(seed, list(x.shape), is_channels_last(x), p)
    return torch.where(keep, x * (1 / (1 - p)), 0)


class FastDropout(Dropout):
    """networks.mp.Dropout with the keep-mask from `dropout_keep_mask` where the kernel runs (the same distribution,
    different draws); elsewhere the same as the module it replaces."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p) if self.training and self.p != 0 else x
