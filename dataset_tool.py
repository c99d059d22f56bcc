"""Prepare datasets: images -> resized PNG zip (`convert`), PNG zip -> Stable Diffusion VAE latents (`encode`).

    python dataset_tool.py convert --source ~/ILSVRC/Data/CLS-LOC/train --dest img512.zip --resolution 512 --transform center-crop-dhariwal
    python dataset_tool.py encode --source img512.zip --dest img512-sd.zip
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from typing import Iterator

import click
import numpy as np
import PIL.Image
import torch
import tqdm

from torch_utils.state_io import atomic_write
from training.dataset import DatasetError, ImageFolderDataset
from training.encoders import STABILITY_VAE_DEFAULTS, StabilityVAEEncoder

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


# --- reading sources -------------------------------------------------------------------------------------


def list_source_images(source: str) -> tuple[list[str], dict[str, int] | None, int | None]:
    """Relative image paths in a folder or zip (sorted), their labels and the number of classes: from
    dataset.json if present, else from the first folder level (ImageNet layout: one folder per class,
    classes in sorted order)."""
    if os.path.isdir(source):
        names = sorted(
            os.path.relpath(os.path.join(root, f), source).replace(os.sep, "/")
            for root, _d, files in os.walk(source)
            for f in files
        )
        meta_bytes = open(os.path.join(source, "dataset.json"), "rb").read() if "dataset.json" in names else None
    elif zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as z:
            names = sorted(z.namelist())
            meta_bytes = z.read("dataset.json") if "dataset.json" in names else None
    else:
        raise click.BadParameter(f"{source}: not a folder or a zip file", param_hint="--source")
    images = [n for n in names if n.lower().endswith(IMAGE_SUFFIXES)]
    if not images:
        raise click.BadParameter(f"{source}: holds no images ({', '.join(IMAGE_SUFFIXES)})", param_hint="--source")
    if meta_bytes is not None:
        meta = json.loads(meta_bytes)
        labels = meta.get("labels")
        return images, None if labels is None else {str(n): int(c) for n, c in labels}, meta.get("num_classes")
    folders = sorted({n.split("/")[0] for n in images if "/" in n})
    if folders and all("/" in n for n in images):
        index = {f: i for i, f in enumerate(folders)}
        return images, {n: index[n.split("/")[0]] for n in images}, len(folders)
    return images, None, None


def read_source(source: str, name: str) -> bytes:
    if os.path.isdir(source):
        with open(os.path.join(source, name), "rb") as f:
            return f.read()
    with zipfile.ZipFile(source) as z:
        return z.read(name)


def iterate_source(source: str, names: list[str]) -> Iterator[tuple[str, bytes]]:
    if os.path.isdir(source):
        for n in names:
            yield n, read_source(source, n)
    else:
        with zipfile.ZipFile(source) as z:
            for n in names:
                yield n, z.read(n)


# --- image transforms ------------------------------------------------------------------------------------


def center_crop_dhariwal(img: PIL.Image.Image, resolution: int) -> PIL.Image.Image:
    """ADM's ImageNet preparation: halve with a box filter while the short side is at least twice the
    target, resize bicubically so the short side equals it, then crop the centre square."""
    while min(img.size) >= 2 * resolution:
        img = img.resize(tuple(s // 2 for s in img.size), resample=PIL.Image.BOX)
    scale = resolution / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=PIL.Image.BICUBIC)
    left, top = (img.size[0] - resolution) // 2, (img.size[1] - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def center_crop(img: PIL.Image.Image, resolution: int) -> PIL.Image.Image:
    """Crop the centre square, then resize it with Lanczos."""
    s = min(img.size)
    left, top = (img.size[0] - s) // 2, (img.size[1] - s) // 2
    return img.crop((left, top, left + s, top + s)).resize((resolution, resolution), resample=PIL.Image.LANCZOS)


TRANSFORMS = {"center-crop-dhariwal": center_crop_dhariwal, "center-crop": center_crop}


def write_zip(dest: str, entries: Iterator[tuple[str, bytes]], labels: list | None, num_classes: int | None = None) -> int:
    """Write (name, bytes) entries and dataset.json into an uncompressed zip, atomically; returns the count."""
    count = 0

    def write(tmp: str) -> None:
        nonlocal count
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
            for name, data in entries:
                z.writestr(name, data)
                count += 1
            meta = {"labels": labels}
            if labels is not None and num_classes is not None:
                meta["num_classes"] = num_classes
            z.writestr("dataset.json", json.dumps(meta))

    atomic_write(dest, write)
    return count


# --- commands --------------------------------------------------------------------------------------------


@click.group()
def main() -> None:
    """Prepare datasets for train_edm2.py."""


@main.command()
@click.option("--source", required=True, help="Folder or zip of images (ImageNet layout: a folder per class)")
@click.option("--dest", required=True, help="Output zip")
@click.option("--resolution", type=click.IntRange(min=8), required=True, help="Output resolution (square)")
@click.option("--transform", type=click.Choice(sorted(TRANSFORMS)), default="center-crop-dhariwal", show_default=True)
@click.option("--max-images", type=click.IntRange(min=1), default=None, help="Convert only the first N images")
def convert(source: str, dest: str, resolution: int, transform: str, max_images: int | None) -> None:
    """Images -> uncompressed zip of RGB PNGs at one resolution, with dataset.json labels."""
    names, labels, num_classes = list_source_images(source)
    names = names[:max_images] if max_images else names
    out_labels = [] if labels is not None else None
    fn = TRANSFORMS[transform]

    def entries() -> Iterator[tuple[str, bytes]]:
        for i, (name, data) in enumerate(tqdm.tqdm(iterate_source(source, names), total=len(names), desc="convert", unit="img")):
            try:
                with PIL.Image.open(io.BytesIO(data)) as img:
                    img = fn(img.convert("RGB"), resolution)
            except Exception as e:  # noqa: BLE001 - any decoder error names the file
                raise click.ClickException(f"{source}: cannot read {name!r}: {e}") from None
            out = f"{i // 1000:05d}/img{i:08d}.png"
            buf = io.BytesIO()
            img.save(buf, format="png", compress_level=0, optimize=False)
            if out_labels is not None:
                if name not in labels:
                    raise click.ClickException(f"{source}: dataset.json has no label for {name!r}")
                out_labels.append([out, labels[name]])
            yield out, buf.getvalue()

    count = write_zip(dest, entries(), out_labels, num_classes)
    click.echo(f"Wrote {count} image{'' if count == 1 else 's'} of {resolution}x{resolution} to {dest}")


@main.command()
@click.option("--source", required=True, help="Zip or folder of PNG images (from `convert`)")
@click.option("--dest", required=True, help="Output zip of raw latents (.npy, 8 channels: posterior mean and std)")
@click.option("--vae", default=STABILITY_VAE_DEFAULTS["vae_name"], show_default=True, help="AutoencoderKL: hub name or local directory")
@click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True, help="Images per VAE call")
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu", show_default=True)
def encode(source: str, dest: str, vae: str, batch: int, device: str) -> None:
    """PNG dataset -> Stable Diffusion VAE latent dataset (what --data takes for the img512 presets)."""
    try:
        dataset = ImageFolderDataset(source, use_labels=True)
    except DatasetError as e:
        raise click.BadParameter(str(e), param_hint="--source") from None
    if dataset.is_latent or dataset.num_channels != 3:
        raise click.BadParameter(f"{source}: expected RGB .png images, got {dataset.num_channels}-channel {'latents' if dataset.is_latent else 'images'}", param_hint="--source")
    encoder = StabilityVAEEncoder(vae_name=vae, batch_size=batch)
    out_labels = [] if dataset.labels is not None else None

    def entries() -> Iterator[tuple[str, bytes]]:
        with tqdm.tqdm(total=len(dataset), desc="encode", unit="img") as bar:
            for first in range(0, len(dataset), batch):
                idx = range(first, min(first + batch, len(dataset)))
                images = torch.stack([dataset[i][0] for i in idx]).to(device)
                raw = encoder.encode_pixels(images).cpu().numpy()
                for i, arr in zip(idx, raw):
                    name = os.path.splitext(dataset.names[i])[0] + ".npy"
                    buf = io.BytesIO()
                    np.save(buf, arr.astype(np.float32))
                    if out_labels is not None:
                        out_labels.append([name, int(dataset.labels[i])])
                    yield name, buf.getvalue()
                bar.update(len(idx))

    count = write_zip(dest, entries(), out_labels, dataset.label_dim if out_labels is not None else None)
    click.echo(f"Wrote {count} latents to {dest}")


if __name__ == "__main__":
    main()
