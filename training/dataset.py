"""Datasets of PNG images (pixels) or NPY arrays (raw latents) in a folder or an uncompressed zip (docs/design.md §8).

Labels come from an optional `dataset.json`: {"labels": [[relative_path, class_index], ...]}. With
x-flips the dataset doubles: index i >= N is image i - N mirrored, so augmentation is a pure function of
the index and the data order stays reproducible across restarts and GPU counts.
"""

from __future__ import annotations

import io
import json
import multiprocessing.util
import os
import zipfile
from typing import Any, Iterator

import numpy as np
import torch

IMAGE_EXTENSIONS = (".png",)
ARRAY_EXTENSIONS = (".npy",)


def share_worker_temp_dir() -> None:
    """Call before a DataLoader starts its worker processes. A worker passes each batch's shared memory to the
    main process through a socket in a multiprocessing temp dir; without one in the main process, every worker
    makes its own, which is left behind in /tmp when the worker is stopped, and whose removal at the worker's exit
    can race a batch still being sent and print a traceback. Made here, the workers inherit this process's temp
    dir (without its clean-up, which multiprocessing runs once, at this process's exit, after the workers)."""
    multiprocessing.util.get_temp_dir()


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the file."""


def list_dataset_files(path: str) -> list[str]:
    """The sorted .png / .npy files of a folder or an uncompressed zip (relative, '/'-separated); raises
    DatasetError for a path that is neither, a compressed zip member, or no such files. Whether they mix
    the two kinds is left to the caller: dataset_tool.py check reports the odd ones instead of stopping."""
    if os.path.isdir(path):
        names = [
            os.path.relpath(os.path.join(root, f), path).replace(os.sep, "/")
            for root, _dirs, files in os.walk(path)
            for f in files
        ]
    elif os.path.isfile(path):
        if not zipfile.is_zipfile(path):
            raise DatasetError(f"dataset {path}: not a folder or a zip file")
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            compressed = [i.filename for i in z.infolist() if i.compress_type != zipfile.ZIP_STORED]
        if compressed:
            raise DatasetError(
                f"dataset {path}: zip members must be stored uncompressed, e.g. {compressed[0]!r} is not"
            )
    else:
        raise DatasetError(f"dataset {path}: no such folder or file")
    names = sorted(n for n in names if n.lower().endswith(IMAGE_EXTENSIONS + ARRAY_EXTENSIONS))
    if not names:
        raise DatasetError(f"dataset {path}: holds no .png or .npy files")
    return names


def is_array_file(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in ARRAY_EXTENSIONS


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images ([C, H, W] uint8) or raw latents ([C, H, W] float32) with one-hot labels."""

    def __init__(
        self,
        path: str,  # folder or .zip
        use_labels: bool = True,  # read dataset.json labels; False = unconditional
        xflip: bool = False,  # append mirrored copies
        max_size: int | None = None,  # use only the first max_size files (sorted order)
    ):
        self.path = os.fspath(path)
        self.use_labels = use_labels
        self.xflip = xflip
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid: int | None = None
        names = list_dataset_files(self.path)
        kinds = {is_array_file(n) for n in names}
        if len(kinds) > 1:
            raise DatasetError(f"dataset {self.path}: mixes .png images and .npy arrays; use one kind")
        self.is_latent = kinds.pop()
        self.names = names[:max_size] if max_size is not None else names
        self.num_classes: int | None = None  # from dataset.json when it says; else max label + 1
        self.labels = self._load_labels() if use_labels else None
        first = self._load_raw(0)
        self.raw_shape = list(first.shape)  # [C, H, W]
        self.dtype = first.dtype

    # --- file access -------------------------------------------------------------------------------------

    def _read(self, name: str) -> bytes:
        if os.path.isdir(self.path):
            with open(os.path.join(self.path, name), "rb") as f:
                return f.read()
        if self._zip is None or self._zip_pid != os.getpid():  # one handle per DataLoader worker
            self._zip = zipfile.ZipFile(self.path)
            self._zip_pid = os.getpid()
        return self._zip.read(name)

    def _has(self, name: str) -> bool:
        if os.path.isdir(self.path):
            return os.path.isfile(os.path.join(self.path, name))
        with zipfile.ZipFile(self.path) as z:
            return name in z.namelist()

    def _load_labels(self) -> np.ndarray | None:
        if not self._has("dataset.json"):
            return None
        where = f"{self.path}/dataset.json"
        try:
            meta = json.loads(self._read("dataset.json"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"{where}: not valid JSON ({e})") from e
        labels = meta.get("labels") if isinstance(meta, dict) else None
        if labels is None:
            return None
        try:
            table = {str(name): label for name, label in labels}
        except (TypeError, ValueError) as e:
            raise DatasetError(f"{where}: 'labels' must be a list of [relative_path, class_index]") from e
        for name, label in table.items():  # int() would take 1.5 for class 1 and true for class 1
            integral = isinstance(label, int) and not isinstance(label, bool)
            if not (integral or isinstance(label, float) and label.is_integer()):
                raise DatasetError(f"{where}: the label of {name!r} must be a class index (an integer), got {label!r}")
            table[name] = int(label)
        missing = [n for n in self.names if n not in table]
        if missing:
            raise DatasetError(f"{where}: no label for {len(missing)} file(s), e.g. {missing[0]!r}")
        out = np.array([table[n] for n in self.names], dtype=np.int64)
        if out.min() < 0:
            raise DatasetError(f"{where}: class indices must be non-negative, found {int(out.min())}")
        num_classes = meta.get(
            "num_classes", len(meta["class_names"]) if isinstance(meta.get("class_names"), list) else None
        )
        if num_classes is not None:
            if not isinstance(num_classes, int) or num_classes <= out.max():
                raise DatasetError(
                    f"{where}: num_classes {num_classes!r} must be an integer above the largest label {int(out.max())}"
                )
            self.num_classes = num_classes
        return out

    def _load_raw(self, idx: int) -> np.ndarray:
        name = self.names[idx]
        data = self._read(name)
        try:
            if self.is_latent:
                arr = np.load(io.BytesIO(data), allow_pickle=False)
                if arr.ndim != 3:
                    raise ValueError(f"expected a [C, H, W] array, got shape {arr.shape}")
                return arr.astype(np.float32)
            import PIL.Image

            with PIL.Image.open(io.BytesIO(data)) as img:
                img.load()
                arr = np.asarray(img.convert("RGB") if img.mode not in ("RGB", "L") else img)
            arr = arr[:, :, None] if arr.ndim == 2 else arr
            return arr.transpose(2, 0, 1).copy()  # HWC -> CHW
        except Exception as e:  # noqa: BLE001 - any decoder error becomes one that names the file
            # PIL's "cannot identify image file <_io.BytesIO object at 0x...>" names a buffer, not the file.
            reason = "not a decodable image" if type(e).__name__ == "UnidentifiedImageError" else str(e)
            raise DatasetError(f"dataset {self.path}: cannot read {name!r}: {reason}") from e

    # --- torch Dataset -----------------------------------------------------------------------------------

    @property
    def label_dim(self) -> int:
        if self.labels is None:
            return 0
        return self.num_classes if self.num_classes is not None else int(self.labels.max()) + 1

    @property
    def resolution(self) -> int:
        return self.raw_shape[2]

    @property
    def num_channels(self) -> int:
        return self.raw_shape[0]

    def __len__(self) -> int:
        return len(self.names) * (2 if self.xflip else 1)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.names)
        arr = self._load_raw(idx % n)
        if list(arr.shape) != self.raw_shape:
            raise DatasetError(
                f"dataset {self.path}: {self.names[idx % n]!r} has shape {list(arr.shape)}, expected {self.raw_shape}"
            )
        if idx >= n:
            arr = arr[:, :, ::-1].copy()
        label = torch.zeros(self.label_dim, dtype=torch.float32)
        if self.labels is not None:
            label[self.labels[idx % n]] = 1
        return torch.from_numpy(arr), label

    def describe(self) -> dict[str, Any]:
        return dict(
            path=self.path, num_files=len(self.names), xflip=self.xflip, raw_shape=self.raw_shape,
            latent=self.is_latent, label_dim=self.label_dim,
        )


def batch_chunk(rnd: int, rank: int, world_size: int, batch_gpu: int) -> slice:
    """The images of accumulation round `rnd` on process `rank` within a step's global batch: chunk
    (round * world_size + rank) of batch_gpu. The sampler picks that chunk's images and the training loop its
    noise levels and noise from it, so the two always agree."""
    start = (rnd * world_size + rank) * batch_gpu
    return slice(start, start + batch_gpu)


class InfiniteSampler(torch.utils.data.Sampler):
    """Endless, reproducible order of dataset indices that can resume at any step.

    Global position p (images counted from the start of training) maps to epoch p // N and a seeded
    permutation of that epoch. A step covers positions [step * batch, (step + 1) * batch); it is cut into
    `rounds * world_size` chunks of batch_gpu, chunk (round, rank) at offset (round * world_size + rank).
    So the global batch of every step is the same whatever the number of GPUs or accumulation rounds.
    """

    def __init__(
        self,
        dataset_size: int,  # len(dataset)
        batch_size: int,  # images per optimizer step, all GPUs together
        batch_gpu: int,  # images per GPU per accumulation round
        rank: int = 0,  # this process
        world_size: int = 1,  # processes
        seed: int = 0,  # shuffling seed
        start_step: int = 0,  # resume here
    ):
        if batch_size % (batch_gpu * world_size) != 0:
            raise ValueError(f"batch {batch_size} is not divisible by batch_gpu {batch_gpu} x {world_size} GPU(s)")
        self.size = dataset_size
        self.batch_size = batch_size
        self.batch_gpu = batch_gpu
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start_step = start_step
        self.rounds = batch_size // (batch_gpu * world_size)

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=g)

    def __iter__(self) -> Iterator[int]:
        epoch, perm = -1, None
        step = self.start_step
        while True:
            for rnd in range(self.rounds):
                chunk = batch_chunk(rnd, self.rank, self.world_size, self.batch_gpu)
                for pos in range(step * self.batch_size + chunk.start, step * self.batch_size + chunk.stop):
                    if pos // self.size != epoch:
                        epoch = pos // self.size
                        perm = self._permutation(epoch)
                    yield int(perm[pos % self.size])
            step += 1
