"""Deterministic inputs shared by tests/test_official_tools.py and the script that made the official reference
facts in tests/data/official_tools.json (see tests/data/NOTES.md): image folder trees for `dataset_tool.py
convert`, a folder of PNGs for the seeded subset of `calculate_metrics.py`, and two small sets of feature
statistics. numpy and PIL only, so that the script could import it next to the official code."""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile

import numpy as np
import PIL.Image

# (relative path, (width, height), PIL mode); files outside class folders, nested folders, mixed-case names and
# extensions, several modes and aspect ratios (some too small for center-crop-wide at 32x16, so it skips them).
MAIN_TREE = [
    ("top_rgb.png", (40, 24), "RGB"),
    ("Zeta.PNG", (24, 40), "RGB"),
    ("a_cls/img1.jpg", (64, 48), "RGB"),
    ("a_cls/img10.png", (33, 33), "L"),
    ("a_cls/img2.png", (100, 30), "RGBA"),
    ("a_cls/deeper/nest.png", (72, 72), "P"),
    ("B_cls/x.JPEG", (48, 64), "RGB"),
    ("B_cls/y.bmp", (36, 20), "RGB"),
    ("B_cls/z_icc.png", (50, 44), "RGB"),  # carries an ICC profile and a gamma: metadata the output must drop
    ("c_cls/q.tiff", (130, 66), "RGB"),
]
NON_IMAGES = ["notes.txt", "c_cls/readme.txt", "d.v1/README"]

# Folders with their own dataset.json: every image labelled, and one image without a label.
JSON_TREE = [("k/one.png", (20, 20), "RGB"), ("k/two.png", (20, 28), "RGB"), ("m/three.png", (28, 20), "RGB")]
JSON_LABELS = {"k/one.png": 5, "k/two.png": 2, "m/three.png": 7}

# All images in one folder, square and of one size: no labels, and no --resolution needed.
SQUARE_TREE = [("one/a.png", (16, 16), "RGB"), ("one/b.png", (16, 16), "L"), ("one/c.png", (16, 16), "RGB")]

# (case name, source kind, official convert options); source kinds: 'main', 'main_zip', 'json', 'json_partial',
# 'square'. The project's tool takes the same options.
CONVERT_CASES = [
    ("resize", "main", ["--resolution=32x32"]),
    ("center-crop", "main", ["--resolution=32x32", "--transform=center-crop"]),
    ("center-crop-wide", "main", ["--resolution=32x16", "--transform=center-crop-wide"]),
    ("center-crop-dhariwal", "main", ["--resolution=32x32", "--transform=center-crop-dhariwal"]),
    ("max-images", "main", ["--resolution=16x16", "--transform=center-crop", "--max-images=5"]),
    ("zip-source", "main_zip", ["--resolution=16x16", "--transform=center-crop"]),
    ("json-labels", "json", ["--resolution=16x16"]),
    ("json-partial", "json_partial", ["--resolution=16x16"]),
    ("no-resolution", "square", []),
]

# calculate_metrics: a folder of PNGs, and (--num, --seed) pairs for the official seeded subset.
SUBSET_FILES = [f"{c}{i:02d}.png" for c in ("A", "b", "C") for i in range(7)] + ["sub/x.png", "sub/Y.png"]
SUBSET_CASES = [(5, 0), (10, 1), (22, 123456789), (23, 0), (7, 2**31 + 5), (3, -4)]


def _image(rng: np.random.Generator, size: tuple[int, int], mode: str) -> PIL.Image.Image:
    w, h = size
    rgb = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    # a smooth ramp under the noise, so resampling filters give values away from the clipping range
    ramp = (np.linspace(0, 1, w)[None, :, None] * np.linspace(0.2, 1, h)[:, None, None] * 120).astype(np.uint8)
    rgb = (rgb // 2 + ramp).astype(np.uint8)
    img = PIL.Image.fromarray(rgb, "RGB")
    if mode == "L":
        return img.convert("L")
    if mode == "RGBA":
        alpha = rng.integers(0, 256, size=(h, w), dtype=np.uint8)
        return PIL.Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    if mode == "P":
        return img.quantize(colors=32, method=PIL.Image.Quantize.MEDIANCUT)
    return img


def _save(img: PIL.Image.Image, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    ext = path.rsplit(".", 1)[1].lower()
    if ext in ("jpg", "jpeg"):
        img.save(path, format="JPEG", quality=90)
    elif ext == "bmp":
        img.save(path, format="BMP")
    elif ext in ("tif", "tiff"):
        img.save(path, format="TIFF")
    elif "icc" in os.path.basename(path):
        img.save(path, format="PNG", icc_profile=b"not a real profile, only metadata" * 4, gamma=0.45455)
    else:
        img.save(path, format="PNG")


def build_tree(root: str, files: list[tuple[str, tuple[int, int], str]], seed: int) -> str:
    rng = np.random.default_rng(seed)
    for rel, size, mode in files:
        _save(_image(rng, size, mode), os.path.join(root, rel))
    return root


def build_source(kind: str, root: str) -> str:
    """Create the convert source of one kind under `root`; returns the path to pass as --source."""
    if kind in ("main", "main_zip"):
        tree = build_tree(os.path.join(root, "main"), MAIN_TREE, 21)
        for rel in NON_IMAGES:
            os.makedirs(os.path.dirname(os.path.join(tree, rel)) or ".", exist_ok=True)
            with open(os.path.join(tree, rel), "w") as f:
                f.write("not an image\n")
        if kind == "main":
            return tree
        path = os.path.join(root, "main.zip")
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
            for rel, _size, _mode in sorted(MAIN_TREE, reverse=True):  # member order unlike the sorted order
                info = zipfile.ZipInfo(rel, date_time=(2024, 1, 1, 0, 0, 0))
                with open(os.path.join(tree, rel), "rb") as f:
                    z.writestr(info, f.read())
        return path
    if kind in ("json", "json_partial"):
        tree = build_tree(os.path.join(root, kind), JSON_TREE, 22)
        labels = dict(JSON_LABELS)
        if kind == "json_partial":
            del labels["k/two.png"]
        with open(os.path.join(tree, "dataset.json"), "w") as f:
            json.dump({"labels": [[n, c] for n, c in labels.items()]}, f)
        return tree
    if kind == "square":
        return build_tree(os.path.join(root, "square"), SQUARE_TREE, 23)
    raise ValueError(kind)


def build_subset_folder(root: str) -> str:
    rng = np.random.default_rng(24)
    for rel in SUBSET_FILES:
        _save(_image(rng, (8, 8), "RGB"), os.path.join(root, rel))
    return root


def zip_facts(path: str) -> dict:
    """What a converted dataset holds: member names in order, dataset.json, and per image the sha256 of the PNG
    bytes and of the decoded pixels (with their shape)."""
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        facts = {"names": names, "images": {}}
        for n in names:
            data = z.read(n)
            if n == "dataset.json":
                facts["dataset_json"] = json.loads(data)
                facts["dataset_json_sha256"] = hashlib.sha256(data).hexdigest()
                continue
            pixels = np.asarray(PIL.Image.open(io.BytesIO(data)))
            facts["images"][n] = {
                "shape": list(pixels.shape),
                "pixels_sha256": hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest(),
                "png_sha256": hashlib.sha256(data).hexdigest(),
            }
    return facts


def feature_stats(seed: int, dim: int = 6, count: int = 40) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """metric -> (mu, sigma, num_images) of random features, as float64."""
    rng = np.random.default_rng(seed)
    out = {}
    for metric, d in (("fid", dim), ("fd_dinov2", dim + 2)):
        x = rng.standard_normal((count, d)) * rng.uniform(0.5, 2, d) + rng.standard_normal(d)
        out[metric] = (x.mean(0), np.cov(x, rowvar=False), count)
    return out
