"""Prepare datasets: images -> resized PNG zip (`convert`), PNG zip -> Stable Diffusion VAE latents (`encode`),
and find every bad file of a dataset in one pass (`check`).

    python dataset_tool.py convert --source ~/ILSVRC/Data/CLS-LOC/train --dest img512.zip --resolution 512 \\
        --transform center-crop-dhariwal
    python dataset_tool.py encode --source img512.zip --dest img512-sd.zip
    python dataset_tool.py check img512-sd.zip
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile
import time
import zipfile
import zlib
from typing import Any, Callable, Iterator

import click
import numpy as np
import PIL.Image
import torch
import tqdm

from edm2.cli import check_device_option, check_output_path, writing_names
from torch_utils.state_io import atomic_write, current_umask
from training.dataset import DatasetError, ImageFolderDataset, is_array_file, list_dataset_files
from training.encoders import STABILITY_VAE_DEFAULTS, StabilityVAEEncoder, VAELoadError

# --- reading sources -------------------------------------------------------------------------------------
# `convert` reads its sources as the official dataset_tool does, so that the same folder gives the same files,
# order and labels: every file whose text after the last '.' is one of Pillow's image extensions (any case),
# sorted by path; labels from the source's dataset.json, else (folders only) from the top-level folder names.


def is_image_name(name: str, extensions: set[str]) -> bool:
    return "." in name and "." + name.rsplit(".", 1)[1].lower() in extensions


def _walk_files(root: str) -> list[str]:
    """Paths of the files under `root`, following links to folders and files (broken links are skipped)."""
    found: list[str] = []

    def recurse(folder: str) -> None:
        with os.scandir(folder) as entries:
            for e in entries:
                if e.is_file():
                    found.append(os.path.join(folder, e.name))
                elif e.is_dir():
                    recurse(os.path.join(folder, e.name))

    recurse(root)
    return found


def list_source_images(source: str) -> tuple[list[str], dict[str, Any] | None, int | None]:
    """Relative image paths of a folder or zip in conversion order, {path: label} (None: no labels) and the
    number of classes when the source's dataset.json states it.

    Labels: the source's dataset.json `labels` when it has any; else, for a folder, one class per top-level
    name in sorted order, where the files outside every folder form a class of their own (the first: the
    empty name sorts first) and a single top-level name means no labels. A zip without dataset.json labels
    has none. The labels may miss some images; `convert` then writes the dataset without labels."""
    extensions = set(PIL.Image.registered_extensions())
    if os.path.isdir(source):
        names = [p.replace(os.sep, "/") for p in sorted(os.path.relpath(p, source) for p in _walk_files(source))]
        meta_path = os.path.join(source, "dataset.json")
        meta_bytes = None
        if os.path.isfile(meta_path):
            with open(meta_path, "rb") as f:
                meta_bytes = f.read()
    elif zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as z:
            names = sorted(z.namelist())
            meta_bytes = z.read("dataset.json") if "dataset.json" in names else None
    else:
        raise click.BadParameter(f"{source}: not a folder or a zip file", param_hint="--source")
    images = [n for n in names if is_image_name(n, extensions)]
    if not images:
        raise click.BadParameter(f"{source}: holds no images (files named *.png, *.jpg, ...)", param_hint="--source")
    labels: dict[str, Any] = {}
    num_classes = None
    if meta_bytes is not None:
        try:
            meta = json.loads(meta_bytes)
            raw = meta.get("labels")
            labels = {str(n): c for n, c in raw} if raw else {}
        except (ValueError, TypeError, AttributeError):
            raise click.BadParameter(
                f"{source}: dataset.json must be {{\"labels\": [[relative_path, label], ...] or null}}",
                param_hint="--source",
            ) from None
        num_classes = meta.get("num_classes") if labels else None  # this project's addition; kept when given
    if not labels and os.path.isdir(source):
        top = {n: n.split("/")[0] if "/" in n else "" for n in images}
        classes = {name: i for i, name in enumerate(sorted(set(top.values())))}
        if len(classes) > 1:
            labels = {n: classes[top[n]] for n in images}
    return images, labels or None, num_classes


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
# Each takes an RGB image and the output width and height and returns the output image, or None to skip the
# input; all follow the official dataset_tool's steps so that the pixels are the same.


def resize(img: PIL.Image.Image, width: int | None, height: int | None) -> PIL.Image.Image:
    """No crop: Lanczos resize to width x height (the aspect ratio is not kept); None keeps the input size."""
    if width is None or img.size == (width, height):
        return img
    return img.resize((width, height), resample=PIL.Image.LANCZOS)


def center_crop(img: PIL.Image.Image, width: int, height: int) -> PIL.Image.Image:
    """Crop the centre square, then resize it with Lanczos."""
    s = min(img.size)
    left, top = (img.size[0] - s) // 2, (img.size[1] - s) // 2
    return img.crop((left, top, left + s, top + s)).resize((width, height), resample=PIL.Image.LANCZOS)


def center_crop_wide(img: PIL.Image.Image, width: int, height: int) -> PIL.Image.Image | None:
    """Letterbox: the centre band of the rows that width x height would show at the input's aspect ratio, resized
    with Lanczos to width x height and placed in the middle of a black width x width square. Inputs narrower than
    `width` or whose band is shorter than `height` are skipped."""
    w, h = img.size
    band = round(width * h / w)
    if w < width or band < height:
        return None
    top = (h - band) // 2
    strip = np.asarray(img.crop((0, top, w, top + band)).resize((width, height), resample=PIL.Image.LANCZOS))
    canvas = np.zeros([width, width, 3], dtype=np.uint8)
    canvas[(width - height) // 2 : (width + height) // 2] = strip
    return PIL.Image.fromarray(canvas, "RGB")


def center_crop_dhariwal(img: PIL.Image.Image, resolution: int) -> PIL.Image.Image:
    """ADM's ImageNet preparation: halve with a box filter while the short side is at least twice the
    target, resize bicubically so the short side equals it, then crop the centre square."""
    while min(img.size) >= 2 * resolution:
        img = img.resize(tuple(s // 2 for s in img.size), resample=PIL.Image.BOX)
    scale = resolution / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=PIL.Image.BICUBIC)
    left, top = (img.size[0] - resolution) // 2, (img.size[1] - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


TRANSFORMS = {
    "center-crop": center_crop,
    "center-crop-wide": center_crop_wide,
    "center-crop-dhariwal": lambda img, width, height: center_crop_dhariwal(img, width),
}


MAX_RESOLUTION = 16384  # --resolution at most this a side (an RGB image of 768 MiB)


def parse_resolution(
    ctx: click.Context | None, param: click.Parameter | None, value: str | None
) -> tuple[int, int] | None:
    """--resolution: N (square) or the official WxH / W,H form."""
    if value is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX,]\s*(\d+)\s*)?", value)
    size = (int(m[1]), int(m[2] or m[1])) if m else None
    if size is None or min(size) < 1:
        raise click.BadParameter(f"expected N or WxH with positive integers (e.g. 64 or 64x64), got {value!r}")
    if max(size) > MAX_RESOLUTION:  # each image would take gigabytes: the run ends killed for memory, not in a line
        raise click.BadParameter(f"at most {MAX_RESOLUTION} pixels a side, got {value!r}")
    return size


def write_folder(dest: str, fill: Callable[[Callable[[str, bytes], None]], None]) -> None:
    """Create the folder `dest` (absent or empty, as the official tool requires) with the files that fill(put)
    puts, in a temporary sibling folder renamed at the end: a failed run leaves no partial dataset."""
    if os.path.exists(dest) and not (os.path.isdir(dest) and not os.listdir(dest)):
        raise click.BadParameter(f"{dest}: must be an empty folder, a new folder or a .zip file", param_hint="--dest")
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(os.path.abspath(dest)) + ".", suffix=".tmp", dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700

        def put(name: str, data: bytes) -> None:
            path = os.path.join(tmp, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)

        fill(put)
        if os.path.isdir(dest):
            os.rmdir(dest)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_zip(
    dest: str, entries: Iterator[tuple[str, bytes]], labels: list | None, num_classes: int | None = None
) -> int:
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

    with writing_names("--dest", dest), new_folders_removed_on_failure(dest):
        atomic_write(dest, write)
    return count


@contextlib.contextmanager
def new_folders_removed_on_failure(dest: str) -> Iterator[None]:
    """The folders above dest that do not exist yet are removed again if the block fails: a failed run leaves
    nothing behind."""
    folder = os.path.dirname(os.path.abspath(dest))
    missing = []
    while not os.path.exists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    try:
        yield
    except BaseException:
        for made in missing:
            with contextlib.suppress(OSError):
                os.rmdir(made)
        raise


def check_dest(dest: str, source: str, folder_ok: bool = False) -> None:
    """--dest must name a zip file to be (over)written or, where folder_ok, a new or empty folder, and not the
    --source itself; checked before any work."""
    if os.path.exists(source) and os.path.exists(dest) and os.path.samefile(source, dest):
        raise click.BadParameter(f"{dest} is the --source; write the dataset elsewhere", param_hint="--dest")
    if not dest.lower().endswith(".zip"):
        if not folder_ok:
            raise click.BadParameter(f"expected a .zip file name, got {dest!r}", param_hint="--dest")
        if os.path.exists(dest) and not (os.path.isdir(dest) and not os.listdir(dest)):
            raise click.BadParameter(
                f"{dest}: must be an empty folder, a new folder or a .zip file", param_hint="--dest"
            )
    elif os.path.isdir(dest):
        raise click.BadParameter(f"{dest} is a folder; expected the path of the output zip", param_hint="--dest")
    check_output_path("--dest", dest)


# --- checking a dataset ----------------------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_HEAD = 33  # signature + IHDR chunk (length, type, 13 bytes of data, CRC)
PNG_IEND = b"\0\0\0\0IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
PNG_BIT_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}  # by colour type
NPY_HEAD = 4096  # one read covers the usual 64- or 128-byte header; longer ones are read again in full


class _BadFile(Exception):
    """One thing wrong with one file; the message is the text after '{name}: '."""


def png_header_shape(head: bytes, tail: bytes, size: int) -> list[int]:
    """[C, H, W] of the array ImageFolderDataset would load from a PNG, from its first 33 and last 12 bytes."""
    if size < len(PNG_SIGNATURE) or head[: len(PNG_SIGNATURE)] != PNG_SIGNATURE:
        raise _BadFile("not a PNG file (bad signature)")
    if size < PNG_HEAD:
        raise _BadFile(f"truncated: {size} bytes, shorter than a PNG header")
    length, kind = struct.unpack(">I4s", head[8:16])
    if kind != b"IHDR" or length != 13:
        raise _BadFile(f"first chunk is {kind!r} of {length} bytes, expected a 13-byte IHDR")
    if struct.unpack(">I", head[29:33])[0] != zlib.crc32(head[12:29]):
        raise _BadFile("IHDR chunk fails its CRC")
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", head[16:29])
    if not (0 < width < 2**31 and 0 < height < 2**31):
        raise _BadFile(f"invalid size {width}x{height}")
    if colour not in PNG_BIT_DEPTHS or depth not in PNG_BIT_DEPTHS[colour]:
        raise _BadFile(f"invalid bit depth {depth} for colour type {colour}")
    if compression != 0 or filtering != 0 or interlace not in (0, 1):
        raise _BadFile(f"invalid IHDR methods (compression {compression}, filter {filtering}, interlace {interlace})")
    if colour == 0 and depth == 16:  # Pillow's 'I;16' -> RGB conversion clips every value above 255
        raise _BadFile("16-bit greyscale is unsupported: loading it converts to 8-bit RGB, clipping at 255")
    limit = PIL.Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > 2 * limit:  # Pillow refuses to open these (DecompressionBombError)
        raise _BadFile(f"{width}x{height} is above Pillow's decompression-bomb limit of {2 * limit} pixels")
    if tail != PNG_IEND:
        raise _BadFile("does not end with an IEND chunk (truncated, or data after the end)")
    # _load_raw keeps Pillow's 'L' (8-bit, 4-bit or 2-bit grey) as one channel and converts every other mode
    # (1-bit grey, palette, grey+alpha, RGBA, 16-bit) to 8-bit RGB.
    channels = 1 if colour == 0 and depth in (2, 4, 8) else 3
    return [channels, height, width]


def npy_header_shape(head: bytes, size: int, read_more: Any) -> list[int]:
    """Shape of a .npy file from its header, checking that the data after it is exactly shape x itemsize bytes.
    read_more(n) returns the first n bytes, for headers longer than `head`."""
    try:
        version = np.lib.format.read_magic(io.BytesIO(head))
    except ValueError:
        raise _BadFile("not a .npy file (bad magic string)") from None
    if version not in ((1, 0), (2, 0), (3, 0)):
        raise _BadFile(f"unsupported .npy format version {version[0]}.{version[1]}")
    prefix = 10 if version == (1, 0) else 12
    if len(head) < prefix:
        raise _BadFile(f"truncated: {size} bytes, shorter than a .npy header")
    needed = prefix + struct.unpack("<H" if version == (1, 0) else "<I", head[8:prefix])[0]
    if needed > len(head):
        if needed > size:
            raise _BadFile(f"truncated: {size} bytes, shorter than its {needed}-byte .npy header")
        head = read_more(needed)
    f = io.BytesIO(head)
    np.lib.format.read_magic(f)
    try:
        # Format 3.0 differs from 2.0 only in allowing UTF-8 field names, which the dtype check below refuses.
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _fortran, dtype = read(f)
    except ValueError as e:
        raise _BadFile(f"invalid .npy header ({e})") from None
    wrong = []
    if dtype.kind not in "biuf" or dtype.hasobject:
        wrong.append(f"dtype {dtype} is not numeric")
    if len(shape) != 3:
        wrong.append(f"shape {list(shape)} is not [C, H, W]")
    expected = f.tell() + math.prod(shape) * dtype.itemsize
    if size != expected:
        what = "truncated" if size < expected else "extra bytes"
        wrong.append(f"{what}: {size} bytes, header and shape {list(shape)} {dtype} need {expected}")
    if wrong:
        raise _BadFile("; ".join(wrong))
    return list(shape)


class _FolderReader:
    def __init__(self, root: str):
        self.root = root

    def has(self, name: str) -> bool:
        return os.path.isfile(os.path.join(self.root, name))

    def read(self, name: str) -> bytes:
        with open(os.path.join(self.root, name), "rb") as f:
            return f.read()

    def ends(self, name: str, head: int, tail: int) -> tuple[int, bytes, bytes]:
        """Size, first `head` bytes and last `tail` bytes of a file."""
        with open(os.path.join(self.root, name), "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            first = f.read(min(head, size))
            if tail and size > len(first):
                f.seek(max(size - tail, 0))
                return size, first, f.read(tail)
            return size, first, first[-tail:] if tail else b""


class _ZipReader:
    """Reads pieces of stored members straight from the archive: ZipExtFile.seek reads and CRCs everything it
    skips before Python 3.12, which would read every byte of a PNG just to look at its last 12."""

    def __init__(self, path: str):
        self.zip = zipfile.ZipFile(path)
        self.infos = {i.filename: i for i in self.zip.infolist()}  # the last of duplicate names, as ZipFile.read
        self.file = open(path, "rb", buffering=0)

    def close(self) -> None:
        self.file.close()
        self.zip.close()

    def has(self, name: str) -> bool:
        return name in self.infos

    def read(self, name: str) -> bytes:
        return self.zip.read(name)

    def _pread(self, offset: int, n: int) -> bytes:
        self.file.seek(offset)
        return self.file.read(n)

    def ends(self, name: str, head: int, tail: int) -> tuple[int, bytes, bytes]:
        info = self.infos[name]
        if info.flag_bits & 0x1:
            raise _BadFile("encrypted zip member")
        local = self._pread(info.header_offset, 30 + len(info.orig_filename.encode()) + 64 + head)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise _BadFile("zip member has no valid local file header")
        start = 30 + sum(struct.unpack("<HH", local[26:30]))
        size = info.file_size
        first = local[start : start + min(head, size)]
        if len(first) < min(head, size):
            first = self._pread(info.header_offset + start, min(head, size))
        if len(first) < min(head, size):
            raise _BadFile("zip member extends past the end of the archive")
        if tail and size > len(first):
            last = self._pread(info.header_offset + start + max(size - tail, 0), min(tail, size))
            return size, first, last
        return size, first, first[-tail:] if tail else b""


class _Decoder(ImageFolderDataset):
    """ImageFolderDataset's own file loader without its constructor, which loads (and so stops at) file 0."""

    def __init__(self, path: str, names: list[str]):  # noqa: super().__init__ is skipped on purpose
        self.path, self.names, self._zip, self._zip_pid = path, names, None, None

    def decoded_shape(self, idx: int) -> list[int]:
        self.is_latent = is_array_file(self.names[idx])
        try:
            return list(self._load_raw(idx).shape)
        except DatasetError as e:
            raise _BadFile(f"cannot decode: {e.__cause__ or e}") from None


def dataset_label_problems(meta_bytes: bytes, names: list[str]) -> tuple[str | None, dict[str, str]]:
    """(a problem with dataset.json as a whole or None, {file: problem with its label}) for the files `names`."""
    try:
        meta = json.loads(meta_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"not valid JSON ({e})", {}
    labels = meta.get("labels") if isinstance(meta, dict) else None
    if labels is None:
        return None, {}
    pairs = isinstance(labels, list) and all(
        isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) for e in labels
    )
    if not pairs:
        return "'labels' must be a list of [relative_path, class_index]", {}
    table = dict(labels)
    problems, largest = {}, -1
    for n in names:
        if n not in table:
            problems[n] = "no label in dataset.json"
            continue
        v = table[n]
        integral = (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())
        if not integral or v < 0:
            problems[n] = f"label {v!r} in dataset.json is not a non-negative integer"
        else:
            largest = max(largest, int(v))
    class_names = meta.get("class_names")
    num_classes = meta.get("num_classes", len(class_names) if isinstance(class_names, list) else None)
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes <= largest):
        return f"num_classes {num_classes!r} must be an integer above the largest label {largest}", problems
    return None, problems


# --- commands --------------------------------------------------------------------------------------------


@click.group()
def main() -> None:
    """Prepare datasets for train_edm2.py.

    convert: a plain resize by default, as the official tool (ImageNet needs --transform center-crop-dhariwal),
    PNGs in a zip or a folder. encode: the VAE in float32 on CUDA when available, else the CPU (--device)."""


@main.command()
@click.option("--source", required=True, help="Folder or zip of images (ImageNet layout: a folder per class)")
@click.option(
    "--dest", required=True, help="Output: X.zip (uncompressed) or a folder (new or empty), as the official tool"
)
@click.option(
    "--resolution",
    metavar="WxH",
    callback=parse_resolution,
    help="Output size, WxH (official form, e.g. 64x64) or N for NxN  [default: keep each image's size]",
)
@click.option(
    "--transform",
    type=click.Choice(sorted(TRANSFORMS)),
    default=None,
    help="Crop before resizing  [default: none, as the official tool (this tool's default was center-crop-dhariwal "
    "until issue 21): a plain Lanczos resize to --resolution, not keeping the aspect ratio; ImageNet needs "
    "center-crop-dhariwal]",
)
@click.option("--max-images", type=click.IntRange(min=1), default=None, help="Convert only the first N images")
def convert(
    source: str, dest: str, resolution: tuple[int, int] | None, transform: str | None, max_images: int | None
) -> None:
    """Images -> RGB PNGs of one size with dataset.json labels, in a zip or a folder, as the official tool.

    \b
    Inputs: every image of a folder (recursively) or a zip, in sorted path order; --max-images takes the first N.
    Labels: the source's dataset.json, else (folders) one class per top-level folder in sorted order, the images
    outside every folder being class 0; no labels when that gives one class, for a zip, or when some image has
    no label.
    Outputs: NNNNN/imgNNNNNNNN.png numbered by input position (center-crop-wide skips inputs too small for it,
    leaving gaps) and dataset.json {"labels": [[name, label], ...] or null}.
    Transforms (--resolution WxH): none = resize to WxH; center-crop = centre square resized to WxH;
    center-crop-wide = centre band resized to WxH on a black WxW square (H <= W); center-crop-dhariwal = ADM's
    ImageNet crop (W = H). Outputs must be square; unlike the official tool any size is accepted, not only
    powers of two. The pixels and PNG bytes equal the official tool's.
    """
    check_dest(dest, source, folder_ok=True)
    width, height = resolution if resolution is not None else (None, None)
    if transform is not None and resolution is None:
        raise click.BadParameter(f"--transform {transform} needs --resolution WxH", param_hint="--resolution")
    if transform == "center-crop-wide" and height > width:
        raise click.BadParameter(f"center-crop-wide needs H <= W, got {width}x{height}", param_hint="--resolution")
    if transform != "center-crop-wide" and width != height:
        raise click.BadParameter(
            f"{width}x{height}: outputs must be square (only center-crop-wide takes W != H)", param_hint="--resolution"
        )
    names, labels, num_classes = list_source_images(source)
    names = names[:max_images] if max_images else names
    fn = TRANSFORMS.get(transform, resize)
    out_labels: list[list[Any] | None] = []
    unlabelled: list[str] = []
    size: tuple[int, int] | None = None

    def entries() -> Iterator[tuple[str, bytes]]:
        nonlocal size
        progress = tqdm.tqdm(iterate_source(source, names), total=len(names), desc="convert", unit="img")
        for i, (name, data) in enumerate(progress):
            try:
                with PIL.Image.open(io.BytesIO(data)) as img:
                    img = fn(img.convert("RGB"), width, height)
            except Exception as e:  # noqa: BLE001 - any decoder error names the file
                raise click.ClickException(f"{source}: cannot read {name!r}: {e}") from None
            if img is None:
                continue
            if img.size[0] != img.size[1] or img.size != (size or img.size):
                raise click.ClickException(
                    f"{source}: {name!r} gives a {img.size[0]}x{img.size[1]} image; all outputs must be square and of "
                    f"one size{f' ({size[0]}x{size[1]})' if size else ''}: pass --resolution"
                )
            size = img.size
            digits = f"{i:08d}"  # the official naming: the first five digits name the folder
            out = f"{digits[:5]}/img{digits}.png"
            buf = io.BytesIO()
            # A fresh image without the source's metadata (ICC profile, gamma, ...), which PNG saving would copy.
            PIL.Image.fromarray(np.asarray(img), "RGB").save(buf, format="png", compress_level=0, optimize=False)
            label = labels.get(name) if labels is not None else None
            out_labels.append(None if label is None else [out, label])
            if labels is not None and label is None:
                unlabelled.append(name)
            yield out, buf.getvalue()

    def fill(put: Callable[[str, bytes], None]) -> None:
        for name, data in entries():
            put(name, data)
        if not out_labels:
            raise click.ClickException(f"{source}: no image is large enough for {transform} at {width}x{height}")
        if unlabelled:
            click.echo(
                f"warning: {source}: no label for {unlabelled[0]!r} (and {len(unlabelled) - 1} more); "
                "writing the dataset without labels, as the official tool does",
                err=True,
            )
        complete = all(lab is not None for lab in out_labels)
        meta: dict[str, Any] = {"labels": out_labels if complete else None}
        if complete and num_classes is not None:
            meta["num_classes"] = num_classes
        put("dataset.json", json.dumps(meta).encode())

    if dest.lower().endswith(".zip"):

        def write(tmp: str) -> None:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
                fill(z.writestr)

        with writing_names("--dest", dest), new_folders_removed_on_failure(dest):
            atomic_write(dest, write)
    else:
        with writing_names("--dest", dest), new_folders_removed_on_failure(dest):
            write_folder(dest, fill)
    count = len(out_labels)
    click.echo(f"Wrote {count} image{'' if count == 1 else 's'} of {size[0]}x{size[1]} to {dest}")


@main.command()
@click.option("--source", required=True, help="Zip or folder of PNG images (from `convert`)")
@click.option("--dest", required=True, help="Output zip of raw latents (.npy, 8 channels: posterior mean and std)")
@click.option("--vae", "--model-url", "vae", default=STABILITY_VAE_DEFAULTS["vae_name"], show_default=True,
              help="AutoencoderKL: a Hugging Face hub name or a local directory (from save_pretrained); float32")
@click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True, help="Images per VAE call")
@click.option("--device", default=None,
              help="Where the VAE runs: cpu, cuda or cuda:N  [default: cuda if available, else cpu]")
@click.option("--max-images", type=click.IntRange(min=1), default=None, help="Encode only the first N images")
def encode(source: str, dest: str, vae: str, batch: int, device: str | None, max_images: int | None) -> None:
    """PNG dataset -> Stable Diffusion VAE latent dataset (what --data takes for the img512 presets)."""
    check_dest(dest, source)
    device = check_device_option(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        dataset = ImageFolderDataset(source, use_labels=True)
    except DatasetError as e:
        raise click.BadParameter(str(e), param_hint="--source") from None
    if dataset.is_latent or dataset.num_channels != 3:
        raise click.BadParameter(
            f"{source}: expected RGB .png images, got {dataset.num_channels}-channel "
            f"{'latents' if dataset.is_latent else 'images'}",
            param_hint="--source",
        )
    encoder = StabilityVAEEncoder(vae_name=vae, batch_size=batch)
    try:
        encoder.vae(device)  # before any output: a missing VAE fails at once
    except VAELoadError as e:
        raise click.ClickException(str(e)) from None
    out_labels = [] if dataset.labels is not None else None
    num = min(len(dataset), max_images or len(dataset))

    def entries() -> Iterator[tuple[str, bytes]]:
        with tqdm.tqdm(total=num, desc="encode", unit="img") as bar:
            for first in range(0, num, batch):
                idx = range(first, min(first + batch, num))
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


@main.command()
@click.argument("dataset")
@click.option("--decode", is_flag=True, help="Also decode every file with the training loader (slow; finds bad pixels)")
def check(dataset: str, decode: bool) -> None:
    """Find every bad .png / .npy file of a training dataset (folder or zip) in one pass.

    Reads only headers (and a PNG's last 12 bytes): PNG signature, IHDR and IEND; .npy header, [C, H, W] shape,
    numeric dtype and exact file size; then that all files have the majority's shape and kind, and that each has
    a non-negative integer label when dataset.json has labels. Prints one line per bad file and exits 1 if any.
    """
    start = time.perf_counter()
    try:
        names = list_dataset_files(dataset)
    except DatasetError as e:
        raise click.BadParameter(str(e), param_hint="DATASET") from None
    is_array = {n: is_array_file(n) for n in names}
    reader = _FolderReader(dataset) if os.path.isdir(dataset) else _ZipReader(dataset)
    decoder = _Decoder(dataset, names) if decode else None
    problems: dict[str, list[str]] = collections.defaultdict(list)
    shapes: dict[str, list[int]] = {}
    try:
        for idx, name in enumerate(tqdm.tqdm(names, desc="check", unit="file", file=sys.stderr)):
            try:
                if is_array[name]:
                    size, head, _ = reader.ends(name, NPY_HEAD, 0)
                    shapes[name] = npy_header_shape(head, size, lambda n, name=name: reader.ends(name, n, 0)[1])
                else:
                    size, head, tail = reader.ends(name, PNG_HEAD, len(PNG_IEND))
                    shapes[name] = png_header_shape(head, tail, size)
                if decoder is not None:
                    got = decoder.decoded_shape(idx)
                    if got != shapes[name]:
                        raise _BadFile(f"decodes to shape {got}, its header says {shapes[name]}")
            except _BadFile as e:
                problems[name].append(str(e))
            except OSError as e:
                problems[name].append(f"cannot read: {e}")
        meta_problem, label_problems = None, {}
        if reader.has("dataset.json"):
            meta_problem, label_problems = dataset_label_problems(reader.read("dataset.json"), names)
    finally:
        if isinstance(reader, _ZipReader):
            reader.close()

    # Training takes its kind and shape from file 0; against a bad file 0 the majority says better what is odd.
    kinds = collections.Counter(is_array.values())
    latent = kinds.most_common(1)[0][0]
    counts = collections.Counter(tuple(s) for n, s in shapes.items() if is_array[n] == latent)
    shape = list(counts.most_common(1)[0][0]) if counts else None
    for name in names:
        if is_array[name] != latent:
            majority = ".npy" if latent else ".png"
            ext = os.path.splitext(name)[1]
            problems[name].append(f"a {ext} file among {majority} files (training refuses to mix them)")
        elif name in shapes and shapes[name] != shape:
            problems[name].append(f"shape {shapes[name]} differs from the majority's {shape}")
        if name in label_problems:
            problems[name].append(label_problems[name])
    if meta_problem is not None:
        click.echo(f"dataset.json: {meta_problem}")
    for name in names:
        if problems.get(name):
            click.echo(f"{name}: {'; '.join(problems[name])}")
    elapsed = time.perf_counter() - start
    bad = sum(1 for n in names if problems.get(n))
    click.echo(
        f"{len(names)} files checked in {elapsed:.1f} s ({len(names) / max(elapsed, 1e-9):.0f} files/s): {bad} bad"
        + (" and dataset.json" if meta_problem is not None else "")
    )
    if bad or meta_problem is not None:
        sys.exit(1)


if __name__ == "__main__":
    main()
