"""Reconstruct any power-function EMA length from the snapshots of a training run (post-hoc EMA, docs/design.md §6).

    python reconstruct_phema.py --indir=training-runs/00000-edm2-img512-xs --outdir=phema \\
        --outstd=0.010,0.015,...,0.250 --batch=8

Writes `{prefix}-{kimg:07d}-{std:.3f}.safetensors`, usable by generate.py and calculate_metrics.py. Inputs are all
PREFIX-KIMG-STD files in INDIR (.safetensors snapshots of train_edm2.py, or official .pkl raw snapshots), and the
official tool's option names work here too (--inprefix, --instd, --outprefix, --skip).
"""

from __future__ import annotations

import click

from edm2.cli import check_device_option, std_list_option
from edm2.phema_reconstruct import OUTPUT_PREFIX, SnapshotError, reconstruct_to_dir


@click.command()
@click.option(
    "--indir",
    help="Directory holding the snapshots: PREFIX-KIMG-STD.safetensors of training, or official .pkl",
    metavar="DIR",
    type=click.Path(exists=True, file_okay=False),
    required=True,
)
@click.option("--inprefix", help="Only inputs named INPREFIX-KIMG-STD  [default: any]", metavar="STR", default=None)
@click.option(
    "--instd",
    help="Only inputs with these stds in their names  [default: any]",
    metavar="LIST",
    type=str,
    callback=std_list_option,
    default=None,
)
@click.option(
    "--outdir", help="Where the reconstructed networks are written", metavar="DIR", type=click.Path(file_okay=False),
    required=True,
)
@click.option(
    "--outstd",
    help="EMA lengths (relative std) to build: list, ranges like 0.010,0.015,...,0.250",
    metavar="LIST",
    type=str,
    callback=std_list_option,
    required=True,
)
@click.option(
    "--outkimg",
    help="End time of the profiles: kimg of a snapshot  [default: the latest]",
    metavar="KIMG",
    type=click.IntRange(min=0),
    default=None,
)
@click.option(
    "--batch",
    help="Outputs built per pass over the inputs",
    metavar="INT",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
)
@click.option(
    "--prefix",
    "--outprefix",
    "prefix",
    help="Output file name prefix",
    metavar="STR",
    type=str,
    default=OUTPUT_PREFIX,
    show_default=True,
)
@click.option("--skip-existing", "--skip", "skip_existing", help="Skip outputs that already exist", is_flag=True)
@click.option(
    "--device",
    help="Device for loading and summing the snapshots",
    metavar="STR",
    type=str,
    default="cpu",
    show_default=True,
)
def main(indir, inprefix, instd, outdir, outstd, outkimg, batch, prefix, skip_existing, device):
    """Reconstruct post-hoc EMA networks from the snapshots in INDIR.

    The weighted sums are taken in float64 on --device and written in the snapshots' own dtype (float32)."""
    device = check_device_option(device)
    try:
        paths = reconstruct_to_dir(
            indir,
            outdir,
            outstd,
            out_kimg=outkimg,
            batch=batch,
            prefix=prefix,
            skip_existing=skip_existing,
            device=device,
            in_prefix=inprefix,
            in_std=instd,
        )
    except SnapshotError as error:
        raise click.ClickException(str(error)) from None
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    except OSError as error:  # the output folder cannot be made or written
        raise click.ClickException(f"--outdir {outdir}: {error}") from None
    click.echo(f"{len(paths)} networks in {outdir}")


if __name__ == "__main__":
    main()
