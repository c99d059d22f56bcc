"""The post-step alone (accel/post_step.py: non-finite guard, Adam, forced weight normalization, EMA updates)
on a preset's parameters laid out as training lays them out (the CUDA speed plan), fused kernel against the separate
library calls; prints JSON.

    python benchmarks/bench_post_step.py --preset edm2-img512-s

The memory floor is the bytes the fused kernel must move (4 + k reads and 3 + k writes of 4 bytes per
parameter, k EMAs) at the device-to-device copy bandwidth measured in the same run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import accel.post_step  # noqa: E402
from benchmarks.common import require_cuda  # noqa: E402
import edm2  # noqa: E402
from accel import resolve_speed_plan  # noqa: E402
from training.phema import PowerFunctionEMA  # noqa: E402


def time_ms(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def copy_bandwidth_gb_s(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy rate (read + write bytes per second) on a 2 GiB buffer."""
    a = torch.empty(nbytes // 4, device="cuda")
    b = torch.empty_like(a)
    return 2 * nbytes / time_ms(lambda: b.copy_(a), 10) / 1e6


@click.command()
@click.option("--preset", default="edm2-img512-s", show_default=True)
@click.option("--emas", type=int, default=2, show_default=True, help="EMA copies (the presets keep 2)")
@click.option("--repeats", type=int, default=20, show_default=True)
@click.option("--sub", default=str(accel.post_step.SUB), show_default=True,
              help="Elements per chunk of the fused kernel; a comma-separated list times each")
def main(preset: str, emas: int, repeats: int, sub: str) -> None:
    require_cuda("bench_post_step.py")
    dev = torch.device("cuda")
    plan = resolve_speed_plan(dev)
    torch.manual_seed(0)
    net = plan.apply(edm2.Precond(**edm2.preset_network_kwargs(preset)).to(dev).train())  # weights as training has them
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    n_params = sum(p.numel() for p in net.parameters())
    result = dict(benchmark="post_step", preset=preset, params_m=round(n_params / 1e6, 1), emas=emas,
                  channels_last=plan.channels_last)
    subs = [int(s) for s in sub.split(",")]
    for fused, chunk in [(False, None)] + [(True, s) for s in subs]:
        accel.post_step.SUB = chunk or accel.post_step.SUB
        variant = dataclasses.replace(plan, fused_step=fused)
        opt = variant.adam(net, lr=1e-4, betas=(0.9, 0.99), eps=1e-8)
        ema = PowerFunctionEMA(net, [0.05 + 0.05 * k for k in range(emas)])
        post = variant.post_step(net, opt, ema)
        nimg = iter(range(64, 1 << 40, 64))
        ms = round(time_ms(lambda: post(next(nimg), 64), repeats), 3)
        result.update({"plain_ms": ms} if not fused else {f"fused_ms_sub{chunk}": ms})
    best = min(subs, key=lambda s: result[f"fused_ms_sub{s}"])
    result.update(fused_ms=result[f"fused_ms_sub{best}"], best_sub=best)
    bandwidth = copy_bandwidth_gb_s()
    floor_ms = n_params * 4 * (7 + 2 * emas) / bandwidth / 1e6
    result.update(copy_gb_s=round(bandwidth, 1), floor_ms=round(floor_ms, 3),
                  fused_fraction_of_floor=round(floor_ms / result["fused_ms"], 3), device=torch.cuda.get_device_name())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
