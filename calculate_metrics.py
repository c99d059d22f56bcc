"""FID and FD_DINOv2: reference statistics, image folders and models (docs/design.md §8). Works alone or under torchrun.

Examples:

    # 1. reference statistics of the training images (all images; both metrics); a .pkl --dest writes the
    #    official layout, which the official calculate_metrics.py reads as well
    python calculate_metrics.py ref --data img512.zip --dest img512-ref.npz

    # 2. metrics of 50,000 generated PNGs in a folder or zip
    python calculate_metrics.py calc --images fid-images --ref img512-ref.npz

    # 3. metrics of a model, generating on the fly (nothing written to disk), on 8 GPUs
    torchrun --standalone --nproc_per_node=8 calculate_metrics.py gen --preset edm2-img512-s-fid --ref img512-ref.npz

Detector weights (first match wins): --inception-weights / --dinov2-weights (file or URL), the environment
variables EDM2_INCEPTION_WEIGHTS / EDM2_DINOV2_WEIGHTS, else the public files, downloaded once into
$EDM2_CACHE_DIR (default ~/.cache/edm2): pt_inception-2015-12-05-6726825d.pth (pytorch-fid release
fid_weights) and dinov2_vitl14_pretrain.pth (dl.fbaipublicfiles.com).
"""

from __future__ import annotations

import json

import click

from edm2 import metrics as M
from edm2.cli import (
    check_output_path, check_speed_options, load_option, model_click_options, out_of_memory_names, prepare_option,
    resolve_model_options, sampling_settings_from_cli, seeds_option, solver_click_options, speed_click_options,
    writing_names,
)
from edm2.detectors import METRICS, DetectorWeightsError
from edm2.generation import prepare_encoder
from edm2.model_files import ModelFileError
from torch_utils import distributed as dist
from torch_utils.state_io import atomic_write_bytes
from training.encoders import VAELoadError


def _metrics_option(ctx, param, value):
    if value is None:
        return None
    try:
        return M._metric_list(value, METRICS)
    except M.MetricsError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from None


def common_options(f):
    """Options every subcommand takes."""
    options = [
        click.option(
            "--metrics",
            callback=_metrics_option,
            metavar="LIST",
            help=f"Comma-separated subset of {','.join(METRICS)}  [default: ref: all; calc/gen: those in --ref]",
        ),
        click.option(
            "--batch",
            "batch_size",
            type=click.IntRange(min=1),
            default=64,
            show_default=True,
            help="Images per batch and process",
        ),
        click.option(
            "--inception-weights",
            metavar="PATH|URL",
            help="FID Inception weights  [default: $EDM2_INCEPTION_WEIGHTS, else download]",
        ),
        click.option(
            "--dinov2-weights",
            metavar="PATH|URL",
            help="DINOv2 ViT-L/14 weights  [default: $EDM2_DINOV2_WEIGHTS, else download]",
        ),
        click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _weights(inception_weights, dinov2_weights) -> dict:
    return {"fid": inception_weights, "fd_dinov2": dinov2_weights}


def _report(results: dict[str, float], num_images: int, out: str | None) -> None:
    """Print the metrics (rank 0) and write them as JSON when asked."""
    if not dist.is_main():
        return
    for metric, value in results.items():
        click.echo(f"{metric:<10s} {value:.4f}   ({num_images} images)")
    if out is not None:
        data = json.dumps({"results": results, "num_images": num_images}, indent=2).encode()
        with writing_names("--out", out):
            atomic_write_bytes(out, data)


def _run(task):
    """Run task() inside the process group, turning input errors into click errors (rank-0 messages)."""
    dist.init()
    try:
        with out_of_memory_names("--batch", "images per batch and process, which does not change the results"):
            return task()
    except (M.MetricsError, DetectorWeightsError, ModelFileError) as e:
        raise click.ClickException(str(e)) from None
    finally:
        dist.shutdown()


@click.group()
def main():
    """Calculate FID and FD_DINOv2 (docs/design.md §8): `ref` makes reference statistics, `calc` scores images,
    `gen` a model.

    Runs on CUDA when available (one GPU per process under torchrun), else on the CPU; the detectors run in
    float32 and the statistics are summed in float64."""


@main.command()
@click.option(
    "--data", required=True, metavar="PATH", type=click.Path(exists=True), help="Dataset: folder or zip of PNGs"
)
@click.option(
    "--dest",
    required=True,
    metavar="FILE.npz|FILE.pkl",
    type=click.Path(dir_okay=False),
    help="Where to write the statistics: .npz (this project's, with metadata) or .pkl (the official layout, "
    "which the official calculate_metrics.py reads too)",
)
@click.option(
    "--num",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Images to use (0 = all); fewer than the dataset: the official tool's seeded choice",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed of that choice (official --seed)")
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True, help="PNG decoding processes")
@common_options
def ref(data, dest, num, seed, workers, metrics, batch_size, inception_weights, dinov2_weights, progress):
    """Reference statistics (mean, covariance per metric) of a dataset, written as .npz or .pkl (official)."""
    if not dest.endswith((".npz", ".pkl")):
        raise click.BadParameter(f"{dest!r} must end in .npz or .pkl", param_hint="'--dest'")
    check_output_path("--dest", dest)

    def task():
        stats = M.dataset_statistics(
            data,
            metrics,
            num=num or None,
            seed=seed,
            batch_size=batch_size,
            weights=_weights(inception_weights, dinov2_weights),
            workers=workers,
            progress=progress,
        )
        if dist.is_main():
            with writing_names("--dest", dest):
                M.save_reference(dest, stats, source=str(data))
            n = next(iter(stats.values())).num_images
            click.echo(f"Wrote {', '.join(stats)} statistics of {n} images to {dest}")
        dist.barrier()

    _run(task)


@main.command()
@click.option("--images", required=True, metavar="PATH", type=click.Path(exists=True), help="Folder or zip of PNGs")
@click.option("--ref", "ref_path", required=True, metavar="PATH|URL", help="Reference statistics (.npz or EDM2 .pkl)")
@click.option(
    "--num",
    type=click.IntRange(min=2),
    default=M.DEFAULT_NUM_IMAGES,
    show_default=True,
    help="Images to use; fewer is an error, more: the official tool's seeded choice of N",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed of that choice (official --seed)")
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True, help="PNG decoding processes")
@click.option("--out", metavar="FILE.json", type=click.Path(dir_okay=False), help="Also write the results as JSON")
@common_options
def calc(images, ref_path, num, seed, workers, out, metrics, batch_size, inception_weights, dinov2_weights, progress):
    """Metrics of a folder or zip of images against reference statistics."""
    if out is not None:
        check_output_path("--out", out)

    def task():
        results = M.calc_metrics_for_images(
            images,
            ref_path,
            metrics,
            num=num,
            seed=seed,
            batch_size=batch_size,
            workers=workers,
            weights=_weights(inception_weights, dinov2_weights),
            progress=progress,
        )
        _report(results, num, out)

    _run(task)


@main.command()
@model_click_options
@click.option("--ref", "ref_path", required=True, metavar="PATH|URL", help="Reference statistics (.npz or EDM2 .pkl)")
@click.option(
    "--seeds",
    default=f"0-{M.DEFAULT_NUM_IMAGES - 1}",
    show_default=True,
    callback=seeds_option,
    help="One image per seed",
)
@click.option("--num", "num_images", type=click.IntRange(min=2), default=None,
              help="Images to generate, seeds SEED..SEED+NUM-1 (the official tool's options; instead of --seeds)")
@click.option("--seed", "first_seed", type=click.IntRange(min=0), default=None,
              help="Seed of the first image, with --num  [default: 0]")
@click.option("--class", "class_idx", type=int, default=None, help="Class of every image  [default: random per seed]")
@solver_click_options
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "bf16", "fp8"]),
    default=None,
    help="Network activation precision; fp8: bf16 with FP8 (e4m3) convolutions (compute capability 8.9+, as "
    "generate.py; experimental)  [default: the model file's]",
)
@click.option("--vae", metavar="NAME|DIR", default=None,
              help="Latent networks: the VAE decoder, a hub name or a local folder  [default: the model file's]")
@click.option("--out", metavar="FILE.json", type=click.Path(dir_okay=False), help="Also write the results as JSON")
@speed_click_options
@common_options
def gen(
    preset,
    net_path,
    gnet_path,
    guidance,
    guidance_interval,
    ref_path,
    seeds,
    num_images,
    first_seed,
    class_idx,
    precision,
    vae,
    out,
    kernels,
    compile_net,
    metrics,
    batch_size,
    inception_weights,
    dinov2_weights,
    progress,
    **solver_params,
):
    """Metrics of a model against reference statistics, generating images on the fly (none written)."""
    net_path, gnet_path, guidance = resolve_model_options(preset, net_path, gnet_path, guidance)
    if num_images is not None or first_seed is not None:
        if click.get_current_context().get_parameter_source("seeds") != click.core.ParameterSource.DEFAULT:
            raise click.BadParameter("give --seeds, or --num and --seed, not both", param_hint="'--num' / '--seed'")
        first = first_seed or 0
        seeds = list(range(first, first + (num_images or len(seeds))))
    settings = sampling_settings_from_cli(solver_params, guidance, guidance_interval, gnet_path)
    check_speed_options(kernels, compile_net, precision)
    if out is not None:
        check_output_path("--out", out)

    def task():
        device = dist.device()  # the sampling precision follows it (load_option), as in generate.py
        loaded = load_option("--net", net_path, device, precision)
        gnet = load_option("--gnet", gnet_path, device, precision).net if settings.needs_guide else None
        net = prepare_option(loaded.net, kernels, compile_net, seeds, batch_size, precision)  # as generate.py
        gnet = prepare_option(gnet, kernels, compile_net, seeds, batch_size, precision) if gnet is not None else None
        try:
            encoder_settings = prepare_encoder(loaded.net, loaded.encoder, vae, device)
        except ValueError as e:
            raise click.ClickException(f"{net_path}: {e}") from None
        except VAELoadError as e:
            raise click.ClickException(str(e)) from None
        try:
            results = M.calc_metrics_for_model(
                net,
                ref_path,
                metrics,
                seeds,
                batch_size=batch_size,
                gnet=gnet,
                encoder_settings=encoder_settings,
                class_idx=class_idx,
                weights=_weights(inception_weights, dinov2_weights),
                device=device,
                progress=progress,
                settings=settings,
            )
        except (M.MetricsError, DetectorWeightsError):
            raise
        except ValueError as e:  # sampler / class / encoder settings
            raise click.ClickException(f"{net_path}: {e}") from None
        _report(results, len(seeds), out)

    _run(task)


if __name__ == "__main__":
    main()
