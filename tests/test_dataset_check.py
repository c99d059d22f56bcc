"""dataset_tool.py check: every bad file of a folder or zip dataset reported in one header-only pass."""

from __future__ import annotations

import io
import json
import pathlib
import struct
import zipfile
import zlib

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import dataset_tool
from training.dataset import ImageFolderDataset


def png_bytes(h: int = 8, w: int = 8) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(buf, format="png")
    return buf.getvalue()


def npy_bytes(shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.zeros(shape, np.float32))
    return buf.getvalue()


def raw_png(width: int, height: int, depth: int, colour: int, idat: bytes | None = None) -> bytes:
    """A PNG written chunk by chunk, for the colour types and bit depths Pillow does not save."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    samples = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour]
    row = b"\0" + bytes(range(7, 7 + (width * samples * depth + 7) // 8))
    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))
    if colour == 3:
        out += chunk(b"PLTE", bytes(range(256)) * 3)
    return out + chunk(b"IDAT", zlib.compress(row * height) if idat is None else idat) + chunk(b"IEND", b"")


def write(files: dict[str, bytes], dest: pathlib.Path, as_zip: bool) -> str:
    if as_zip:
        with zipfile.ZipFile(dest.with_suffix(".zip"), "w") as z:
            for name, data in files.items():
                z.writestr(name, data)
        return str(dest.with_suffix(".zip"))
    for name, data in files.items():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_bytes(data)
    return str(dest)


def run(path: str, *args: str):
    return CliRunner().invoke(dataset_tool.main, ["check", path, *args])


def labels(names: list[str]) -> bytes:
    return json.dumps({"labels": [[n, i % 3] for i, n in enumerate(names)]}).encode()


@pytest.mark.parametrize("as_zip", [False, True], ids=["folder", "zip"])
def test_every_bad_file_is_reported_in_one_run(tmp_path, as_zip):
    good = {f"a/{i:02d}.png": png_bytes() for i in range(6)}
    bad = {
        "b/truncated.png": png_bytes()[:-30],
        "b/wrong_size.png": png_bytes(8, 16),
        "b/not_png.png": b"GIF89a this is not a png at all, and long enough to hold a header",
        "c/wrong_shape.npy": npy_bytes((8, 8)),
        "c/truncated.npy": npy_bytes((3, 8, 8))[:-7],
        "d/no_label.png": png_bytes(),
    }
    files = {**good, **bad}
    files["dataset.json"] = labels([n for n in files if n != "d/no_label.png"])
    result = run(write(files, tmp_path, as_zip))
    assert result.exit_code == 1, result.output
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines()[:-1])
    assert sorted(lines) == sorted(bad)
    assert "IEND" in lines["b/truncated.png"]
    assert "shape [3, 8, 16] differs from the majority's [3, 8, 8]" in lines["b/wrong_size.png"]
    assert "not a PNG file" in lines["b/not_png.png"]
    assert "shape [8, 8] is not [C, H, W]" in lines["c/wrong_shape.npy"]
    assert "truncated" in lines["c/truncated.npy"] and "among .png files" in lines["c/truncated.npy"]
    assert lines["d/no_label.png"] == "no label in dataset.json"
    assert "12 files checked in" in result.stdout.splitlines()[-1] and result.stdout.endswith(": 6 bad\n")


@pytest.mark.parametrize("as_zip", [False, True], ids=["folder", "zip"])
def test_clean_dataset_passes(tmp_path, as_zip):
    files = {f"{i:05d}.png": png_bytes() for i in range(5)}
    files["dataset.json"] = labels(list(files))
    result = run(write(files, tmp_path, as_zip), "--decode")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("5 files checked in ") and result.stdout.endswith(": 0 bad\n")


@pytest.mark.parametrize("as_zip", [False, True], ids=["folder", "zip"])
def test_latent_dataset(tmp_path, as_zip):
    files = {f"{i}.npy": npy_bytes((4, 8, 8)) for i in range(4)}
    files["small.npy"] = npy_bytes((4, 4, 4))
    files["long.npy"] = npy_bytes((4, 8, 8)) + b"xx"
    files["z.npy"] = b"not an array"
    result = run(write(files, tmp_path, as_zip))
    assert result.exit_code == 1
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines()[:-1])
    assert sorted(lines) == ["long.npy", "small.npy", "z.npy"]
    assert "differs from the majority's [4, 8, 8]" in lines["small.npy"]
    assert lines["long.npy"].startswith("extra bytes") and "bad magic" in lines["z.npy"]


def test_decode_catches_corrupt_data_after_a_good_header(tmp_path):
    files = {f"{i}.png": raw_png(8, 8, 8, 2) for i in range(3)}
    files["3.png"] = raw_png(8, 8, 8, 2, idat=b"\x78\x9c garbage that does not inflate")
    path = write(files, tmp_path, as_zip=True)
    assert run(path).exit_code == 0  # headers alone cannot see it
    result = run(path, "--decode")
    assert result.exit_code == 1 and result.stdout.startswith("3.png: cannot decode: ")


@pytest.mark.parametrize("colour,depth", [(c, d) for c, ds in dataset_tool.PNG_BIT_DEPTHS.items() for d in ds])
def test_png_channels_match_the_loader(tmp_path, colour, depth):
    data = raw_png(5, 3, depth, colour)
    args = data[: dataset_tool.PNG_HEAD], data[-len(dataset_tool.PNG_IEND) :], len(data)
    (tmp_path / "x.png").write_bytes(data)
    if (colour, depth) == (0, 16):
        with pytest.raises(dataset_tool._BadFile, match="16-bit greyscale"):
            dataset_tool.png_header_shape(*args)
        return
    loaded = ImageFolderDataset(str(tmp_path), use_labels=False)
    assert dataset_tool.png_header_shape(*args) == loaded.raw_shape and loaded.dtype == np.uint8


def test_dataset_json_problems(tmp_path):
    files = {f"{i}.png": png_bytes() for i in range(3)}
    meta = {"labels": [["0.png", 0], ["1.png", 1.5], ["2.png", 2]], "num_classes": 2}
    files["dataset.json"] = json.dumps(meta).encode()
    result = run(write(files, tmp_path, as_zip=False))
    assert result.exit_code == 1
    out = result.stdout.splitlines()
    assert out[0] == "dataset.json: num_classes 2 must be an integer above the largest label 2"
    assert out[1] == "1.png: label 1.5 in dataset.json is not a non-negative integer"
    assert out[2].endswith(": 1 bad and dataset.json")
    (tmp_path / "dataset.json").write_text("{not json")
    result = run(str(tmp_path))
    assert result.exit_code == 1 and result.stdout.startswith("dataset.json: not valid JSON")


def test_unusable_path_is_one_line(tmp_path):
    result = run(str(tmp_path / "missing"))
    assert result.exit_code == 2 and "no such folder or file" in result.output and "Traceback" not in result.output


def test_zip_members_with_a_long_extra_field(tmp_path):
    path = tmp_path / "extra.zip"
    extra = struct.pack("<HH", 0xCAFE, 296) + bytes(296)  # longer than the bytes read with the local header
    with zipfile.ZipFile(path, "w") as z:
        for i, data in enumerate([png_bytes(), png_bytes(), png_bytes()[:-1]]):
            info = zipfile.ZipInfo(f"{i}.png")
            info.extra = extra
            z.writestr(info, data)
    result = run(str(path))
    assert result.exit_code == 1 and result.stdout.startswith("2.png: does not end with an IEND chunk")
    assert result.stdout.endswith(": 1 bad\n")
