"""Everything between the backward pass and the next forward (docs/design.md §5, §6): non-finite gradient elements
set to zero, Adam, the power-function EMA updates (Eq. 127; or the traditional EMA of ablation configs A-B, §13, one
more copy with its own beta) and forced weight normalization (Eq. 66), in that order.

The order is the official training loop's: its EMAs average the weights right after Adam, before they are
re-normalized (it normalizes them at the next training forward), so the EMA tensors of a run, and its snapshots,
equal the official ones for the same training. (The effective weights are the same either way; the stored
tensors are not.)

`PostStep(..., fused=False)` runs the library calls one after the other (torch.nan_to_num_, torch.optim.Adam,
`PowerFunctionEMA.update`, `Precond.normalize_weights_`): that is the definition, and it runs anywhere.
`fused=True` computes the same thing with a Triton kernel (CUDA): each program owns one row of a parameter (one
output unit of a weight: the unit whose norm forced weight normalization fixes). It walks the row in chunks of
SUB elements twice: first Adam (weight, gradient and both moments loaded once, stored once), the blend of the
new weight into every EMA copy and the row's sum of squares, then the normalization of the row, read back from
cache. From
memory that is 4 + k reads and 3 + k writes per element (k EMAs) in one launch per row-length bucket, against
about twice that traffic and hundreds of small launches for the separate calls (benchmarks/profile_step.py
--post-step fused|plain measures both).

The Adam state stays in the torch.optim.Adam object (state 'step', 'exp_avg', 'exp_avg_sq'), so checkpoints
look the same on either path and resume on the other.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from networks.mp import NORM_EPS, MPConv

from .kernels import kernels_available

try:  # Triton comes with CUDA builds of PyTorch; the plain path needs nothing beyond torch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

MAX_EMAS = 4  # EMA copies one launch updates; more fall back to the plain path
CHUNK = 1024  # parameters that are not normalized are processed in rows of at most this many elements
SUB = 512  # elements a program handles at once (2 warps, 8 per thread): rows are walked in chunks of this
P, G, M, V, E0 = 0, 1, 2, 3, 4  # rows of the pointer table: weight, gradient, Adam moments, first EMA copy


def fused_available(device: torch.device | str) -> bool:
    """Whether the fused path runs for parameters on `device` (accel.kernels.kernels_available)."""
    return kernels_available(device)


def zero_nonfinite_grads_(net: torch.nn.Module) -> None:
    """Replace NaN / inf gradient elements by zero (the reference's guard against rare fp16 overflows)."""
    for p in net.parameters():
        if p.grad is not None:
            torch.nan_to_num_(p.grad, nan=0, posinf=0, neginf=0)


if triton is not None:
    _P, _G, _M, _V, _E0 = (tl.constexpr(v) for v in (P, G, M, V, E0))
    _NORM_EPS = tl.constexpr(NORM_EPS)

    @triton.jit
    def _ema_lerp(bases, num_params, i, off, offs, mask, p, k: tl.constexpr, w0, w1, w2, w3):
        """EMA copy k of the row chunk: ema.lerp_(p, w), as torch computes lerp."""
        w = w0
        if k == 1:
            w = w1
        if k == 2:
            w = w2
        if k == 3:
            w = w3
        e_ptr = tl.load(bases + (_E0 + k) * num_params + i).to(tl.pointer_type(tl.float32)) + off
        e = tl.load(e_ptr + offs, mask=mask, other=0.0)
        e = tl.where(w < 0.5, e + w * (p - e), p - (p - e) * (1 - w))
        tl.store(e_ptr + offs, e, mask=mask)

    @triton.jit
    def _post_step_rows(
        bases,  # int64 [4 + NUM_EMA, num_params]: data pointers of weight, grad, exp_avg, exp_avg_sq, EMA copies
        num_params,  # row stride of `bases`
        row_param,  # int32 [rows]: which parameter each row belongs to
        row_offset,  # int64 [rows]: first element of the row in its parameter
        row_len,  # int32 [rows]: elements in the row (<= BLOCK)
        row_scale,  # float32 [rows]: 1/sqrt(fan-in), the scale of the row norm (read when NORMALIZE)
        step_size,  # lr / (1 - beta1^step)
        bias2_sqrt,  # sqrt(1 - beta2^step)
        beta1,
        beta2,
        eps,
        ema_w0,  # 1 - beta of EMA copy 0 (Eq. 127); likewise 1..3
        ema_w1,
        ema_w2,
        ema_w3,
        NUM_EMA: tl.constexpr,
        NORMALIZE: tl.constexpr,  # rows are output units of an MPConv weight: forced weight normalization
        BLOCK: tl.constexpr,  # row length rounded up to a power of two (short rows) or to a multiple of SUB
        SUB: tl.constexpr,  # elements per chunk: the row is walked in BLOCK // SUB chunks
    ):
        r = tl.program_id(0)
        i = tl.load(row_param + r)
        off = tl.load(row_offset + r)
        n = tl.load(row_len + r)
        p_ptr = tl.load(bases + _P * num_params + i).to(tl.pointer_type(tl.float32)) + off
        g_ptr = tl.load(bases + _G * num_params + i).to(tl.pointer_type(tl.float32)) + off
        m_ptr = tl.load(bases + _M * num_params + i).to(tl.pointer_type(tl.float32)) + off
        v_ptr = tl.load(bases + _V * num_params + i).to(tl.pointer_type(tl.float32)) + off
        # Pass 1: Adam, in torch.optim.Adam's order of operations, and the row's sum of squares. Chunks keep few
        # registers per thread, so many rows are in flight per SM and their memory latency overlaps.
        acc = tl.zeros([SUB], dtype=tl.float32)
        for c in range(BLOCK // SUB):  # a loop, not unrolled: unrolled chunks keep all their loads in registers
            offs = c * SUB + tl.arange(0, SUB)
            mask = offs < n
            g = tl.load(g_ptr + offs, mask=mask, other=0.0)
            g = tl.where(tl.abs(g) < float("inf"), g, 0.0)  # NaN and +-inf -> 0
            m = tl.load(m_ptr + offs, mask=mask, other=0.0)
            v = tl.load(v_ptr + offs, mask=mask, other=0.0)
            p = tl.load(p_ptr + offs, mask=mask, other=0.0)
            m = m + (1 - beta1) * (g - m)
            v = v * beta2 + (1 - beta2) * g * g
            p = p - step_size * (m / (tl.sqrt(v) / bias2_sqrt + eps))
            tl.store(m_ptr + offs, m, mask=mask)
            tl.store(v_ptr + offs, v, mask=mask)
            tl.store(p_ptr + offs, p, mask=mask)  # with NORMALIZE, read back below by the same threads (cached)
            acc += p * p
            # The EMAs take the weight after Adam, before it is re-normalized (the official loop's order).
            for k in tl.static_range(NUM_EMA):
                _ema_lerp(bases, num_params, i, off, offs, mask, p, k, ema_w0, ema_w1, ema_w2, ema_w3)
        if NORMALIZE:
            # Pass 2: forced weight normalization of the row (Eq. 66), p / (eps + ||p|| / sqrt(fan_in)).
            norm = _NORM_EPS + tl.sqrt(tl.sum(acc, 0)) * tl.load(row_scale + r)
            for c in range(BLOCK // SUB):
                offs = c * SUB + tl.arange(0, SUB)
                mask = offs < n
                p = tl.load(p_ptr + offs, mask=mask, other=0.0) / norm
                tl.store(p_ptr + offs, p, mask=mask)

def _rows(p: torch.Tensor, normalized: bool) -> tuple[list[int], list[int], float]:
    """Row offsets and lengths of one parameter, and the normalization scale of its rows."""
    n = p.numel()
    if normalized and p.ndim >= 2:
        fan_in = n // p.shape[0]
        return list(range(0, n, fan_in)), [fan_in] * p.shape[0], 1 / math.sqrt(fan_in)
    starts = list(range(0, n, CHUNK))
    return starts, [min(CHUNK, n - s) for s in starts], 0.0


def _dense(p: torch.Tensor) -> bool:
    """Elements fill [data_ptr, data_ptr + numel) with the first axis outermost (contiguous or channels-last)."""
    return p.is_contiguous() or (p.ndim == 4 and p.is_contiguous(memory_format=torch.channels_last))


def _row_aligned(t: torch.Tensor, like: torch.Tensor) -> bool:
    """Same shape, strides and dtype as the weight: row r covers the same elements, in the same order."""
    return t.shape == like.shape and t.stride() == like.stride() and t.dtype == like.dtype and t.device == like.device


class PostStep:
    """Call `post_step(cur_nimg, batch)` once per optimizer step, after backward (and after DDP has reduced the
    gradients), with cur_nimg the images seen after this step. The learning rate is the optimizer's group lr."""

    def __init__(
        self,
        net: torch.nn.Module,  # the trained network (Precond); its MPConv weights are normalized after the step
        optimizer: torch.optim.Adam,  # holds lr, betas, eps and the moments; one parameter group, no weight decay
        ema: Any = None,  # PowerFunctionEMA or TraditionalEMA (None on ranks that keep no EMA)
        fused: bool = False,  # the Triton kernel (CUDA) instead of the separate library calls
        normalize: bool = True,  # forced weight normalization (Eq. 66); off for ablation configs A-D
    ):
        self.net, self.optimizer, self.ema = net, optimizer, ema
        self.normalize = normalize
        self.params = list(net.parameters())
        groups = optimizer.param_groups
        if len(groups) != 1 or [id(p) for p in groups[0]["params"]] != [id(p) for p in self.params]:
            raise ValueError("PostStep: the optimizer must hold the network's parameters, in order, in one group")
        group = groups[0]
        if group.get("weight_decay", 0) or group.get("amsgrad") or group.get("maximize"):
            raise ValueError("PostStep: plain Adam only (no weight decay, amsgrad or maximize)")
        num_emas = len(ema.emas) if ema is not None else 0
        self.fused = bool(fused) and num_emas <= MAX_EMAS
        if fused and not fused_available(self.params[0].device):
            raise ValueError("PostStep: fused=True needs Triton (pip install triton) and CUDA parameters")
        self._row_buckets: dict[tuple, list] = {}  # chunks (parameter indices) -> the row buckets of each chunk
        if self.fused:  # also checks the parameters now rather than at the first step
            whole = tuple(range(len(self.params)))
            self._row_buckets[(whole,)] = [self._build_rows(whole)]

    def __call__(self, cur_nimg: int, batch: int, ready: Any = None) -> None:
        """`ready`: gradients still being averaged (accel/grad_sync.FlatGradients after `start_average()`); the
        parameters of each of its chunks are updated as soon as that chunk's all-reduce is done."""
        betas = self.ema.betas(cur_nimg, batch) if self.ema is not None else []
        chunks = [list(range(len(self.params)))]
        if ready is not None:
            if [id(p) for p in ready.params] != [id(p) for p in self.params]:
                raise ValueError("PostStep: `ready` must hold the network's parameters, in order")
            chunks = ready.chunks
        if not self.fused:
            for k in range(len(chunks)) if ready is not None else ():
                ready.wait(k)
            zero_nonfinite_grads_(self.net)
            self.optimizer.step()
            if self.ema is not None:  # before the normalization, as the official loop does
                self.ema.update(self.net, cur_nimg, batch)
            if self.normalize:
                self.net.normalize_weights_()  # Eq. 66
            return
        self._fused_step(betas, chunks, ready)

    # --- the fused path ---------------------------------------------------------------------------------

    def _build_rows(self, indices: Sequence[int]) -> list:
        """Rows of the parameters with the given indices, grouped by padded length (a power of two up to SUB, else a
        multiple of SUB) and by whether forced weight normalization applies to them: one launch per group."""
        normalized = {id(m.weight) for m in self.net.modules() if isinstance(m, MPConv) and self.normalize}
        buckets: dict[tuple[int, bool], tuple[list, list, list, list]] = {}
        for index in indices:
            p = self.params[index]
            if p.dtype != torch.float32 or not _dense(p):
                raise ValueError(f"PostStep: fused=True needs dense float32 parameters, got {p.dtype} {p.stride()}")
            starts, lengths, scale = _rows(p, id(p) in normalized)
            for start, length in zip(starts, lengths):
                block = max(16, triton.next_power_of_2(length)) if length <= SUB else -(-length // SUB) * SUB
                rows = buckets.setdefault((block, scale > 0), ([], [], [], []))
                rows[0].append(index)
                rows[1].append(start)
                rows[2].append(length)
                rows[3].append(scale)
        dev = self.params[0].device
        return [
            (block, normalize, torch.tensor(a, dtype=torch.int32, device=dev),
             torch.tensor(b, dtype=torch.int64, device=dev), torch.tensor(c, dtype=torch.int32, device=dev),
             torch.tensor(d, dtype=torch.float32, device=dev))
            for (block, normalize), (a, b, c, d) in sorted(buckets.items())
        ]  # fmt: skip

    def _state(self, p: torch.nn.Parameter) -> dict[str, torch.Tensor]:
        """The parameter's Adam state, created as torch.optim.Adam creates it; moments laid out like p."""
        state = self.optimizer.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        for key in ("exp_avg", "exp_avg_sq"):
            if not _row_aligned(state[key], p):  # e.g. loaded from a checkpoint in another layout
                state[key] = torch.empty_like(p).copy_(state[key])
        return state

    @torch.no_grad()
    def _fused_step(self, betas: list[float], chunks: list[list[int]], ready: Any) -> None:
        group = self.optimizer.param_groups[0]
        beta1, beta2 = group["betas"]
        lr = float(group["lr"])
        emas = [list(e.parameters()) for e in self.ema.emas] if self.ema is not None else []
        table = [[] for _ in range(E0 + len(emas))]
        keep = []  # gradients re-laid out for this step: alive until the kernel has run (stream order)
        steps = []
        for index, p in enumerate(self.params):
            state = self._state(p)
            steps.append(state["step"])
            g = p.grad
            if g is None:  # a parameter that did not take part: a zero gradient, as DDP would give it
                g = torch.zeros_like(p)
                keep.append(g)
            elif not _row_aligned(g, p):
                g = torch.empty_like(p).copy_(g)
                keep.append(g)
            for k, ema_params in enumerate(emas):
                e = ema_params[index]
                if not _row_aligned(e, p):
                    e.data = torch.empty_like(p).copy_(e.data)
                table[E0 + k].append(e.data_ptr())
            table[P].append(p.data_ptr())
            table[G].append(g.data_ptr())
            table[M].append(state["exp_avg"].data_ptr())
            table[V].append(state["exp_avg_sq"].data_ptr())
        torch._foreach_add_(steps, 1)
        step = float(steps[0])
        if any(float(s) != step for s in steps):
            raise RuntimeError("PostStep: the parameters' Adam step counts differ; fused=False handles that")
        dev = self.params[0].device
        bases = torch.tensor(table, dtype=torch.int64)
        bases = bases.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else bases.to(dev)
        w = [1 - b for b in betas] + [0.0] * (MAX_EMAS - len(betas))
        step_size = lr / (1 - beta1**step)
        bias2_sqrt = math.sqrt(1 - beta2**step)
        key = tuple(tuple(chunk) for chunk in chunks)
        if key not in self._row_buckets:
            self._row_buckets[key] = [self._build_rows(chunk) for chunk in chunks]
        for k, buckets in enumerate(self._row_buckets[key]):
            if ready is not None:
                ready.wait(k)  # the stream waits for this chunk's all-reduce; the next chunk's goes on meanwhile
            for block, normalize, row_param, row_offset, row_len, row_scale in buckets:
                sub = min(block, SUB)
                _post_step_rows[(row_param.numel(),)](
                    bases, len(self.params), row_param, row_offset, row_len, row_scale,
                    step_size, bias2_sqrt, beta1, beta2, group["eps"], *w,
                    NUM_EMA=len(emas), NORMALIZE=normalize, BLOCK=block, SUB=sub, num_warps=max(1, min(16, sub // 256)),
                )  # fmt: skip
        if self.ema is not None:  # buffers are not trained; copied as the plain path does
            for ema_net in self.ema.emas:
                for eb, nb in zip(ema_net.buffers(), self.net.buffers()):
                    eb.copy_(nb)
        del keep
