"""Gradient averaging across processes for the compiled multi-GPU step: every gradient ends up in one float32
buffer, which is all-reduced in a few chunks that overlap the post-step.

Why not DDP there: a compiled step (without --ddp-overlap) hands every gradient over at the end of one
backward graph, so DDP's buckets cannot overlap the backward anyway, and what remains is its per-parameter
work (copy into a bucket, scale, copy back). Here the gradients are gathered into the buffer by one batched
copy, and the all-reduce of chunk k+1 runs while the post-step updates the parameters of chunk k
(`PostStep(..., ready=sync)`), so only the first chunk's all-reduce is exposed. Eager runs keep DDP, whose hooks
reduce buckets while backward goes on.

    sync = FlatGradients(net.parameters())
    sync.zero_()                  # instead of optimizer.zero_grad()
    loss.backward(); sync.collect_()   # once per accumulation round
    sync.start_average()          # asynchronous all-reduces, chunk by chunk
    post_step(..., ready=sync)    # waits (on the GPU stream, not the CPU) for each chunk before updating it
"""

from __future__ import annotations

from typing import Iterable

import torch

from torch_utils import distributed as dist


def _dense_strides(p: torch.Tensor) -> bool:
    """Whether p's elements fill numel() consecutive slots (any axis order), so a buffer slice can take its layout."""
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(p.stride(), p.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def split_evenly(sizes: list[int], chunks: int) -> list[tuple[int, int]]:
    """Consecutive index ranges [begin, end) of `sizes`, at most `chunks` of them, each near sum / chunks."""
    total, bounds, acc = sum(sizes), [0], 0
    for i, n in enumerate(sizes):
        acc += n
        if acc * chunks >= total * len(bounds) and i + 1 < len(sizes) and len(bounds) < chunks:
            bounds.append(i + 1)
    bounds.append(len(sizes))
    return list(zip(bounds[:-1], bounds[1:]))


class FlatGradients:
    """Gradients of `params` gathered into one buffer, each in its parameter's own memory layout (the fused
    post-step reads them without copies), and averaged over the process group chunk by chunk."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],  # trained parameters (one dtype, dense), all on one device
        chunks: int = 4,  # all-reduces per step; each but the first overlaps the post-step of the one before
    ):
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("FlatGradients: no parameters that require gradients")
        if chunks < 1:
            raise ValueError(f"FlatGradients: chunks must be at least 1, got {chunks}")
        dev, dtype = self.params[0].device, self.params[0].dtype
        for p in self.params:
            if p.device != dev or p.dtype != dtype or not _dense_strides(p):
                raise ValueError(f"FlatGradients: parameters must be dense, of one dtype and device; got {p.dtype} "
                                 f"{tuple(p.shape)} strides {p.stride()} on {p.device}")
        sizes = [p.numel() for p in self.params]
        self.buffer = torch.zeros(sum(sizes), device=dev, dtype=dtype)
        self.views, offsets = [], [0]
        for p in self.params:
            self.views.append(self.buffer.as_strided(p.shape, p.stride(), offsets[-1]))
            offsets.append(offsets[-1] + p.numel())
        self.chunks = split_evenly(sizes, chunks)  # parameter index ranges
        self._slices = [self.buffer[offsets[a] : offsets[b]] for a, b in self.chunks]
        self._works: list = []

    def zero_(self) -> None:
        """Start a step: gradients to None, so the first backward hands its results over without an addition."""
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def collect_(self) -> None:
        """After each backward: gradients that autograd put elsewhere are copied into the buffer (one batched copy)
        and replaced by their views; later backwards of the step accumulate into the views in place. A parameter
        that took no part gets a zero gradient, as DDP gives it."""
        dst, src = [], []
        for p, v in zip(self.params, self.views):
            if p.grad is v:
                continue
            if p.grad is None:
                v.zero_()
            else:
                dst.append(v)
                src.append(p.grad)
            p.grad = v
        if dst:
            torch._foreach_copy_(dst, src)

    def start_average(self) -> None:
        """Launch the all-reduces (asynchronous); `wait(k)` makes the current stream wait for chunk k."""
        self.collect_()
        if not dist.is_initialized() or dist.get_world_size() == 1:
            self._works = [None] * len(self._slices)
            return
        nccl = torch.distributed.get_backend() == "nccl"
        op = torch.distributed.ReduceOp.AVG if nccl else torch.distributed.ReduceOp.SUM  # gloo has no AVG
        self._works = [torch.distributed.all_reduce(s, op=op, async_op=True) for s in self._slices]
        self._divide = not nccl

    def wait(self, k: int) -> None:
        """Chunk k holds the mean over processes once the current stream reaches this point."""
        work = self._works[k]
        if work is not None:
            work.wait()
            if self._divide:
                self._slices[k].div_(dist.get_world_size())
            self._works[k] = None

    def average_(self) -> None:
        """Every gradient replaced by its mean over the process group (a no-op for a lone process)."""
        self.start_average()
        for k in range(len(self._slices)):
            self.wait(k)
