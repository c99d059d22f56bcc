"""The effective weights of many MPConv layers at once: normalize(w) / sqrt(fan_in) in the activation dtype
(Eq. 47 with gain 1), forward and backward, one Triton launch each for the whole network on CUDA.

Computed per layer, as `MPConv.effective_weight` does, a training step runs two small kernels per weight (the
row norms with the scaling and cast, then their backward): about 260 launches for EDM2-S, most of them too small
to fill the GPU, each with its own launch gap. Here one program per output unit (row) of every weight walks its
row in chunks, so all weights go through in one launch, forward and backward.

`effective_weights` is an opaque operator for torch.compile (`torch.ops.edm2.effective_weights`, with its
backward `torch.ops.edm2.effective_weights_backward`), so a compiled training step calls the two kernels where
the per-layer code would have been. Off CUDA (or without Triton) it computes the same thing per weight with
plain tensor operations: that is the definition, and tests compare the kernel against it (in Triton's
interpreter on the CPU; benchmarks/check_cuda.py on a GPU).
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import torch

from .mp import NORM_EPS, normalize

try:  # Triton comes with CUDA builds of PyTorch; the plain path needs nothing beyond torch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

SUB = 512  # elements a program handles at once: rows are walked in chunks of this many


def kernel_available(device: torch.device | str) -> bool:
    """Whether the Triton kernels run for tensors on `device`: CUDA with Triton (or Triton's interpreter on the
    CPU, with TRITON_INTERPRET=1 set before Triton is imported: that is for tests)."""
    kind = torch.device(device).type
    return triton is not None and (kind == "cuda" or (kind == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"))


def _row_major(t: torch.Tensor) -> bool:
    """Each output unit (index along axis 0) is one contiguous run of fan_in elements: contiguous or
    channels-last storage."""
    return t.is_contiguous() or (t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last))


def _fan_in(w: torch.Tensor) -> int:
    return w[0].numel()


# --- the definition -----------------------------------------------------------------------------------------


def effective_weights_reference(weights: Sequence[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """normalize(w) / sqrt(fan_in) in `dtype`, per weight, with plain differentiable tensor operations (the same
    expressions as `MPConv.effective_weight` with gain 1), laid out like each weight."""
    out = []
    for w in weights:
        e = (normalize(w.to(torch.float32)) * (1 / math.sqrt(_fan_in(w)))).to(dtype)
        out.append(e if e.stride() == w.stride() else torch.empty_like(w, dtype=dtype).copy_(e))
    return out


def _backward_reference(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The gradient of effective_weights_reference([w]) for output gradient g, written out (a custom operator's
    body runs without autograd): with y = (w / n) s, n = eps + ||w|| s, s = 1 / sqrt(fan_in),
    dL/dw = (s / n) (g - w (w . g) s / (n ||w||)), the radial part removed (none where ||w|| = 0, as torch's norm
    backward gives)."""
    dims = list(range(1, w.ndim))
    s = 1 / math.sqrt(_fan_in(w))
    g = g.to(torch.float32)
    length = torch.linalg.vector_norm(w, dim=dims, keepdim=True)
    norm = NORM_EPS + length * s
    dot = (w * g).sum(dim=dims, keepdim=True)
    radial = torch.where(length > 0, dot * s / (norm * length).clamp(min=1e-30), 0.0)
    return (s / norm) * (g - w * radial)


# --- the kernels --------------------------------------------------------------------------------------------

if triton is not None:
    _NORM_EPS = tl.constexpr(NORM_EPS)

    @triton.jit
    def _row_pointer(pointers, i, off, DTYPE: tl.constexpr):
        """The row's first element: pointer table entry i (a tensor's data pointer) plus the row's offset."""
        return tl.load(pointers + i).to(tl.pointer_type(DTYPE)) + off

    @triton.jit
    def _forward_rows(
        w_ptrs,  # int64 [num]: data pointers of the float32 weights
        out_ptrs,  # int64 [num]: data pointers of the outputs (dtype of OUT_DTYPE), laid out like the weights
        row_tensor,  # int32 [rows]: which weight each row belongs to
        row_offset,  # int64 [rows]: first element of the row in its weight
        row_len,  # int32 [rows]: fan_in of the row's weight
        row_scale,  # float32 [rows]: 1 / sqrt(fan_in), as the host computes it
        OUT_DTYPE: tl.constexpr,
        SUB: tl.constexpr,
    ):
        r = tl.program_id(0)
        i = tl.load(row_tensor + r)
        off = tl.load(row_offset + r)
        n = tl.load(row_len + r)
        w_ptr = _row_pointer(w_ptrs, i, off, tl.float32)
        o_ptr = _row_pointer(out_ptrs, i, off, OUT_DTYPE)
        acc = tl.zeros([SUB], dtype=tl.float32)
        for c in range(0, n, SUB):
            offs = c + tl.arange(0, SUB)
            w = tl.load(w_ptr + offs, mask=offs < n, other=0.0)
            acc += w * w
        scale = tl.load(row_scale + r)
        norm = _NORM_EPS + tl.sqrt(tl.sum(acc, 0)) * scale  # normalize(): eps + ||w|| / sqrt(fan_in)
        for c in range(0, n, SUB):
            offs = c + tl.arange(0, SUB)
            mask = offs < n
            w = tl.load(w_ptr + offs, mask=mask, other=0.0)
            tl.store(o_ptr + offs, ((w / norm) * scale).to(OUT_DTYPE), mask=mask)

    @triton.jit
    def _backward_rows(
        w_ptrs,  # int64 [num]: data pointers of the float32 weights
        g_ptrs,  # int64 [num]: data pointers of the output gradients (dtype of G_DTYPE), laid out like the weights
        out_ptrs,  # int64 [num]: data pointers of the float32 weight gradients, laid out like the weights
        row_tensor,
        row_offset,
        row_len,
        row_scale,
        G_DTYPE: tl.constexpr,
        SUB: tl.constexpr,
    ):
        # _backward_reference, row by row: (s / n) (g - w (w . g) s / (n ||w||)).
        r = tl.program_id(0)
        i = tl.load(row_tensor + r)
        off = tl.load(row_offset + r)
        n = tl.load(row_len + r)
        w_ptr = _row_pointer(w_ptrs, i, off, tl.float32)
        g_ptr = _row_pointer(g_ptrs, i, off, G_DTYPE)
        o_ptr = _row_pointer(out_ptrs, i, off, tl.float32)
        sq = tl.zeros([SUB], dtype=tl.float32)
        dot = tl.zeros([SUB], dtype=tl.float32)
        for c in range(0, n, SUB):
            offs = c + tl.arange(0, SUB)
            mask = offs < n
            w = tl.load(w_ptr + offs, mask=mask, other=0.0)
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            sq += w * w
            dot += w * g
        scale = tl.load(row_scale + r)
        length = tl.sqrt(tl.sum(sq, 0))
        norm = _NORM_EPS + length * scale
        radial = tl.where(length > 0, tl.sum(dot, 0) * scale / tl.maximum(norm * length, 1e-30), 0.0)
        for c in range(0, n, SUB):
            offs = c + tl.arange(0, SUB)
            mask = offs < n
            w = tl.load(w_ptr + offs, mask=mask, other=0.0)
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(o_ptr + offs, (scale / norm) * (g - w * radial), mask=mask)

    _TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


_ROWS: dict[tuple, tuple[torch.Tensor, ...]] = {}  # shapes, device -> row tables


def _row_table(weights: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """(weight index, first element, length, 1 / sqrt(length)) of every row: one row per output unit. Depends on
    shapes only, so it is built once per network."""
    key = (tuple(tuple(w.shape) for w in weights), weights[0].device)
    if key not in _ROWS:
        index, offset, length, scale = [], [], [], []
        for i, w in enumerate(weights):
            fan = _fan_in(w)
            index += [i] * w.shape[0]
            offset += range(0, w.numel(), fan)
            length += [fan] * w.shape[0]
            scale += [1 / math.sqrt(fan)] * w.shape[0]
        dev = weights[0].device
        _ROWS[key] = tuple(torch.tensor(v, dtype=t, device=dev) for v, t in zip(
            (index, offset, length, scale), (torch.int32, torch.int64, torch.int32, torch.float32)))
    return _ROWS[key]


def _pointers(*lists: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each list's data pointers as an int64 tensor on their device (one host-to-device copy for all)."""
    dev = lists[0][0].device
    table = torch.tensor([[t.data_ptr() for t in ts] for ts in lists], dtype=torch.int64)
    table = table.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else table.to(dev)
    return list(table.unbind(0))


def _check(weights: Sequence[torch.Tensor], what: str) -> None:
    for w in weights:
        if w.dtype != torch.float32 or w.ndim < 2 or not _row_major(w):
            raise ValueError(f"{what}: weights must be float32, 2-D or more, contiguous or channels-last; got "
                             f"{w.dtype} {tuple(w.shape)} strides {w.stride()}")


@torch.library.custom_op("edm2::effective_weights", mutates_args=())
def _effective_weights_op(weights: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    _check(weights, "effective_weights")
    outs = [torch.empty_like(w, dtype=dtype) for w in weights]
    if not weights:
        return outs
    if not kernel_available(weights[0].device):
        with torch.no_grad():
            for o, e in zip(outs, effective_weights_reference(weights, dtype)):
                o.copy_(e)
        return outs
    rows = _row_table(weights)
    w_ptrs, o_ptrs = _pointers(weights, outs)
    _forward_rows[(rows[0].numel(),)](w_ptrs, o_ptrs, *rows, OUT_DTYPE=_TL_DTYPES[dtype], SUB=SUB, num_warps=4)
    return outs


@_effective_weights_op.register_fake
def _(weights: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    return [torch.empty_like(w, dtype=dtype) for w in weights]


@torch.library.custom_op("edm2::effective_weights_backward", mutates_args=())
def _effective_weights_backward_op(weights: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
    outs = [torch.empty_like(w) for w in weights]
    if not weights:
        return outs
    # The kernel reads each gradient row by row like its weight; another layout is copied into the weight's first.
    grads = [
        g if g.stride() == w.stride() else torch.empty_like(w, dtype=g.dtype).copy_(g) for g, w in zip(grads, weights)
    ]
    if not kernel_available(weights[0].device) or len({g.dtype for g in grads}) != 1:
        for o, w, g in zip(outs, weights, grads):
            o.copy_(_backward_reference(w, g))
        return outs
    rows = _row_table(weights)
    w_ptrs, g_ptrs, o_ptrs = _pointers(weights, grads, outs)
    _backward_rows[(rows[0].numel(),)](
        w_ptrs, g_ptrs, o_ptrs, *rows, G_DTYPE=_TL_DTYPES[grads[0].dtype], SUB=SUB, num_warps=4
    )
    return outs


@_effective_weights_backward_op.register_fake
def _(weights: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.empty_like(w) for w in weights]


def _setup_context(ctx, inputs, output) -> None:
    weights, _dtype = inputs
    ctx.save_for_backward(*weights)


def _backward(ctx, grads):
    weights = ctx.saved_tensors
    grads = [torch.zeros_like(w, dtype=torch.float32) if g is None else g for w, g in zip(weights, grads)]
    return torch.ops.edm2.effective_weights_backward(list(weights), grads), None


_effective_weights_op.register_autograd(_backward, setup_context=_setup_context)


def effective_weights(weights: Sequence[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """normalize(w) / sqrt(fan_in) in `dtype` for every float32 weight (Eq. 47, gain 1), each laid out like its
    weight, differentiable. On CUDA one kernel launch for all of them (and one for all their gradients)."""
    weights = list(weights)
    if not weights:
        return []
    return list(torch.ops.edm2.effective_weights(weights, dtype))
