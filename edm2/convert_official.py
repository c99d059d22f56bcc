"""Convert an official EDM2 network pickle (path or URL) to this project's model file.

    python -m edm2.convert_official edm2-img512-xs-2147483-0.135.pkl edm2-img512-xs-2147483-0.135.safetensors
    python -m edm2.convert_official "$URL" out.safetensors   # URLs: edm2.official.OFFICIAL_PRESETS

The pickle is read with the allow-listed unpickler (its code is never run); weights become float32. The
training image count and EMA std come from the official file name when it follows the official pattern.
"""

from __future__ import annotations

import os
import pathlib

import click

from .download import DownloadError
from .model_files import ModelFileError, NetworkFile, load_network, save_network


def convert_official(src: str | os.PathLike, dest: str | os.PathLike, sha256: str | None = None) -> NetworkFile:
    """Read `src` (an official .pkl, local or http(s)) and write it to `dest` (.safetensors); returns what was read."""
    loaded = load_network(src, device="cpu", sha256=sha256)
    if loaded.meta.get("format") != "edm2-official-pickle":
        found = loaded.meta.get("format")
        raise ModelFileError(f"{loaded.path}: not an official EDM2 pickle (it is already a {found!r} file)")
    extra = {
        "converted_from": str(src),
        "official_init_kwargs": loaded.meta.get("official_init_kwargs"),
        "dataset_kwargs": loaded.meta.get("dataset_kwargs"),
        "loss": loaded.meta.get("loss"),
        "source_dtypes": loaded.meta.get("source_dtypes"),
        # The dtype in which the official code forms gain / sqrt(fan_in) for this file (model_files restores it).
        "official_gain_dtype": str(loaded.net.unet.gain_dtype).removeprefix("torch."),
    }
    save_network(
        dest,
        loaded.net,
        encoder=loaded.encoder,
        ema_std=loaded.meta.get("ema_std"),
        training_nimg=loaded.meta.get("training_nimg"),
        extra=extra,
    )
    return loaded


@click.command()
@click.argument("src", metavar="IN.pkl|URL")
@click.argument("dest", metavar="OUT.safetensors", type=click.Path(dir_okay=False))
@click.option("--sha256", default=None, metavar="HEX", help="Expected SHA-256 of the input file.")
def main(src: str, dest: str, sha256: str | None) -> None:
    """Convert an official EDM2 network pickle IN.pkl (path or URL) to a model file OUT.safetensors."""
    if pathlib.Path(dest).suffix != ".safetensors":
        raise click.BadParameter(f"must end in .safetensors, got {dest!r}", param_hint="OUT.safetensors")
    try:
        loaded = convert_official(src, dest, sha256=sha256)
    except (ModelFileError, DownloadError, FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    params = sum(p.numel() for p in loaded.net.parameters())
    click.echo(
        f"wrote {dest}: Precond with {params / 1e6:.1f}M parameters, encoder "
        f"{(loaded.encoder or {}).get('class')}, training_nimg {loaded.meta.get('training_nimg')}, "
        f"ema_std {loaded.meta.get('ema_std')}"
    )


if __name__ == "__main__":
    main()
