"""Gradient averaging across processes for the compiled multi-GPU step: the gradients are all-reduced in a few
chunks that overlap the post-step, either gathered into one float32 buffer first (`gather=True`, --grad-sync
flat) or in place as NCCL groups of per-tensor all-reduces (`gather=False`, --grad-sync grouped).

Why not DDP there: a compiled step (without --ddp-overlap) hands every gradient over at the end of one
backward graph, so DDP's buckets cannot overlap the backward anyway, and what remains is its per-parameter
work (copy into a bucket, scale, copy back). Here the gradients are gathered into the buffer by one batched
copy, and the all-reduce of chunk k+1 runs while the post-step updates the parameters of chunk k
(`PostStep(..., ready=sync)`), so only the first chunk's all-reduce is exposed. Eager runs keep DDP, whose hooks
reduce buckets while backward goes on. With --grad-sync overlap the compiled network is cut into three pieces
(UNet.graph_breaks) and each piece's gradients are all-reduced, from a gradient hook, while backward runs
through the pieces before it (`groups=`, `arm()`).

    sync = FlatGradients(net.parameters())
    optimizer.zero_grad(set_to_none=True)   # the first backward then hands its gradients over without an addition
    loss.backward()                         # once per accumulation round
    sync.start_average()          # gathers and launches the all-reduces (asynchronous), chunk by chunk
    post_step(..., ready=sync)    # waits (on the GPU stream, not the CPU) for each chunk before updating it
"""

from __future__ import annotations

from typing import Iterable, Sequence

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
    """Gradients of `params`, averaged over the process group chunk by chunk. With `gather` (the default) they are
    gathered into one buffer, each in its parameter's own memory layout (the fused post-step reads them without
    copies), and each chunk is one all-reduce; without, each chunk is one NCCL group of per-tensor all-reduces on
    the gradients where autograd left them (no copy, no buffer).

    `groups` (lists of parameter indices, in the order backward completes them) replaces the growing chunks: with
    the network compiled in as many pieces (UNet.graph_breaks), `arm()` before the last accumulation round makes
    every group but the last start its all-reduce from a gradient hook as soon as all its gradients are in, so it
    runs while backward goes on through the earlier pieces (--grad-sync overlap). The last group, which would
    finish with backward anyway, and any group whose gradients did not all arrive, start in `start_average`."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],  # trained parameters (one dtype, dense), all on one device
        chunks: int = 4,  # all-reduces per step, growing in size; each but the first overlaps the post-step
        gather: bool = True,  # copy the gradients into one buffer first
        groups: Sequence[Sequence[int]] | None = None,  # chunks as parameter indices, in backward's order
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
        if groups is None:
            self.chunks = [list(range(a, b)) for a, b in split_growing(sizes, chunks)]
        else:
            self.chunks = [list(g) for g in groups if len(g)]
            if sorted(i for g in self.chunks for i in g) != list(range(len(self.params))):
                raise ValueError(
                    f"FlatGradients: groups must hold every parameter index 0..{len(self.params) - 1} once"
                )
        self.gather = gather
        self.views: list[torch.Tensor | None] = [None] * len(self.params)
        self._slices: list[torch.Tensor] = []
        if gather:  # chunk by chunk, so that each chunk is one slice of the buffer
            self.buffer = torch.zeros(sum(sizes), device=dev, dtype=dtype)
            offset = 0
            for chunk in self.chunks:
                begin = offset
                for i in chunk:
                    p = self.params[i]
                    self.views[i] = self.buffer.as_strided(p.shape, p.stride(), offset)
                    offset += p.numel()
                self._slices.append(self.buffer[begin:offset])
        self._works: list = [None] * len(self.chunks)
        self._launched = [False] * len(self.chunks)
        self._divide = False
        self._armed = False
        self._missing: list[int] = []  # per chunk: gradients not yet in, while armed
        self._chunk_of = {i: k for k, chunk in enumerate(self.chunks) for i in chunk}
        self._hooks = []
        if groups is not None:
            self._hooks = [p.register_post_accumulate_grad_hook(self._make_hook(i)) for i, p in enumerate(self.params)]

    def _make_hook(self, index: int):
        def hook(_param: torch.Tensor) -> None:
            if not self._armed:
                return
            k = self._chunk_of[index]
            if self._launched[k]:
                raise RuntimeError(f"FlatGradients: a gradient of parameter {index} arrived after its group was "
                                   "averaged; arm() goes before the last backward of a step, once")
            self._missing[k] -= 1
            if self._missing[k] == 0 and k < len(self.chunks) - 1:
                self._launch(k)

        return hook

    def arm(self) -> None:
        """The next backward is the step's last: groups start their all-reduces as soon as their gradients are in."""
        self._armed = True
        self._missing = [len(chunk) for chunk in self.chunks]

    @torch.no_grad()
    def collect_(self, indices: Iterable[int] | None = None) -> None:
        """Gradients of the given parameters (default: all) that autograd put elsewhere are copied into the buffer
        (one batched copy) and replaced by their views; a backward after this accumulates into the views in place.
        A parameter that took no part gets a zero gradient, as DDP gives it. `start_average` calls this chunk by
        chunk."""
        dst, src = [], []
        for i in range(len(self.params)) if indices is None else indices:
            p, v = self.params[i], self.views[i]
            if v is None:  # not gathering
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                continue
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

    def _launch(self, k: int) -> None:
        """Gather chunk k and start its all-reduce (asynchronous)."""
        multi = dist.is_initialized() and dist.get_world_size() > 1
        nccl = multi and torch.distributed.get_backend() == "nccl"
        op = torch.distributed.ReduceOp.AVG if nccl else torch.distributed.ReduceOp.SUM  # gloo has no AVG
        self._divide = multi and not nccl
        self.collect_(self.chunks[k])
        self._launched[k] = True
        if not multi:
            self._works[k] = None
        elif self.gather:
            self._works[k] = torch.distributed.all_reduce(self._slices[k], op=op, async_op=True)
        else:
            with torch.distributed.distributed_c10d._coalescing_manager(async_ops=True) as group:
                for i in self.chunks[k]:
                    torch.distributed.all_reduce(self.params[i].grad, op=op)
            self._works[k] = group

    def start_average(self) -> None:
        """Launch the all-reduces not launched yet (asynchronous), each chunk right after its gradients are gathered,
        so the copies of the later chunks overlap the first all-reduce; `wait(k)` makes the current stream wait for
        chunk k."""
        for k in range(len(self.chunks)):
            if not self._launched[k]:
                self._launch(k)
        self._armed = False
        self._launched = [False] * len(self.chunks)  # for the next step

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
