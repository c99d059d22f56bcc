"""Sampling throughput of the EDM Heun sampler on a preset-sized network (random weights); prints JSON.

    python benchmarks/bench_sample.py --preset edm2-img512-s --batch 64 --steps 32 [--guidance 1.4]
"""

from __future__ import annotations

import json
import os
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import edm2  # noqa: E402
from benchmarks.common import flops_per_image, matmul_peak_tflops, set_inductor_options  # noqa: E402
from edm2.sampler import SamplerStats, edm_sampler  # noqa: E402


@click.command()
@click.option("--preset", default="edm2-img512-s", show_default=True)
@click.option("--batch", type=int, default=64, show_default=True)
@click.option("--steps", type=int, default=32, show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp16", show_default=True)
@click.option("--guidance", type=float, default=1.0, show_default=True,
              help="!= 1: guide with a second network of the same size")
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option("--kernels", type=click.Choice(["fast", "reference"]), default=None,
              help="The speed plan's kernels, as generate.py --kernels  [default: fast on CUDA]")
@click.option("--channels-last/--no-channels-last", "channels_last", default=None,
              help="[default: with the fast kernels on CUDA]")
@click.option("--compile/--no-compile", "compile_net", default=None,
              help="[default: on with CUDA and fast kernels]")
@click.option("--cuda-graphs/--no-cuda-graphs", "cuda_graphs", default=None, help="[default: with --compile on CUDA]")
@click.option("--gnet-preset", default=None, help="Guiding network's preset [default: --preset]")
@click.option("--freezing/--no-freezing", "freezing", default=None,
              help="Weights as compile-time constants [default: with --compile on CUDA]")
@click.option("--inductor", "inductor", multiple=True, metavar="KEY=VALUE",
              help="A torch._inductor.config setting to try, e.g. conv_1x1_as_mm=true (repeatable)")
def main(preset: str, batch: int, steps: int, precision: str, guidance: float, repeats: int, kernels: str | None,
         channels_last: bool | None, compile_net: bool | None, cuda_graphs: bool | None, gnet_preset: str | None,
         freezing: bool | None, inductor: tuple[str, ...]) -> None:
    try:
        inductor_options = set_inductor_options(inductor)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--inductor'") from None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    net = edm2.Precond(**edm2.preset_network_kwargs(preset, precision=precision)).to(device)
    gnet = None
    if guidance != 1:
        gnet = edm2.Precond(**edm2.preset_network_kwargs(gnet_preset or preset, precision=precision)).to(device)
    flops = flops_per_image(net.eval(), train=False)
    gflop_g = flops_per_image(gnet.eval(), train=False) if gnet is not None else 0.0
    prep = dict(compile=compile_net, channels_last=channels_last, cuda_graphs=cuda_graphs, freezing=freezing,
                reference=kernels == "reference")
    net = edm2.prepare_for_sampling(net, **prep)  # as generate.py does
    gnet = edm2.prepare_for_sampling(gnet, **prep) if gnet is not None else None
    noise = torch.randn([batch, net.img_channels, net.img_resolution, net.img_resolution], device=device)
    labels = torch.randint(0, net.label_dim, [batch], device=device) if net.label_dim else None
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            stats = SamplerStats()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            edm_sampler(net, noise, labels, gnet=gnet, guidance=guidance, num_steps=steps, stats=stats)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i > 0:  # the first run warms up
                times.append(time.perf_counter() - t0)
    best = min(times)
    evals = stats.net_evals + stats.gnet_evals
    peak = matmul_peak_tflops()
    tflops = (flops * stats.net_evals + gflop_g * stats.gnet_evals) * batch / best / 1e12
    print(json.dumps(dict(
        kernels=kernels, channels_last=channels_last, compile=hasattr(net, "_orig_mod"), cuda_graphs=cuda_graphs,
        gnet_preset=gnet_preset if gnet is not None else None,
        freezing=freezing, inductor=inductor_options or None,
        gflop_per_eval_per_img=round(flops / 1e9, 1), evals_per_s=round(evals * batch / best, 1),
        tflop_per_s=round(tflops, 1), matmul_peak_tflop_per_s=None if peak is None else round(peak, 1),
        fraction_of_peak=None if peak is None else round(tflops / peak, 3),
        benchmark="sample", preset=preset, precision=precision, batch=batch, steps=steps, guidance=guidance,
        net_evals=stats.net_evals, gnet_evals=stats.gnet_evals, seconds=round(best, 3),
        img_per_s=round(batch / best, 2),
        peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
    )))


if __name__ == "__main__":
    main()
