"""The solvers of edm2.solvers on a preset-sized network (random weights): sampling throughput per solver and,
first, a parity check that `heun` reproduces edm_sampler bit for bit on this device; prints JSON.

    python benchmarks/bench_solvers.py --preset edm2-img512-s --batch 64 --runs heun:32,dpmpp_2m:16,euler:32

Parity: the same network (and a guiding network of the same preset, other weights), per-seed noise on the
compute device as generate.py draws it, float32 and float64 state, with and without churn, guidance and a
guidance interval; `parity_max_abs_diff` gives the largest difference of each case (0.0 = identical). The
scalar gains, 0 at initialization, get random values so that the network's output is not trivial.
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
from edm2 import schedules, solvers  # noqa: E402
from edm2.sampler import SamplerStats, edm_sampler  # noqa: E402

PARITY_CASES = {
    "plain": {},
    "guided": {"guidance": 1.7},
    "interval_churn": {"guidance": 2.0, "guidance_interval": (0.3, 5.0), "S_churn": 10, "S_min": 0.05, "S_max": 20},
}


def parse_runs(text: str) -> list[tuple[str, int, dict[str, float]]]:
    """NAME:STEPS[:ETA] items, e.g. heun:32,dpmpp_3m_sde:32:0 (eta 0: the 3M ODE solver)."""
    runs = []
    for item in text.split(","):
        name, _, rest = item.strip().partition(":")
        steps, _, eta = rest.partition(":")
        solvers.get_solver(name)
        if not steps.isdigit() or int(steps) < solvers.SOLVERS[name].min_steps:
            minimum = solvers.SOLVERS[name].min_steps
            raise click.BadParameter(f"{item!r}: expected NAME:STEPS[:ETA] with STEPS >= {minimum}")
        try:
            options = {"eta": float(eta)} if eta else {}
        except ValueError:
            raise click.BadParameter(f"{item!r}: ETA must be a number") from None
        runs.append((name, int(steps), options))
    return runs


def parity(net, gnet, device, seeds: list[int], steps: int) -> dict[str, float]:
    shape = [net.img_channels, net.img_resolution, net.img_resolution]
    out = {}
    for dtype in (torch.float32, torch.float64):
        for case, kwargs in PARITY_CASES.items():
            guide = gnet if "guidance" in kwargs else None
            noise, labels, gens = edm2.seed_noise_and_labels(seeds, shape, net.label_dim, None, device)
            old = edm_sampler(net, noise, labels, gnet=guide, num_steps=steps, dtype=dtype,
                              randn_like=gens.randn_like, **kwargs)
            noise, labels, gens = edm2.seed_noise_and_labels(seeds, shape, net.label_dim, None, device)
            den = edm2.GuidedDenoiser.from_networks(net, labels, guide, kwargs.get("guidance", 1),
                                                    kwargs.get("guidance_interval"))
            sigmas = schedules.karras(steps, dtype=dtype, device=device)
            churn = {k: v for k, v in kwargs.items() if k.startswith("S_")}
            new = solvers.sample("heun", den, noise.to(dtype) * sigmas[0], sigmas, dtype=dtype,
                                 noise=solvers.seed_noise(gens), **churn).to(torch.float32)
            out[f"{case}_{str(dtype).removeprefix('torch.')}"] = float((new - old).abs().max())
    return out


@click.command()
@click.option("--preset", default="edm2-img512-s", show_default=True)
@click.option("--batch", type=int, default=64, show_default=True)
@click.option("--runs", default="heun:32,euler:32,euler_ancestral:32,dpmpp_2m:32,dpmpp_2m_sde:32,dpmpp_3m_sde:32",
              show_default=True, help="NAME:STEPS[:ETA] items")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp16", show_default=True)
@click.option("--guidance", type=float, default=1.0, show_default=True, help="!= 1: guide with a second network")
@click.option("--dtype", "state_dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True,
              help="the solver state (generate.py: float32)")
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option("--compile/--no-compile", "compile_net", default=False, show_default=True)
def main(preset: str, batch: int, runs: str, precision: str, guidance: float, state_dtype: str, repeats: int,
         compile_net: bool) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, state_dtype)
    todo = parse_runs(runs)
    torch.manual_seed(0)
    net, gnet = (edm2.Precond(**edm2.preset_network_kwargs(preset, precision=precision)) for _ in range(2))
    with torch.no_grad():
        for p in [*net.parameters(), *gnet.parameters()]:
            if p.ndim == 0:  # gains start at 0 (the network would output nothing): give them random values
                p.uniform_(0.5, 1.5)
    prep = dict(compile=False)  # parity uncompiled; --compile compiles afterwards
    net, gnet = edm2.prepare_for_sampling(net.to(device), **prep), edm2.prepare_for_sampling(gnet.to(device), **prep)
    with torch.no_grad():
        result = {"benchmark": "solvers", "parity_max_abs_diff": parity(net, gnet, device, [0, 1, 2, 2**32 + 3], 6)}
    if compile_net:
        net, gnet = edm2.prepare_for_sampling(net, compile=True), edm2.prepare_for_sampling(gnet, compile=True)
    shape = [net.img_channels, net.img_resolution, net.img_resolution]
    rows = []
    with torch.no_grad():
        noise, labels, gens = edm2.seed_noise_and_labels(range(batch), shape, net.label_dim, None, device)
        for name, steps, options in todo:
            sigmas = schedules.karras(steps, dtype=dtype, device=device)
            times = []
            for i in range(repeats + 1):
                stats = SamplerStats()
                den = edm2.GuidedDenoiser.from_networks(net, labels, gnet if guidance != 1 else None, guidance,
                                                        stats=stats)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                solvers.sample(name, den, noise.to(dtype) * sigmas[0], sigmas, dtype=dtype,
                               noise=solvers.seed_noise(gens), **options)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i > 0:  # the first run warms up
                    times.append(time.perf_counter() - t0)
            best = min(times)
            rows.append(dict(solver=name, steps=steps, **options, net_evals=stats.net_evals,
                             gnet_evals=stats.gnet_evals,
                             seconds=round(best, 3), img_per_s=round(batch / best, 2)))
    result.update(preset=preset, batch=batch, precision=precision, guidance=guidance, dtype=state_dtype,
                  compile=compile_net, runs=rows, torch=torch.__version__,
                  device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
