"""EMA-length sweep (EDM2 Fig. 5): reconstruct a range of stds post hoc, score each, plot the curve.

The metric is any callable net -> float (lower is better unless `higher_is_better`):
`edm2.metrics.model_metric(ref, 'fid')` (or 'fd_dinov2') generates images on the fly and scores them against
reference statistics; `validation_loss_metric` scores a network by its EDM2 loss on held-out data with fixed
sigma and noise (cheap, and two calls on the same network give the same number).

    metric = validation_loss_metric(images)
    results = sweep_ema_length('training-runs/00000', '0.02,0.03,...,0.25', metric)
    plot_sweep(results, 'sweep.png'); save_sweep_table(results, 'sweep.json')
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import pathlib
from collections.abc import Callable, Sequence

import numpy as np
import torch

from torch_utils.state_io import atomic_write_bytes

from training.dataset import ImageFolderDataset
from training.loss import EDM2Loss

from .phema_reconstruct import reconstruct


@dataclasses.dataclass
class SweepResult:
    """The scores of one sweep, in the order of the stds."""

    stds: list[float]  # relative stds of the reconstructed EMAs
    values: list[float]  # the metric of each
    kimg: int  # end time of the profiles
    metric: str  # the metric's name, for labels
    higher_is_better: bool = False  # whether the optimum is the maximum

    @property
    def best_index(self) -> int:
        values = np.asarray(self.values, dtype=np.float64)
        values = np.where(np.isfinite(values), values, -np.inf if self.higher_is_better else np.inf)
        return int(np.argmax(values) if self.higher_is_better else np.argmin(values))

    @property
    def best_std(self) -> float:
        return self.stds[self.best_index]

    @property
    def best_value(self) -> float:
        return self.values[self.best_index]

    def to_dict(self) -> dict:
        return dict(dataclasses.asdict(self), best_std=self.best_std, best_value=self.best_value)


def validation_loss_metric(
    images: torch.Tensor | np.ndarray,  # held-out data [N, C, H, W]: raw dataset values (see `encoder`)
    labels: torch.Tensor | np.ndarray | None = None,  # [N] integer or [N, label_dim] float labels; None = none
    encoder=None,  # raw values -> network inputs (training.encoders); None: uint8 -> [-1, 1], floats as is
    P_mean: float = -0.4,  # noise-level distribution, as in training
    P_std: float = 1.0,
    sigma_data: float = 0.5,
    seed: int = 0,  # fixes sigma and noise for every image
    learned_weighting: bool = True,  # False: the EDM loss lambda(sigma) (D - y)^2, without the network's u(sigma)
    repeats: int = 1,  # noise draws per image (averages out the variance of a single draw)
    batch_size: int = 64,  # images per forward pass
    device: torch.device | str = "cpu",
) -> Callable[[torch.nn.Module], float]:
    """A deterministic metric: the mean per-element EDM2 loss (docs/design.md §2) of a network on `images`."""
    images = torch.as_tensor(np.asarray(images) if isinstance(images, np.ndarray) else images)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"validation images must have shape [N, C, H, W] with N > 0, got {list(images.shape)}")
    generator = torch.Generator().manual_seed(seed)
    if encoder is not None:
        images = torch.cat(
            [
                encoder.encode_latents(images[i : i + batch_size], generator=generator)
                for i in range(0, images.shape[0], batch_size)
            ]
        )
    elif images.dtype == torch.uint8:
        images = images.to(torch.float32) / 127.5 - 1
    images = images.to(torch.float32)
    if labels is not None:
        labels = torch.as_tensor(np.asarray(labels) if isinstance(labels, np.ndarray) else labels)
        if labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"validation labels must have {images.shape[0]} rows (one per image), got {list(labels.shape)}"
            )
    if not (isinstance(repeats, int) and repeats >= 1):
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    loss_fn = EDM2Loss(P_mean=P_mean, P_std=P_std, sigma_data=sigma_data, learned_weighting=learned_weighting)
    n = images.shape[0]
    sigmas = [loss_fn.sample_sigma(n, generator=generator) for _ in range(repeats)]
    noises = [torch.randn(images.shape, generator=generator) for _ in range(repeats)]

    @torch.no_grad()
    def metric(net: torch.nn.Module) -> float:
        total, count = 0.0, 0
        for sigma, noise in zip(sigmas, noises):
            for start in range(0, n, batch_size):
                part = slice(start, start + batch_size)
                x = images[part].to(device)
                y = None if labels is None else labels[part].to(device)
                loss = loss_fn(net, x, y, sigma=sigma[part].to(device), noise=noise[part].to(device))
                total += float(loss.double().sum())
                count += loss.numel()
        return total / count

    metric.__name__ = "validation_loss"
    return metric


def load_validation_data(
    path: str | os.PathLike, max_images: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Raw images / latents [N, C, H, W] and labels (or None) from a .npy file, a .npz file with 'images'
    (and 'labels'), or a dataset folder / zip (training.dataset; labels one-hot). At most `max_images`."""
    path = pathlib.Path(path)
    if path.suffix == ".npy":
        images, labels = torch.from_numpy(np.load(path, allow_pickle=False)), None
    elif path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            if "images" not in data.files:
                raise ValueError(f"{path}: expected an array 'images' (and optionally 'labels'), found {data.files}")
            labels = torch.from_numpy(data["labels"]) if "labels" in data.files else None
            images = torch.from_numpy(data["images"])
    else:
        dataset = ImageFolderDataset(str(path), max_size=max_images)
        items = [dataset[i] for i in range(len(dataset))]
        images = torch.stack([x for x, _ in items])
        labels = torch.stack([y for _, y in items]) if dataset.label_dim else None
    if max_images is not None:
        images, labels = images[:max_images], None if labels is None else labels[:max_images]
    return images, labels


def sweep_ema_length(
    snapshots,  # directory of training snapshots, a list of files, or a scan result
    stds: str | Sequence[float],  # the EMA lengths to try (see parse_std_list)
    metric: Callable[[torch.nn.Module], float],  # scores one network
    out_kimg: int | None = None,  # end time of the profiles; None = the latest snapshot
    batch: int = 8,  # reconstructions per pass over the snapshots
    device: torch.device | str = "cpu",
    higher_is_better: bool = False,  # e.g. for a score where more is better
    metric_name: str | None = None,  # label of the metric; default: the callable's name
    progress: bool = True,
) -> SweepResult:
    """Reconstruct every std (never written to disk) and score it with `metric`."""
    scores: dict[float, float] = {}
    kimg = None
    for rec in reconstruct(snapshots, stds, out_kimg=out_kimg, batch=batch, device=device, progress=progress):
        scores[rec.std] = float(metric(rec.net))
        kimg = rec.kimg
        del rec
    ordered = sorted(scores)
    return SweepResult(
        stds=ordered,
        values=[scores[s] for s in ordered],
        kimg=kimg,
        metric=metric_name or getattr(metric, "__name__", "metric"),
        higher_is_better=higher_is_better,
    )


def plot_sweep(result: SweepResult, path: str | os.PathLike, title: str | None = None) -> pathlib.Path:
    """Draw the metric against the EMA length as in the paper's Fig. 5, the optimum marked; PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5), dpi=150)
    ax = fig.add_subplot()
    ax.plot(result.stds, result.values, "-o", markersize=3, linewidth=1.5, label=result.metric)
    ax.plot(
        [result.best_std],
        [result.best_value],
        marker="*",
        markersize=14,
        color="tab:red",
        linestyle="none",
        label=f"optimum: std {result.best_std:.3f}, {result.metric} {result.best_value:.4g}",
    )
    ax.axvline(result.best_std, color="tab:red", linewidth=0.8, linestyle=":")
    ax.set_xlabel(r"EMA length $\sigma_\mathrm{rel}$")
    ax.set_ylabel(result.metric)
    ax.set_title(title or f"Post-hoc EMA sweep at {result.kimg} kimg")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    path = pathlib.Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def save_sweep_table(result: SweepResult, path: str | os.PathLike) -> pathlib.Path:
    """Write the sweep as JSON (.json: the whole result) or CSV (.csv: std, value, is_best)."""
    path = pathlib.Path(path)
    if path.suffix == ".json":
        data = json.dumps(result.to_dict(), indent=2).encode()
    elif path.suffix == ".csv":
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(["std", result.metric, "is_best"])
        for i, (std, value) in enumerate(zip(result.stds, result.values)):
            writer.writerow([f"{std:.6g}", repr(value), int(i == result.best_index)])
        data = text.getvalue().encode()
    else:
        raise ValueError(f"{path}: sweep table must be .json or .csv")
    atomic_write_bytes(path, data)
    return path
