"""Gradient averaging across processes for the compiled multi-GPU step: every gradient is a view into one
float32 buffer, so one all-reduce averages them all.

Why not DDP there: a compiled step (without --ddp-overlap) hands every gradient over at the end of one
backward graph, so DDP's buckets cannot overlap the backward anyway, and what remains is its per-parameter
work (copy into a bucket, scale, copy back). Here backward accumulates straight into the buffer and the
average is a single collective. Eager runs keep DDP, whose hooks reduce buckets while backward goes on.

    sync = FlatGradients(net.parameters())
    sync.zero_()                  # instead of optimizer.zero_grad()
    loss.backward()               # any number of times (accumulation rounds)
    sync.average_()               # every .grad now holds the mean over processes
"""

from __future__ import annotations

from typing import Iterable

import torch

from torch_utils import distributed as dist


def _dense_strides(p: torch.Tensor) -> bool:
    """Whether p's elements fill numel() consecutive slots (any axis order), so a buffer slice can take its layout."""
    order = sorted((s, n) for s, n in zip(p.stride(), p.shape) if n != 1)
    expected = 1
    for stride, size in order:
        if stride != expected:
            return False
        expected *= size
    return True


class FlatGradients:
    """Gradients of `params` laid out in one buffer, in each parameter's own memory layout (the fused post-step
    reads them without copies), averaged over the process group by `average_()`."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],  # trained parameters (float32, dense), all on one device
    ):
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("FlatGradients: no parameters that require gradients")
        dev, dtype = self.params[0].device, self.params[0].dtype
        for p in self.params:
            if p.device != dev or p.dtype != dtype or not _dense_strides(p):
                raise ValueError(f"FlatGradients: parameters must be dense, of one dtype and device; got {p.dtype} "
                                 f"{tuple(p.shape)} strides {p.stride()} on {p.device}")
        self.buffer = torch.zeros(sum(p.numel() for p in self.params), device=dev, dtype=dtype)
        self.views, offset = [], 0
        for p in self.params:
            self.views.append(self.buffer.as_strided(p.shape, p.stride(), offset))
            offset += p.numel()
        self.attach()

    def attach(self) -> None:
        """Point every .grad at its view (again: after someone set them to None or replaced them)."""
        for p, v in zip(self.params, self.views):
            if p.grad is not v:
                if p.grad is not None:
                    v.copy_(p.grad)
                p.grad = v

    def zero_(self) -> None:
        """Zero every gradient with one fill; backward then accumulates into the views."""
        self.attach()
        self.buffer.zero_()

    def average_(self) -> None:
        """Replace every gradient by its mean over the process group (a no-op for a lone process)."""
        self.attach()  # a gradient autograd put elsewhere (it should not) is copied in first
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return
        if torch.distributed.get_backend() == "nccl":
            torch.distributed.all_reduce(self.buffer, op=torch.distributed.ReduceOp.AVG)
        else:  # gloo has no AVG
            torch.distributed.all_reduce(self.buffer)
            self.buffer.div_(dist.get_world_size())
