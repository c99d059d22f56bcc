"""The floor under a training step and a sampling evaluation: every matrix-heavy operation of the network
(convolutions, linear layers, attention), timed alone at its real shape, fprop / dgrad / wgrad; prints JSON.

    python benchmarks/conv_ceiling.py --preset edm2-img512-s --batch 64 --precision fp16

A forward pass records each MPConv call's input and weight shape and each attention call's shape; each
distinct shape is then timed in isolation (cuDNN autotuned, channels-last, CUDA events, median of repeats),
and the times are summed with their multiplicities. The sum is what the step would cost if every
elementwise operation were free: the measured step time over this sum is the overhead left to remove, and
FLOPs over this sum is the best TFLOP/s these kernels allow. For sampling it also gives the least time of the
elementwise work between the convolutions (`elementwise_bytes` at the measured copy bandwidth): with the
convolutions as library calls, a forward pass cannot take less than the two floors together; likewise a training
step, whose elementwise floor adds the backward's and the post-step's traffic.
"""

from __future__ import annotations

import collections
import json
import math
import os
import sys

import click
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import edm2  # noqa: E402
from benchmarks.common import matmul_peak_tflops  # noqa: E402
from benchmarks.common import require_cuda  # noqa: E402
from accel import resolve_speed_plan  # noqa: E402
from networks import mp  # noqa: E402


def record_shapes(net: torch.nn.Module, batch: int) -> tuple[collections.Counter, collections.Counter]:
    """Multiplicities of (input shape, weight shape) per MPConv call and of (N, heads, tokens, head dim) per
    attention."""
    convs, attns = collections.Counter(), collections.Counter()
    hooks = [
        m.register_forward_hook(lambda m, args, out: convs.update([(tuple(args[0].shape), tuple(m.weight.shape))]))
        for m in net.modules()
        if isinstance(m, mp.MPConv)
    ]
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        attns.update([tuple(q.shape)])
        return sdpa(q, k, v, *a, **kw)

    F.scaled_dot_product_attention = spy
    try:
        dev = next(net.parameters()).device
        x = torch.randn([batch, net.img_channels, net.img_resolution, net.img_resolution], device=dev)
        labels = torch.randint(0, net.label_dim, [batch], device=dev) if net.label_dim else None
        with torch.no_grad():
            net(x, torch.ones([batch], device=dev), labels)
    finally:
        F.scaled_dot_product_attention = sdpa
        for h in hooks:
            h.remove()
    return convs, attns


def elementwise_bytes(convs: collections.Counter, attns: collections.Counter, elem_size: int) -> int:
    """The least memory traffic of the elementwise work of one forward pass: every convolution's input is written
    once by the elementwise kernel before it, which reads the previous convolution's output once (and so for
    attention's q, k, v and output). Residual and skip reads come on top, so this is a lower bound for any
    elementwise work that stays outside the convolutions."""
    total = 0
    for (xs, ws), count in convs.items():
        if len(xs) == 4:  # [N, C, H, W] in, [N, O, H, W] out (same-padding convolutions)
            total += count * (math.prod(xs) + xs[0] * ws[0] * xs[2] * xs[3])
    total += sum(count * 4 * math.prod(shape) for shape, count in attns.items())
    return total * elem_size


def copy_bandwidth_gb_per_s(size_bytes: int = 2**30) -> float:
    """Device memory bandwidth as a large copy achieves it (bytes read + written per second)."""
    a = torch.empty(size_bytes // 2, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    return 2 * size_bytes / (time_ms(lambda: b.copy_(a)) / 1e3) / 1e9


def time_ms(fn, repeats: int = 10, calls: int = 10) -> float:
    """Milliseconds of one call: the median over `repeats` of `calls` calls back to back between two events, so that
    the launch gap between calls (which a compiled graph or a CUDA graph does not have) is not counted as the
    kernel's time."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(calls):
            fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / calls)
    return sorted(times)[len(times) // 2]


def conv_parts(xs: tuple, ws: tuple, dtype: torch.dtype) -> dict[str, tuple[float, float]]:
    """(ms, GFLOP) of fprop, dgrad and wgrad of one call."""
    dev = torch.device("cuda")
    if len(ws) == 2:  # linear: [N, in] x [in, out]
        x = torch.randn(xs, device=dev, dtype=dtype)
        w = torch.randn(ws, device=dev, dtype=dtype)
        g = torch.randn([xs[0], ws[0]], device=dev, dtype=dtype)
        flop = 2 * xs[0] * ws[0] * ws[1] / 1e9
        return dict(fprop=(time_ms(lambda: x @ w.t()), flop), dgrad=(time_ms(lambda: g @ w), flop),
                    wgrad=(time_ms(lambda: g.t() @ x), flop))
    cl = torch.channels_last
    x = torch.randn(xs, device=dev, dtype=dtype).contiguous(memory_format=cl)
    w = torch.randn(ws, device=dev, dtype=dtype).contiguous(memory_format=cl)
    pad = ws[-1] // 2
    y = F.conv2d(x, w, padding=pad)
    g = torch.randn_like(y).contiguous(memory_format=cl)
    flop = 2 * y.numel() * ws[1] * ws[2] * ws[3] / 1e9
    args = (g, x, w, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], 1)
    bwd = torch.ops.aten.convolution_backward
    return dict(
        fprop=(time_ms(lambda: F.conv2d(x, w, padding=pad)), flop),
        dgrad=(time_ms(lambda: bwd(*args, [True, False, False])), flop),
        wgrad=(time_ms(lambda: bwd(*args, [False, True, False])), flop),
    )


def attn_parts(shape: tuple, dtype: torch.dtype) -> dict[str, tuple[float, float]]:
    q, k, v = (torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    n, h, t, d = shape
    flop = 4 * n * h * t * t * d / 1e9
    o = F.scaled_dot_product_attention(q, k, v)
    go = torch.randn_like(o)
    fwd = time_ms(lambda: F.scaled_dot_product_attention(q, k, v))

    def fb():
        torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), (q, k, v), go)

    return dict(fprop=(fwd, flop), backward=(max(time_ms(fb) - fwd, 0.0), 2.5 * flop))


@click.command()
@click.option("--preset", default="edm2-img512-s", show_default=True)
@click.option("--batch", type=int, default=64, show_default=True)
@click.option("--precision", type=click.Choice(["fp16", "bf16"]), default="fp16", show_default=True)
@click.option("--top", type=int, default=12, show_default=True, help="Shapes listed, costliest first")
@click.option("--benchmark-limit", type=int, default=None,
              help="cuDNN algorithms tried per shape (torch's default 10; 0 = all)")
def main(preset: str, batch: int, precision: str, top: int, benchmark_limit: int | None) -> None:
    require_cuda("conv_ceiling.py")
    torch.backends.cudnn.benchmark = True
    if benchmark_limit is not None:
        torch.backends.cudnn.benchmark_limit = benchmark_limit
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    torch.manual_seed(0)
    net = edm2.Precond(**edm2.preset_network_kwargs(preset, precision=precision)).cuda().eval()
    resolve_speed_plan(torch.device("cuda")).apply(net)  # fused (SDPA) attention, channels-last, as training runs
    convs, attns = record_shapes(net, batch)
    num_params = sum(p.numel() for p in net.parameters())
    del net
    totals = collections.Counter()
    flops = collections.Counter()
    rows = []
    for (xs, ws), count in convs.items():
        for part, (ms, gf) in conv_parts(xs, ws, dtype).items():
            totals[part] += ms * count
            flops[part] += gf * count
            rows.append(dict(op="linear" if len(ws) == 2 else "conv", x=list(xs), w=list(ws), part=part, count=count,
                             ms=round(ms, 4), tflop_per_s=round(gf / ms, 1)))
    for shape, count in attns.items():
        for part, (ms, gf) in attn_parts(shape, dtype).items():
            key = "attn_" + part
            totals[key] += ms * count
            flops[key] += gf * count
            rows.append(dict(op="attention", q=list(shape), part=part, count=count, ms=round(ms, 4),
                             tflop_per_s=round(gf / max(ms, 1e-9), 1)))
    rows.sort(key=lambda r: -r["ms"] * r["count"])
    fwd = totals["fprop"] + totals["attn_fprop"]
    train = sum(totals.values())
    peak = matmul_peak_tflops()
    traffic = elementwise_bytes(convs, attns, torch.finfo(dtype).bits // 8)
    bandwidth = copy_bandwidth_gb_per_s()
    elementwise_ms = traffic / bandwidth / 1e6
    # Training: the backward's elementwise work moves at least as much again (each gradient of a convolution's input
    # read once, each gradient of its output written once), and the post-step reads the float32 weight, gradient,
    # Adam's two moments and the two EMAs and writes all but the gradient: 11 x 4 bytes per parameter.
    step_traffic = 2 * traffic + 11 * 4 * num_params
    step_elementwise_ms = step_traffic / bandwidth / 1e6
    print(json.dumps(dict(
        benchmark="conv_ceiling", preset=preset, batch=batch, precision=precision,
        matmul_peak_tflop_per_s=round(peak, 1),
        cudnn_benchmark_limit=torch.backends.cudnn.benchmark_limit,
        parts_ms={k: round(v, 2) for k, v in totals.items()},
        parts_tflop_per_s={k: round(flops[k] / totals[k], 1) for k in totals if totals[k] > 0},
        forward_floor_ms=round(fwd, 2), train_floor_ms=round(train, 2),
        sampling_img_per_s_bound_63_evals=round(batch / (fwd * 63 / 1e3), 1),
        elementwise_gb_per_forward=round(traffic / 1e9, 2), copy_bandwidth_gb_per_s=round(bandwidth, 1),
        elementwise_floor_ms=round(elementwise_ms, 2),
        sampling_img_per_s_bound_with_elementwise=round(batch / ((fwd + elementwise_ms) * 63 / 1e3), 1),
        training_elementwise_floor_ms=round(step_elementwise_ms, 2),
        training_img_per_s_bound_with_elementwise=round(batch / (train + step_elementwise_ms) * 1e3, 1),
        training_img_per_s_bound=round(batch / train * 1e3, 1),
        costliest=rows[:top], device=torch.cuda.get_device_name(), torch=torch.__version__,
    )))


if __name__ == "__main__":
    main()
