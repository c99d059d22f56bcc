"""The built-in demo dataset: small labelled images of coloured shapes, made on the spot.

Ten classes (five shapes, each in a warm and a cool colour family) at random positions, sizes and tints
over a soft background gradient: varied enough to be a real generative task, small enough to learn on a
CPU in minutes. Written as an uncompressed zip of PNGs with dataset.json, exactly like a prepared
dataset, so the demo goes through the same data path as ImageNet.
"""

from __future__ import annotations

import io
import json
import os
import zipfile

import numpy as np

from torch_utils.state_io import atomic_write

SHAPES = ("disc", "square", "triangle", "ring", "cross")
CLASS_NAMES = [f"{family} {shape}" for family in ("warm", "cool") for shape in SHAPES]


def _shape_mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if shape == "disc":
        return dy**2 + dx**2 <= r**2
    if shape == "square":
        return (abs(dy) <= r * 0.85) & (abs(dx) <= r * 0.85)
    if shape == "triangle":
        return (dy <= r * 0.7) & (dy >= -r) & (abs(dx) <= (dy + r) * 0.6)
    if shape == "ring":
        d = np.sqrt(dy**2 + dx**2)
        return (d <= r) & (d >= r * 0.55)
    if shape == "cross":
        return ((abs(dy) <= r * 0.3) & (abs(dx) <= r)) | ((abs(dx) <= r * 0.3) & (abs(dy) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def make_demo_image(label: int, rng: np.random.Generator, resolution: int = 32) -> np.ndarray:
    """One [H, W, 3] uint8 image of class `label` (0..9)."""
    family, shape = divmod(label, len(SHAPES))
    yy, xx = np.mgrid[0:resolution, 0:resolution].astype(np.float32) + 0.5
    bg0, bg1 = rng.uniform(0.1, 0.45, size=3), rng.uniform(0.1, 0.45, size=3)
    t = (yy / resolution)[..., None]
    img = bg0 * (1 - t) + bg1 * t
    base = np.array([0.95, 0.45, 0.15]) if family == 0 else np.array([0.15, 0.55, 0.95])
    color = np.clip(base + rng.normal(0, 0.08, size=3), 0, 1)
    r = rng.uniform(0.2, 0.33) * resolution
    cy, cx = rng.uniform(r, resolution - r, size=2)
    mask = _shape_mask(SHAPES[shape], yy, xx, cy, cx, r)
    img[mask] = color
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def write_demo_dataset(path: str, num_images: int = 2000, resolution: int = 32, seed: int = 0) -> str:
    """Write the demo dataset zip (atomically) unless it already exists; return its path."""
    if os.path.isfile(path):
        return path
    import PIL.Image

    rng = np.random.default_rng(seed)
    labels = []

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
            for i in range(num_images):
                label = i % len(CLASS_NAMES)
                name = f"{i // 1000:05d}/img{i:08d}.png"
                buf = io.BytesIO()
                PIL.Image.fromarray(make_demo_image(label, rng, resolution)).save(buf, format="png")
                z.writestr(name, buf.getvalue())
                labels.append([name, label])
            z.writestr("dataset.json", json.dumps(
                {"labels": labels, "num_classes": len(CLASS_NAMES), "class_names": CLASS_NAMES}
            ))

    atomic_write(path, write)
    return path
