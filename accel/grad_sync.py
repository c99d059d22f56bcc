"""Gradient averaging across processes for the compiled multi-GPU step ('flat', accel.SpeedPlan.grad_sync): the
gradients are gathered into one float32 buffer and all-reduced in a few chunks that overlap the post-step.

Why not DDP there: a compiled step hands every gradient over at the end of one backward graph, so DDP's buckets
cannot overlap the backward anyway, and what remains is its per-parameter work (copy into a bucket, scale, copy
back). Here the gradients are gathered into the buffer by one batched copy, and the all-reduce of chunk k+1 runs
while the post-step updates the parameters of chunk k (`PostStep(..., ready=sync)`), so only the first chunk's
all-reduce is exposed. Eager runs keep DDP ('ddp'), whose hooks reduce buckets while backward goes on.

    sync = FlatGradients(net.parameters())
    optimizer.zero_grad(set_to_none=True)   # the first backward then hands its gradients over without an addition
    loss.backward()                         # once per accumulation round
    sync.start_average()          # gathers and launches the all-reduces (asynchronous), chunk by chunk
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


def split_growing(sizes: list[int], chunks: int) -> list[tuple[int, int]]:
    """Consecutive index ranges [begin, end) of `sizes`, at most `chunks` of them, the k-th (from 0) holding about
    (k + 1) / (1 + 2 + ... + chunks) of the total: the first all-reduce, which nothing hides, is the shortest."""
    total, bounds, acc = sum(sizes), [0], 0
    weight = chunks * (chunks + 1) // 2
    for i, n in enumerate(sizes):
        acc += n
        k = len(bounds)  # chunks closed so far + 1
        if acc * weight >= total * (k * (k + 1) // 2) and i + 1 < len(sizes) and k < chunks:
            bounds.append(i + 1)
    bounds.append(len(sizes))
    return list(zip(bounds[:-1], bounds[1:]))


class FlatGradients:
    """Gradients of `params`, averaged over the process group chunk by chunk: gathered into one buffer, each in its
    parameter's own memory layout (the fused post-step reads them without copies), each chunk one all-reduce."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],  # trained parameters (one dtype, dense), all on one device
        chunks: int = 4,  # all-reduces per step, growing in size; each but the first overlaps the post-step
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
        self.chunks = [list(range(a, b)) for a, b in split_growing(sizes, chunks)]
        self.views: list[torch.Tensor] = [None] * len(self.params)  # type: ignore[list-item]
        self._slices: list[torch.Tensor] = []
        self.buffer = torch.zeros(sum(sizes), device=dev, dtype=dtype)
        offset = 0
        for chunk in self.chunks:  # chunk by chunk, so that each chunk is one slice of the buffer
            begin = offset
            for i in chunk:
                p = self.params[i]
                self.views[i] = self.buffer.as_strided(p.shape, p.stride(), offset)
                offset += p.numel()
            self._slices.append(self.buffer[begin:offset])
        self._works: list = [None] * len(self.chunks)
        self._divide = False

    @torch.no_grad()
    def collect_(self, indices: Iterable[int] | None = None) -> None:
        """Gradients of the given parameters (default: all) that autograd put elsewhere are copied into the buffer
        (one batched copy) and replaced by their views; a backward after this accumulates into the views in place.
        A parameter that took no part gets a zero gradient, as DDP gives it. `start_average` calls this chunk by
        chunk."""
        dst, src = [], []
        for i in range(len(self.params)) if indices is None else indices:
            p, v = self.params[i], self.views[i]
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
        """Launch the all-reduces (asynchronous), each chunk right after its gradients are gathered, so the copies of
        the later chunks overlap the first all-reduce; `wait(k)` makes the current stream wait for chunk k."""
        multi = dist.is_initialized() and dist.get_world_size() > 1
        nccl = multi and torch.distributed.get_backend() == "nccl"
        op = torch.distributed.ReduceOp.AVG if nccl else torch.distributed.ReduceOp.SUM  # gloo has no AVG
        self._divide = multi and not nccl
        for k, chunk in enumerate(self.chunks):
            self.collect_(chunk)
            self._works[k] = torch.distributed.all_reduce(self._slices[k], op=op, async_op=True) if multi else None

    def wait(self, k: int) -> None:
        """Chunk k holds the mean over processes once the current stream reaches this point."""
        work = self._works[k]
        if work is not None:
            work.wait()
            if self._divide:
                torch._foreach_div_([self.params[i].grad for i in self.chunks[k]], float(dist.get_world_size()))
            self._works[k] = None

    def average_(self) -> None:
        """Every gradient replaced by its mean over the process group (a no-op for a lone process)."""
        self.start_average()
        for k in range(len(self.chunks)):
            self.wait(k)
