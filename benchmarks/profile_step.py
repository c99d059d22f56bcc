"""Where a training step and a sampling evaluation spend their GPU time; prints JSON.

    python benchmarks/profile_step.py --preset edm2-img512-s --batch 64 --compile

A training step here is what `training_loop` does per optimizer step (forward, EDM2 loss, backward,
non-finite gradients zeroed, Adam, forced weight normalization, two power-function EMAs: accel/post_step.py), set up
by the same speed plan as training (accel.resolve_speed_plan: --kernels, --compile, --grad-sync, --cudnn-benchmark).
Each part is timed with CUDA events, then torch.profiler sums the kernels of a few steps by kind (convolution, matrix
product, attention, generated Triton code, other elementwise, optimizer, copies), so one can see how far the
step is from the matrix-product bound. `--sample` profiles one no-grad network evaluation at the sampling batch.
Under torchrun each process trains on its own batch and `--grad-sync` picks how gradients are averaged (several,
comma-separated, are profiled one after the other in the same processes); rank 0 prints.

    torchrun --standalone --nproc_per_node=2 benchmarks/profile_step.py --preset edm2-img512-s --grad-sync ddp,flat
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import edm2  # noqa: E402
from accel import resolve_speed_plan  # noqa: E402
from benchmarks.common import flops_per_image, matmul_peak_tflops, require_cuda, set_inductor_options  # noqa: E402
from torch_utils import distributed as dist  # noqa: E402
from training.loss import EDM2Loss, reduce_batch_loss  # noqa: E402
from training.phema import PowerFunctionEMA  # noqa: E402

KINDS = [  # first match wins; kernel names are lower-cased
    ("nccl", ("nccl",)),
    ("post_step", ("_post_step_rows",)),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("convolution", ("conv", "dgrad", "wgrad", "fprop", "implicit", "nhwc", "xmma", "cudnn")),
    ("matmul", ("gemm", "cutlass", "nvjet", "sm90_", "ampere_", "cublas", "splitk")),
    ("triton", ("triton",)),
    ("copy", ("memcpy", "memset", "copy")),
    ("elementwise", ("elementwise", "vectorized", "reduce", "unrolled", "index")),
]


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def kernel_table(prof, repeats: int, top: int = 15) -> dict:
    by_kind, by_name, launches = collections.Counter(), collections.Counter(), 0
    for evt in prof.key_averages():
        t = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
        if t <= 0 or evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        by_kind[kernel_kind(evt.key)] += t / repeats / 1e3
        by_name[evt.key[:110]] += t / repeats / 1e3
        launches += evt.count
    total = sum(by_kind.values())
    return dict(
        gpu_ms=round(total, 2),
        kernels_per_step=round(launches / repeats),
        by_kind_ms={k: round(v, 2) for k, v in by_kind.most_common()},
        top_kernels_ms=[[k, round(v, 3)] for k, v in by_name.most_common(top)],
        top_by_kind_ms={  # the kinds whose many small kernels the overall list hides
            kind: [[k, round(v, 3)] for k, v in by_name.most_common() if kernel_kind(k) == kind][:top]
            for kind in ("triton", "matmul", "elementwise", "other")
        },
    )


def cuda_timer():
    events = []

    def mark():
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        events.append(e)

    def spans():
        torch.cuda.synchronize()
        return [a.elapsed_time(b) for a, b in zip(events[:-1], events[1:])]

    return mark, spans


@click.command()
@click.option("--preset", default="edm2-img512-s", show_default=True)
@click.option("--batch", type=int, default=64, show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp16", show_default=True)
@click.option("--compile/--no-compile", "compile_net", default=True, show_default=True)
@click.option("--mode", default=None, help="torch.compile mode (default, max-autotune-no-cudagraphs, ...)")
@click.option("--kernels", type=click.Choice(["fast", "reference"]), default=None,
              help="The speed plan's kernels, as train_edm2.py --kernels  [default: fast on CUDA]")
@click.option("--cudnn-benchmark/--no-cudnn-benchmark", "cudnn_benchmark", default=True, show_default=True)
@click.option("--cudnn-benchmark-limit", "benchmark_limit", type=int, default=None,
              help="cuDNN algorithms tried per shape (torch's default 10; 0 = all)")
@click.option("--sample", is_flag=True, help="Profile a no-grad evaluation (sampling) instead of a training step")
@click.option("--steps", type=int, default=8, show_default=True, help="Timed steps after warm-up")
@click.option("--post-step", "post_step_kind", type=click.Choice(["plan", "fused", "plain"]), default="plan",
              show_default=True, help="The plan's post-step, or the fused / plain one in its place (A/B)")
@click.option("--inductor", multiple=True,
              help="torch._inductor.config KEY=VALUE (JSON or Python literal), e.g. combo_kernels=True")
@click.option("--trace", default=None, help="Write a chrome trace (CPU + CUDA) of one step here (.json.gz)")
@click.option("--grad-sync", "grad_sync", default="flat", show_default=True,
              help="Under torchrun: gradient averaging, ddp | flat; comma-separated to compare")
def main(preset, batch, precision, compile_net, mode, kernels, cudnn_benchmark, benchmark_limit, sample, steps,
         post_step_kind, inductor, trace, grad_sync) -> None:
    require_cuda("profile_step.py")
    try:
        set_inductor_options(inductor)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--inductor'") from None
    dist.init()
    for sync in grad_sync.split(",") if dist.get_world_size() > 1 and not sample else [None]:
        result = profile(preset, batch, precision, compile_net, mode, kernels, cudnn_benchmark, benchmark_limit,
                         sample, steps, post_step_kind, trace, sync)
        result["inductor"] = list(inductor)
        if dist.is_main():
            print(json.dumps(result), flush=True)
        torch.cuda.empty_cache()
    dist.shutdown()


def profile(preset, batch, precision, compile_net, mode, kernels, cudnn_benchmark, benchmark_limit, sample, steps,
            post_step_kind, trace, sync) -> dict:
    dev = dist.device()
    world = dist.get_world_size()
    try:
        plan = resolve_speed_plan(dev, world, compile=compile_net, kernels=kernels, grad_sync=sync,
                                  cudnn_benchmark=cudnn_benchmark)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    if post_step_kind != "plan":
        plan = dataclasses.replace(plan, fused_step=post_step_kind == "fused")
    if benchmark_limit is not None:
        torch.backends.cudnn.benchmark_limit = benchmark_limit
    torch.manual_seed(0)
    net = edm2.Precond(**edm2.preset_network_kwargs(preset, precision=precision)).to(dev)
    if sample:
        net.eval().requires_grad_(False)  # before compiling: freezing needs parameters without gradients
    # Training: the plan as training_loop applies it. Sampling: as prepare_for_sampling, less the CUDA graphs (the
    # profiler then sees each kernel).
    plan.apply(net.train(not sample), weights_channels_last=not sample)
    gflop = flops_per_image(net, train=not sample) / 1e9
    torch.manual_seed(dist.get_rank())  # each process its own batch
    x = torch.randn([batch, net.img_channels, net.img_resolution, net.img_resolution], device=dev)
    labels = torch.randint(0, net.label_dim, [batch], device=dev)
    wrapped, flat = (net, None) if sample else plan.distribute(net, dev, world)
    if not compile_net:
        model = wrapped
    elif sample:
        model = plan.compile_for_sampling(wrapped, cuda_graphs=False) if not mode else torch.compile(wrapped, mode=mode)
    else:
        model = plan.compile_for_training(wrapped) if not mode else torch.compile(wrapped, mode=mode)
    t_compile = time.perf_counter()
    result = dict(preset=preset, batch=batch, precision=precision, compile=compile_net, mode=mode,
                  cudnn_benchmark_limit=torch.backends.cudnn.benchmark_limit, sample=sample,
                  gflop_per_img=round(gflop, 1), gpus=world, plan=dataclasses.asdict(plan))

    if sample:
        sigma = torch.full([batch], 2.5, device=dev)

        def work():
            with torch.no_grad():
                model(x, sigma, labels)

        names = ["eval"]
    else:
        optimizer = plan.adam(net, lr=1e-4, betas=(0.9, 0.99), eps=1e-8)
        ema = PowerFunctionEMA(net, [0.05, 0.10])
        post_step = plan.post_step(net, optimizer, ema)
        loss_fn = EDM2Loss()
        nimg = [100 * batch]

        def work(mark=lambda: None):
            optimizer.zero_grad(set_to_none=True)
            mark()
            loss = loss_fn(model, x, labels)
            reduce_batch_loss(loss, batch).backward()  # with DDP this includes the all-reduces
            if flat is not None:
                flat.start_average()  # overlaps the post-step, chunk by chunk
            mark()
            nimg[0] += batch
            post_step(nimg[0], batch, ready=flat)  # nan_to_num + Adam + forced WN + 2 EMAs
            mark()

        names = ["forward_backward", "post_step"]  # with flat, the all-reduces count in the post-step

    for _ in range(3):
        work()
    torch.cuda.synchronize()
    result["warmup_s"] = round(time.perf_counter() - t_compile, 1)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        work()
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - t0) / steps * 1e3
    result.update(step_ms=round(step_ms, 2), img_per_s=round(batch / step_ms * 1e3, 1),
                  peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
    if not sample:
        parts = collections.Counter()
        for _ in range(steps):
            mark, spans = cuda_timer()
            work(mark)
            for n, t in zip(names, spans()):
                parts[n] += t / steps
        result["parts_ms"] = {n: round(parts[n], 2) for n in names}
    peak = matmul_peak_tflops()  # per GPU, as are the figures around it
    tflops = gflop * batch / step_ms  # GFLOP/ms = TFLOP/s
    result.update(tflop_per_s=round(tflops, 1), matmul_peak=round(peak, 1), fraction_of_peak=round(tflops / peak, 3))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            work()
        torch.cuda.synchronize()
    result.update(kernel_table(prof, 3))
    result["gpu_idle_ms"] = round(result["step_ms"] - result["gpu_ms"], 2)  # launch gaps and host waits
    if trace and dist.is_main():
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
            work()
            torch.cuda.synchronize()
        prof.export_chrome_trace(trace.removesuffix(".gz"))
        if trace.endswith(".gz"):
            import gzip
            import shutil

            with open(trace.removesuffix(".gz"), "rb") as f, gzip.open(trace, "wb") as g:
                shutil.copyfileobj(f, g)
            os.remove(trace.removesuffix(".gz"))
    return result


if __name__ == "__main__":
    main()
