"""Training throughput of the real training loop (train_edm2's) on random latents; prints JSON.

    python benchmarks/bench_train.py --preset edm2-img512-xs --batch-gpu 64 --steps 60
    torchrun --standalone --nproc_per_node=2 benchmarks/bench_train.py --preset edm2-img512-s --batch-gpu 64

Random raw latents (8 x 64 x 64, like `dataset_tool.py encode` output) in an uncompressed zip; the loop
runs exactly as in training (data loading, loss, backward, Adam, forced weight normalization, two EMAs),
status every `--interval` steps; the first interval is warm-up and is left out of the figure.
"""

from __future__ import annotations

import json
import os
import sys
import shutil
import tempfile

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import edm2  # noqa: E402
from torch_utils import distributed as dist  # noqa: E402
from training.encoders import STABILITY_VAE_DEFAULTS  # noqa: E402
from training.config import LossConfig, LrConfig, TrainingConfig  # noqa: E402
from accel import resolve_speed_plan  # noqa: E402
from training.training_loop import build_dataset_and_net, speed_plan, training_loop  # noqa: E402

from benchmarks.common import flops_per_image, matmul_peak_tflops, random_latent_zip  # noqa: E402


@click.command()
@click.option("--preset", default="edm2-img512-xs", show_default=True)
@click.option("--batch-gpu", "batch_gpu", type=int, default=64, show_default=True)
@click.option("--steps", type=int, default=60, show_default=True)
@click.option("--interval", type=int, default=10, show_default=True, help="Steps per status interval")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp16", show_default=True)
@click.option("--workers", type=int, default=4, show_default=True)
@click.option("--compile/--no-compile", "compile_net", default=None,
              help="[default: on with CUDA, as train_edm2.py for runs of 2000 steps or more]")
@click.option("--kernels", type=click.Choice(["fast", "reference"]), default=None,
              help="Triton kernels, channels-last, fused attention (fast) or plain PyTorch [default: fast with CUDA]")
@click.option("--grad-sync", "grad_sync", type=click.Choice(["ddp", "flat"]), default=None,
              help="Several GPUs: gradient averaging [default: flat when compiled, else ddp]")
@click.option("--sync-debug", "sync_debug", is_flag=True,
              help="Warn where the loop waits for the GPU (EDM2_SYNC_DEBUG=1)")
@click.option("--cudnn-benchmark-limit", "benchmark_limit", type=int, default=None,
              help="cuDNN algorithms tried per shape (torch's default 10; 0 = all)")
def main(preset: str, batch_gpu: int, steps: int, interval: int, precision: str, workers: int,
         compile_net: bool | None, kernels: str | None, grad_sync: str | None, sync_debug: bool,
         benchmark_limit: int | None) -> None:
    if sync_debug:
        os.environ["EDM2_SYNC_DEBUG"] = "1"
    if benchmark_limit is not None:
        torch.backends.cudnn.benchmark_limit = benchmark_limit
    dist.init()
    world = dist.get_world_size()
    if compile_net is None:  # what a long run gets on this device (train_edm2.py leaves short runs uncompiled)
        compile_net = resolve_speed_plan(dist.device()).compile
    batch = batch_gpu * world
    tmp = dist.all_gather_objects(tempfile.mkdtemp(prefix="bench_train_") if dist.is_main() else None)[0]  # rank 0's
    data = os.path.join(tmp, "latents.zip")
    if dist.is_main():
        random_latent_zip(data, 512, 64, 1000)
    dist.barrier()
    t = edm2.preset_training_kwargs(preset)
    c = TrainingConfig(
        data=data, encoder=dict(STABILITY_VAE_DEFAULTS, **{"class": "stability_vae"}),
        network=edm2.preset_network_kwargs(preset, precision=precision), loss=LossConfig(**t["loss"]),
        lr=LrConfig(**t["lr"]), duration=batch * steps, batch=batch, batch_gpu=batch_gpu, status=batch * interval,
        snapshot=0, checkpoint=0, workers=workers, compile=compile_net, kernels=kernels, grad_sync=grad_sync,
    )
    run_dir = os.path.join(tmp, "run")
    try:
        # Counted before training, so that the JSON line follows the last status line at once (a run stopped by a
        # time limit just after it still reports).
        plan = speed_plan(c, dist.device(), world)
        flops = peak = None
        if dist.is_main():
            _, _, net = build_dataset_and_net(c)
            flops = flops_per_image(net.to(dist.device()).train(), train=True)
            del net
            peak = matmul_peak_tflops()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        training_loop(run_dir, c)
        if dist.is_main():
            stats = [json.loads(line) for line in open(os.path.join(run_dir, "stats.jsonl"))]
            steady = stats[1:] or stats
            img_s = sum(s["img_per_s"] for s in steady) / len(steady)
            print(json.dumps(dict(
                benchmark="train", preset=preset, precision=precision, gpus=world, batch_gpu=batch_gpu, batch=batch,
                steps=steps, compile=plan.compile, kernels=kernels,
                grad_sync=plan.grad_sync if world > 1 else None,
                cudnn_benchmark_limit=torch.backends.cudnn.benchmark_limit, img_per_s=round(img_s, 1),
                img_per_s_per_gpu=round(img_s / world, 1), gflop_per_img=round(flops / 1e9, 1),
                tflop_per_s=round(flops * img_s / 1e12, 1),
                matmul_peak_tflop_per_s=None if peak is None else round(peak, 1),
                fraction_of_peak=None if peak is None else round(flops * img_s / world / 1e12 / peak, 3),
                peak_mem_gib=round(max(s.get("peak_mem_gib", 0) for s in steady), 2),
                first_interval_peak_mem_gib=round(stats[0].get("peak_mem_gib", 0), 2), final_loss=stats[-1]["loss"],
                device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", torch=torch.__version__,
            )))
    finally:  # the run directory holds checkpoints of gigabytes (Adam state): never leave them in /tmp
        dist.barrier()
        if dist.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
    dist.shutdown()


if __name__ == "__main__":
    main()
