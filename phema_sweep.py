"""EMA-length sweep (EDM2 Fig. 5): reconstruct a range of EMA lengths post hoc, score each, plot the curve.

    python phema_sweep.py --indir=training-runs/00000 --data=val.npz --outstd=0.02,0.03,...,0.25 --outdir=sweep

Writes sweep.png (the metric against the EMA length, optimum marked), sweep.json and sweep.csv.
The default metric is the EDM2 validation loss with fixed seeds; networks are never written to disk.
"""

from __future__ import annotations

import pathlib

import click

from edm2.model_files import read_header
from training.encoders import encoder_from_config
from training.phema_reconstruct import parse_std_list, scan_snapshots
from training.phema_sweep import (
    load_validation_data,
    plot_sweep,
    save_sweep_table,
    sweep_ema_length,
    validation_loss_metric,
)


def _std_list(ctx, param, value):
    try:
        return parse_std_list(value)
    except ValueError as error:
        raise click.BadParameter(str(error), ctx=ctx, param=param) from None


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
    help="Validation data: dataset folder/zip, .npy [N,C,H,W] or .npz with 'images' (and 'labels')",
    metavar="PATH",
    type=click.Path(exists=True),
    required=True,
)
@click.option("--outdir", help="Where sweep.png / .json / .csv go", metavar="DIR", type=str, required=True)
@click.option(
    "--outstd",
    help="EMA lengths to try: list, ranges like 0.02,0.03,...,0.25",
    metavar="LIST",
    type=str,
    callback=_std_list,
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
    "--metric", help="Metric to minimise", type=click.Choice(["val-loss"]), default="val-loss", show_default=True
)
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
    "--P-mean", "P_mean", help="Mean of ln(sigma)", metavar="FLOAT", type=float, default=-0.4, show_default=True
)
@click.option(
    "--P-std",
    "P_std",
    help="Std of ln(sigma)",
    metavar="FLOAT",
    type=click.FloatRange(min=0, min_open=True),
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
@click.option("--device", help="Device", metavar="STR", type=str, default="cpu", show_default=True)
def main(indir, data, outdir, outstd, outkimg, metric, num, repeats, P_mean, P_std, seed, batch, eval_batch, device):
    """Sweep the post-hoc EMA length of the run in INDIR and plot the metric."""
    try:
        images, labels = load_validation_data(data, max_images=num or None)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--data") from None
    try:
        snapshots = scan_snapshots(indir)
        encoder_config = read_header(snapshots[-1].path).get("encoder")  # the run's encoder turns data into inputs
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
        result = sweep_ema_length(
            snapshots, outstd, score, out_kimg=outkimg, batch=batch, device=device, metric_name=metric
        )
    except ValueError as error:  # SnapshotError, ModelFileError, shape mismatches: all name the culprit
        raise click.ClickException(str(error)) from None
    outdir = pathlib.Path(outdir)
    plot_sweep(result, outdir / "sweep.png")
    save_sweep_table(result, outdir / "sweep.json")
    save_sweep_table(result, outdir / "sweep.csv")
    click.echo(f"best EMA length: std {result.best_std:.3f} ({metric} {result.best_value:.6g}); written to {outdir}")


if __name__ == "__main__":
    main()
