"""EMA-length sweep (EDM2 Fig. 5): reconstruct a range of EMA lengths post hoc, score each, plot the curve.

    python phema_sweep.py --indir=training-runs/00000 --data=val.npz --outstd=0.02,0.03,...,0.25 --outdir=sweep
    python phema_sweep.py --indir=training-runs/00000 --metric=fid --ref=img512-ref.npz --seeds=0-9999 --outdir=sweep
    torchrun --standalone --nproc_per_node=8 phema_sweep.py --indir=... --metric=fd_dinov2 --ref=img512-ref.npz ...

Writes sweep.png (the metric against the EMA length, optimum marked), sweep.json and sweep.csv.
Metrics: the EDM2 validation loss with fixed seeds (--data), or FID / FD_DINOv2 against reference statistics
of `calculate_metrics.py ref` (--ref), generating one image per seed for every EMA length (the paper's
Fig. 5 / 6). Networks and images are never written to disk; under torchrun the images are shared out.
"""

from __future__ import annotations

import pathlib

import click

from edm2.cli import NumberRange, check_device_option, check_output_path, out_of_memory_names, std_list_option
from edm2.model_files import read_header
from edm2.phema_reconstruct import scan_snapshots
from edm2.phema_search import (
    load_validation_data,
    plot_sweep,
    save_sweep_table,
    sweep_ema_length,
    validation_loss_metric,
)
from edm2.seeds import parse_seeds
from torch_utils import distributed as dist
from training.encoders import encoder_from_config


@click.command()
@click.option(
    "--indir",
    help="Directory holding the training snapshots",
    metavar="DIR",
    type=click.Path(exists=True, file_okay=False),
    required=True,
)
@click.option(
    "--data",
    help="Validation data for --metric val-loss: dataset folder/zip, .npy [N,C,H,W] or .npz with 'images' "
    "(and 'labels')",
    metavar="PATH",
    type=click.Path(exists=True),
)
@click.option("--outdir", help="Where sweep.png / .json / .csv go", metavar="DIR", type=str, required=True)
@click.option(
    "--outstd",
    help="EMA lengths to try: list, ranges like 0.02,0.03,...,0.25",
    metavar="LIST",
    type=str,
    callback=std_list_option,
    default="0.02,0.03,...,0.25",
    show_default=True,
)
@click.option(
    "--outkimg",
    help="End time of the profiles: kimg of a snapshot  [default: the latest]",
    metavar="KIMG",
    type=click.IntRange(min=0),
    default=None,
)
@click.option(
    "--metric",
    help="Metric to minimise",
    type=click.Choice(["val-loss", "fid", "fd_dinov2"]),
    default="val-loss",
    show_default=True,
)
@click.option(
    "--ref", "ref_path", help="Reference statistics for fid / fd_dinov2 (calculate_metrics.py ref)", metavar="PATH|URL"
)
@click.option(
    "--seeds",
    help="fid / fd_dinov2: one generated image per seed",
    metavar="LIST",
    default="0-49999",
    show_default=True,
)
@click.option(
    "--steps",
    "num_steps",
    help="fid / fd_dinov2: sampling steps",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
)
@click.option("--inception-weights", help="FID Inception weights (file or URL)", metavar="PATH|URL")
@click.option("--dinov2-weights", help="DINOv2 ViT-L/14 weights (file or URL)", metavar="PATH|URL")
@click.option(
    "--num",
    help="Validation images to use (0 = all)",
    metavar="INT",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
)
@click.option(
    "--repeats", help="Noise draws per image", metavar="INT", type=click.IntRange(min=1), default=1, show_default=True
)
@click.option(
    "--P-mean",
    "--P_mean",
    "P_mean",
    help="Mean of ln(sigma)",
    metavar="FLOAT",
    type=NumberRange(finite=True),
    default=-0.4,
    show_default=True,
)
@click.option(
    "--P-std",
    "--P_std",
    "P_std",
    help="Std of ln(sigma)",
    metavar="FLOAT",
    type=NumberRange(min=0, min_open=True, finite=True),  # nan or inf would make every sigma nan or inf
    default=1.0,
    show_default=True,
)
@click.option("--seed", help="Seed of sigma and noise", metavar="INT", type=int, default=0, show_default=True)
@click.option(
    "--batch",
    help="Reconstructions per pass over the snapshots",
    metavar="INT",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
)
@click.option(
    "--eval-batch",
    help="Images per forward pass",
    metavar="INT",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
)
@click.option(
    "--device",
    help="Device  [default: cuda if available (torchrun: the rank's GPU), else cpu]",
    metavar="STR",
    type=str,
    default=None,
)
def main(
    indir,
    data,
    outdir,
    outstd,
    outkimg,
    metric,
    ref_path,
    seeds,
    num_steps,
    inception_weights,
    dinov2_weights,
    num,
    repeats,
    P_mean,
    P_std,
    seed,
    batch,
    eval_batch,
    device,
):
    """Sweep the post-hoc EMA length of the run in INDIR and plot the metric."""
    if device is not None:
        device = check_device_option(device)
    check_output_path("--outdir", pathlib.Path(outdir) / "sweep.png")
    if metric == "val-loss":
        if data is None:
            raise click.BadParameter("--metric val-loss needs validation data", param_hint="--data")
        result = _sweep_validation_loss(
            indir, data, outstd, outkimg, num, repeats, P_mean, P_std, seed, batch, eval_batch, device or "cpu"
        )
    else:
        if ref_path is None:
            raise click.BadParameter(
                f"--metric {metric} needs reference statistics (calculate_metrics.py ref)", param_hint="--ref"
            )
        try:
            seed_list = parse_seeds(seeds)
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint="--seeds") from None
        dist.init()
        try:
            result = _sweep_generation_metric(
                indir,
                metric,
                ref_path,
                seed_list,
                num_steps,
                inception_weights,
                dinov2_weights,
                outstd,
                outkimg,
                batch,
                eval_batch,
                device,
            )
        finally:
            dist.shutdown()
        if not dist.is_main():
            return
    outdir = pathlib.Path(outdir)
    plot_sweep(result, outdir / "sweep.png")
    save_sweep_table(result, outdir / "sweep.json")
    save_sweep_table(result, outdir / "sweep.csv")
    click.echo(f"best EMA length: std {result.best_std:.3f} ({metric} {result.best_value:.6g}); written to {outdir}")


@out_of_memory_names("--eval-batch", "images per forward pass, which does not change the results")
def _sweep_generation_metric(
    indir,
    metric,
    ref_path,
    seeds,
    num_steps,
    inception_weights,
    dinov2_weights,
    outstd,
    outkimg,
    batch,
    eval_batch,
    device,
):
    """FID / FD_DINOv2 of every reconstructed EMA length, images generated on the fly (edm2.metrics)."""
    from edm2 import metrics as M
    from edm2.detectors import DetectorWeightsError

    device = device or dist.device()
    try:
        snapshots = scan_snapshots(indir)
        score = M.model_metric(
            ref_path,
            metric,
            seeds,
            weights={"fid": inception_weights, "fd_dinov2": dinov2_weights},
            device=device,
            encoder_settings=read_header(snapshots[-1].path).get("encoder"),
            batch_size=eval_batch,
            num_steps=num_steps,
            progress=dist.is_main(),
        )
        return sweep_ema_length(
            snapshots,
            outstd,
            score,
            out_kimg=outkimg,
            batch=batch,
            device=device,
            metric_name=metric,
            progress=dist.is_main(),
        )
    except (ValueError, DetectorWeightsError) as error:  # MetricsError, SnapshotError, ModelFileError: name the file
        raise click.ClickException(str(error)) from None


def validation_data_problem(images, labels, header: dict) -> str | None:
    """What makes the validation data unfit for the run's network (its model file header), or None. The shape
    is checked for pixel networks only: a latent network's inputs come from its VAE."""
    kwargs = header.get("init_kwargs", {})
    if images.ndim != 4 or images.shape[0] == 0:
        return f"expected images [N, C, H, W] with N > 0, got shape {list(images.shape)}"
    if (header.get("encoder") or {}).get("class", "standard_rgb") == "standard_rgb":
        res, channels = kwargs.get("img_resolution"), kwargs.get("img_channels")
        if res is not None and list(images.shape[1:]) != [channels, res, res]:
            return f"images of shape {list(images.shape[1:])}, but the network takes [{channels}, {res}, {res}]"
    if labels is not None and labels.shape[0] != images.shape[0]:
        return f"{labels.shape[0]} labels for {images.shape[0]} images"
    if kwargs.get("label_dim", 0) and labels is None:
        return f"no labels, but the network is class-conditional (label_dim {kwargs['label_dim']})"
    return None


def _sweep_validation_loss(indir, data, outstd, outkimg, num, repeats, P_mean, P_std, seed, batch, eval_batch, device):
    """The EDM2 loss on held-out data (fixed sigma and noise) of every reconstructed EMA length."""
    try:
        images, labels = load_validation_data(data, max_images=num or None)
    except ValueError as error:
        message = str(error) if str(data) in str(error) else f"{data}: {error}"
        raise click.BadParameter(message, param_hint="--data") from None
    if num and images.shape[0] < num:
        raise click.BadParameter(f"{data} holds {images.shape[0]} images, fewer than the {num} asked for",
                                 param_hint="--num")
    try:
        snapshots = scan_snapshots(indir)
        header = read_header(snapshots[-1].path)
    except ValueError as error:  # SnapshotError, ModelFileError: name the file
        raise click.ClickException(str(error)) from None
    problem = validation_data_problem(images, labels, header)
    if problem is not None:
        raise click.BadParameter(f"{data}: {problem}", param_hint="--data")
    try:
        encoder_config = header.get("encoder")  # the run's encoder turns data into inputs
        encoder = None if encoder_config is None else encoder_from_config(encoder_config)
        score = validation_loss_metric(
            images,
            labels,
            encoder=encoder,
            P_mean=P_mean,
            P_std=P_std,
            seed=seed,
            repeats=repeats,
            batch_size=eval_batch,
            device=device,
        )
        return sweep_ema_length(
            snapshots, outstd, score, out_kimg=outkimg, batch=batch, device=device, metric_name="val-loss"
        )
    except ValueError as error:  # SnapshotError, ModelFileError, shape mismatches: all name the culprit
        raise click.ClickException(str(error)) from None


if __name__ == "__main__":
    main()
