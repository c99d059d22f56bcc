"""FID and FD_DINOv2 (docs/design.md §8): feature statistics, reference files, the Frechet distance, images and models.

    ref = edm2.metrics.dataset_statistics('img512.zip')                  # {'fid': stats, 'fd_dinov2': stats}
    edm2.metrics.save_reference('img512-ref.npz', ref)
    edm2.metrics.calc_metrics_for_images('samples/', 'img512-ref.npz')   # {'fid': 2.31, 'fd_dinov2': 52.4}
    edm2.metrics.calc_metrics_for_model(net, 'img512-ref.npz', seeds=range(50000))   # nothing written

A metric is the Frechet distance between Gaussians fitted to detector features of two image sets:
FD = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)). Features are accumulated as float64 sums (sum x and
sum x x^T) per process and summed over processes (torchrun), so the statistics do not depend on the image
order, the batch size or the number of GPUs beyond float64 rounding. Covariances are unbiased (divide by
N - 1, as numpy.cov).

Reference files are .npz (no pickles): `{metric}/mu`, `{metric}/sigma` per metric and `meta_json` (uint8
bytes of JSON: format, version, number of images and feature width per metric, detector description,
source). The official EDM2 reference pickles (`dataset-refs/img512.pkl`, dicts {metric: {'mu', 'sigma'}})
are read too, through edm2's allow-listed unpickler; `save_reference` to a .pkl writes that layout (plain
dicts and arrays, no metadata beyond `num_images`) for the official calculate_metrics.py.

With `num` below the number of images, the images are the official tool's seeded subset (`official_subset`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import pathlib
import pickle
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import scipy.linalg
import torch
import tqdm

from torch_utils import distributed as dist
from torch_utils.state_io import atomic_write_bytes
from training.dataset import DatasetError, ImageFolderDataset, share_worker_temp_dir

from .detectors import METRICS, load_detector
from .download import resolve_path_or_url
from .generation import generate_batch, generation_encoder, process_batches, resolve_settings
from .guidance import GuidedDenoiser
from .official_pickle import load_official_pickle

REFERENCE_FORMAT = "edm2-metric-reference"
REFERENCE_VERSION = 1
DEFAULT_NUM_IMAGES = 50000


class MetricsError(ValueError):
    """Input that the metrics cannot use; the message names the file or argument."""


# ----------------------------------------------------------------------------------------------------------
# Statistics


@dataclasses.dataclass
class FeatureStatistics:
    """Mean and covariance of one detector's features over a set of images."""

    metric: str  # 'fid' or 'fd_dinov2'
    mu: np.ndarray  # float64 [D]
    sigma: np.ndarray  # float64 [D, D], unbiased
    num_images: int  # images the statistics were computed from
    detector: dict[str, Any] | None = None  # which detector made them (architecture, weight file name)

    @property
    def feature_dim(self) -> int:
        return int(self.mu.shape[0])


class FeatureAccumulator:
    """Running float64 sums of features and their outer products (on the features' device)."""

    def __init__(self, feature_dim: int, device: torch.device | str = "cpu"):
        self.num = 0
        self.sum = torch.zeros(feature_dim, dtype=torch.float64, device=device)
        self.sum_outer = torch.zeros(feature_dim, feature_dim, dtype=torch.float64, device=device)

    def update(self, features: torch.Tensor) -> None:
        """Add features [N, D]."""
        if features.ndim != 2 or features.shape[1] != self.sum.shape[0]:
            raise ValueError(f"features must have shape [N, {self.sum.shape[0]}], got {list(features.shape)}")
        x = features.to(self.sum.device, torch.float64)
        self.num += x.shape[0]
        self.sum += x.sum(dim=0)
        self.sum_outer += x.T @ x

    def all_reduce(self) -> FeatureAccumulator:
        """Sum the accumulators of all processes (a lone process keeps its own)."""
        if dist.is_initialized():
            backend_device = dist.device() if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
            count = torch.tensor([float(self.num)], dtype=torch.float64, device=backend_device)
            tensors = [count, self.sum.to(backend_device), self.sum_outer.to(backend_device)]
            for t in tensors:
                torch.distributed.all_reduce(t)
            self.num = round(count.item())
            self.sum, self.sum_outer = tensors[1].to(self.sum.device), tensors[2].to(self.sum_outer.device)
        return self

    def statistics(self, metric: str, detector: dict[str, Any] | None = None) -> FeatureStatistics:
        if self.num < 2:
            raise MetricsError(f"{metric}: need at least 2 images for a covariance, got {self.num}")
        n = self.num
        mu = (self.sum / n).cpu().numpy()
        sigma = ((self.sum_outer - n * torch.outer(self.sum / n, self.sum / n)) / (n - 1)).cpu().numpy()
        sigma = (sigma + sigma.T) / 2  # exact symmetry (the sums are symmetric up to rounding)
        return FeatureStatistics(metric=metric, mu=mu, sigma=sigma, num_images=n, detector=detector)


# ----------------------------------------------------------------------------------------------------------
# Frechet distance


def _trace_sqrt_product_eig(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr(sqrtm(S1 S2)) for PSD S1, S2 via the symmetric form: the eigenvalues of S1 S2 are those of
    S1^1/2 S2 S1^1/2 (PSD), so the trace is the sum of their square roots. Robust to singular covariances."""
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(eig, 0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)) in float64 (docs/design.md §8), clamped at 0.

    sqrtm is scipy's; its result may carry tiny imaginary parts (rounding of a nearly singular product),
    which are dropped. When it fails (non-finite entries, or imaginary parts that are not tiny, which happens
    for singular covariances, e.g. fewer images than feature dimensions), the trace is computed from the
    eigenvalues of S1^1/2 S2 S1^1/2 instead, which is the same quantity for PSD matrices.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"frechet_distance: shapes do not match: mu {mu1.shape} / {mu2.shape}, "
            f"sigma {sigma1.shape} / {sigma2.shape}"
        )
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns about singular matrices; the result is checked below
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    scale = max(1.0, float(np.trace(sigma1) + np.trace(sigma2)))
    if np.all(np.isfinite(covmean)) and (
        not np.iscomplexobj(covmean) or np.abs(np.diagonal(covmean).imag).max() <= 1e-6 * scale
    ):
        trace_covmean = float(np.trace(covmean).real)
    else:
        trace_covmean = _trace_sqrt_product_eig(sigma1, sigma2)
    fd = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_covmean)
    return max(fd, 0.0)  # FD >= 0; a tiny negative value is rounding


# ----------------------------------------------------------------------------------------------------------
# Reference files


def save_reference(
    path: str | os.PathLike,
    stats: dict[str, FeatureStatistics],
    source: str | None = None,  # what the statistics describe (e.g. the dataset path), stored in the metadata
) -> pathlib.Path:
    """Write reference statistics atomically: .npz (arrays and JSON metadata only) or, for a .pkl, the official
    EDM2 layout {'num_images': N, metric: {'mu', 'sigma'}, ...} that the official calculate_metrics.py reads."""
    path = pathlib.Path(path)
    if path.suffix not in (".npz", ".pkl"):
        raise MetricsError(f"{path}: reference statistics are written as .npz (this project's) or .pkl (official)")
    if not stats:
        raise MetricsError(f"{path}: no statistics to write")
    if path.suffix == ".pkl":
        atomic_write_bytes(path, _official_reference_bytes(stats))
        return path
    meta = {
        "format": REFERENCE_FORMAT,
        "version": REFERENCE_VERSION,
        "source": source,
        "metrics": {
            m: {"num_images": s.num_images, "feature_dim": s.feature_dim, "detector": s.detector}
            for m, s in stats.items()
        },
    }
    arrays: dict[str, np.ndarray] = {"meta_json": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
    for metric, s in stats.items():
        arrays[f"{metric}/mu"] = np.asarray(s.mu, np.float64)
        arrays[f"{metric}/sigma"] = np.asarray(s.sigma, np.float64)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())
    return path


class _PortableArrayPickler(pickle.Pickler):
    """Pickles numpy arrays as `numpy.ndarray(shape, dtype, bytearray)`: a name every numpy version has, unlike
    the `numpy._core` module path of numpy 2's own reduction, which numpy 1.x cannot import (tests/data/NOTES.md:
    checked with 1.24.4). The arrays load writable, with the data as written."""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is np.ndarray:
            a = np.ascontiguousarray(obj)
            return np.ndarray, (a.shape, a.dtype.str, bytearray(a.tobytes()))
        return NotImplemented


def _official_reference_bytes(stats: dict[str, FeatureStatistics]) -> bytes:
    """The official reference pickle: {'num_images': N, metric: {'mu': float64 [D], 'sigma': float64 [D, D]}}."""
    counts = {s.num_images for s in stats.values()}
    data: dict[str, Any] = {"num_images": counts.pop() if len(counts) == 1 else max(counts)}
    for metric, s in stats.items():
        data[metric] = {"mu": np.asarray(s.mu, np.float64), "sigma": np.asarray(s.sigma, np.float64)}
    buffer = io.BytesIO()
    _PortableArrayPickler(buffer, protocol=4).dump(data)
    return buffer.getvalue()


def load_reference(path_or_url: str | os.PathLike) -> dict[str, FeatureStatistics]:
    """Reference statistics from a file of `save_reference` (.npz) or an official EDM2 reference .pkl
    (local path or http(s) URL, downloaded into the cache)."""
    try:
        path = resolve_path_or_url(path_or_url)
    except (OSError, ValueError) as e:
        raise MetricsError(f"reference {path_or_url}: {e}") from e
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"PK":
        return _load_npz_reference(path)
    if magic[:1] == b"\x80":
        return _load_official_reference(path)
    raise MetricsError(
        f"{path}: not a reference file (expected an .npz from `calculate_metrics.py ref` or an EDM2 .pkl)"
    )


def _check_stats(path: pathlib.Path, metric: str, mu: Any, sigma: Any) -> tuple[np.ndarray, np.ndarray]:
    mu, sigma = np.asarray(mu), np.asarray(sigma)
    d = mu.shape[0] if mu.ndim == 1 else -1
    if d < 1 or sigma.shape != (d, d) or not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise MetricsError(
            f"{path}: {metric}: expected finite mu [D] and sigma [D, D], got {mu.shape} and {sigma.shape}"
        )
    return mu.astype(np.float64), sigma.astype(np.float64)


def _load_npz_reference(path: pathlib.Path) -> dict[str, FeatureStatistics]:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:  # truncated, a flipped byte
        raise MetricsError(f"{path}: cannot read reference statistics: {e}") from e
    try:
        meta = json.loads(bytes(arrays.pop("meta_json")))
    except (KeyError, ValueError) as e:
        raise MetricsError(f"{path}: not a reference of calculate_metrics.py (no readable meta_json)") from e
    if meta.get("format") != REFERENCE_FORMAT or meta.get("version") != REFERENCE_VERSION:
        raise MetricsError(
            f"{path}: format {meta.get('format')!r} version {meta.get('version')!r} is not "
            f"{REFERENCE_FORMAT!r} version {REFERENCE_VERSION}"
        )
    out = {}
    for metric, info in meta.get("metrics", {}).items():
        if f"{metric}/mu" not in arrays or f"{metric}/sigma" not in arrays:
            raise MetricsError(
                f"{path}: metadata lists {metric!r} but the arrays {metric}/mu, {metric}/sigma are missing"
            )
        mu, sigma = _check_stats(path, metric, arrays[f"{metric}/mu"], arrays[f"{metric}/sigma"])
        out[metric] = FeatureStatistics(metric, mu, sigma, int(info.get("num_images", 0)), info.get("detector"))
    return out


def _load_official_reference(path: pathlib.Path) -> dict[str, FeatureStatistics]:
    data = load_official_pickle(path)
    if not isinstance(data, dict) or not any(isinstance(v, dict) and "mu" in v for v in data.values()):
        raise MetricsError(f"{path}: expected a dict {{metric: {{'mu', 'sigma'}}}} of reference statistics")
    count = data.get("num_images")
    count = int(count) if isinstance(count, (int, np.integer)) and not isinstance(count, bool) else 0
    out = {}
    for metric, value in data.items():
        if isinstance(value, dict) and "mu" in value and "sigma" in value:
            mu, sigma = _check_stats(path, metric, value["mu"], value["sigma"])
            out[str(metric)] = FeatureStatistics(str(metric), mu, sigma, count, None)
    return out


# ----------------------------------------------------------------------------------------------------------
# Detectors


def detector_description(detector: torch.nn.Module, weights: str | os.PathLike | None = None) -> dict[str, Any]:
    """What identifies a detector's features: its architecture and the name of its weight file."""
    return {
        "class": type(detector).__name__,
        "kwargs": dict(getattr(detector, "init_kwargs", {})),
        "weights": None if weights is None else pathlib.PurePath(str(weights)).name,
    }


def load_detectors(
    metrics: Sequence[str],
    weights: dict[str, str | os.PathLike | None] | None = None,  # metric -> file / URL (None: env var, download)
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict[str, torch.nn.Module]:
    """metric -> detector. Under torchrun rank 0 loads (and downloads) first, the others then read the cache."""
    device = torch.device(device) if device is not None else dist.device()
    out = {}
    if not dist.is_main():
        dist.barrier()
    try:
        for metric in metrics:
            source = (weights or {}).get(metric)
            detector = load_detector(metric, source, device=device, progress=progress and dist.is_main())
            detector.description = detector_description(detector, getattr(detector, "weights_path", None))
            out[metric] = detector
    finally:
        if dist.is_main():
            dist.barrier()
    return out


@contextlib.contextmanager
def _full_precision_matmuls() -> Iterator[None]:
    """No TF32 in the detectors (cuDNN enables it for convolutions by default; it moves FID)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@torch.no_grad()
def compute_statistics(
    batches: Iterable[torch.Tensor],  # uint8 [B, 3, H, W] batches of this process
    detectors: dict[str, torch.nn.Module],  # metric -> detector
    total: int | None = None,  # images of this process (for the progress bar)
    progress: bool = True,
    desc: str = "features",
) -> dict[str, FeatureStatistics]:
    """Statistics of every detector's features over the images of all processes (summed over ranks)."""
    if not detectors:
        raise MetricsError("no metrics to compute")
    accumulators = {m: FeatureAccumulator(d.feature_dim, next(d.parameters()).device) for m, d in detectors.items()}
    bar = tqdm.tqdm(total=total, unit="img", desc=desc, disable=not (progress and dist.is_main()))
    with bar, _full_precision_matmuls():
        for images in batches:
            for metric, detector in detectors.items():
                device = next(detector.parameters()).device
                accumulators[metric].update(detector(images.to(device)))
            bar.update(images.shape[0])
    return {
        m: acc.all_reduce().statistics(m, getattr(detectors[m], "description", None)) for m, acc in accumulators.items()
    }


# ----------------------------------------------------------------------------------------------------------
# Image sources


def open_image_dataset(path: str | os.PathLike, num: int | None = None):
    """The PNG images of a folder or zip (training.dataset), checked: RGB or grayscale, at least `num` images."""
    try:
        dataset = ImageFolderDataset(os.fspath(path), use_labels=False)
    except DatasetError as e:
        raise MetricsError(str(e)) from e
    if dataset.is_latent:
        raise MetricsError(f"{path}: holds .npy arrays (latents); metrics need PNG images (decode them first)")
    if dataset.num_channels not in (1, 3):
        raise MetricsError(f"{path}: images have {dataset.num_channels} channels; expected RGB (3) or grayscale (1)")
    if num is not None and len(dataset) < num:
        noun = "image" if len(dataset) == 1 else "images"
        raise MetricsError(f"{path}: holds {len(dataset)} {noun}, fewer than the {num} asked for (--num)")
    return dataset


def official_subset(total: int, num: int | None, seed: int = 0) -> list[int]:
    """Indices (ascending) of the `num` of `total` sorted images that the official calculate_metrics.py uses: all
    of them when num is None or not below total, else the first num of a numpy RandomState(seed mod 2^31)
    shuffle of 0..total-1, sorted (the official dataset's max_size / random_seed)."""
    indices = np.arange(total, dtype=np.int64)
    if num is not None and total > num:
        np.random.RandomState(seed % (1 << 31)).shuffle(indices)
        indices = np.sort(indices[:num])
    return [int(i) for i in indices]


def _stack_images(items: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    images = torch.stack([x for x, _ in items])
    return images.expand(-1, 3, -1, -1).contiguous() if images.shape[1] == 1 else images  # grayscale -> RGB


def iterate_dataset_images(
    dataset,  # open_image_dataset(...)
    indices: Sequence[int],  # the images of this process
    batch_size: int = 64,
    workers: int = 2,  # DataLoader worker processes decoding PNGs
) -> Iterator[torch.Tensor]:
    """uint8 [B, 3, H, W] batches of the given images (mixed sizes raise an error naming the file)."""
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, list(indices)),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_stack_images,
        prefetch_factor=2 if workers > 0 else None,
    )
    if workers > 0:
        share_worker_temp_dir()
    try:
        yield from loader
    except DatasetError as e:
        # From a worker process the message holds the worker's traceback; its last line is the dataset's.
        message = str(e).strip().splitlines()[-1]
        raise MetricsError(message.split("DatasetError: ", 1)[-1]) from e


def iterate_generated_images(
    net: torch.nn.Module,
    seeds: Sequence[int],
    batch_size: int = 32,
    gnet: torch.nn.Module | None = None,
    encoder_settings: dict[str, Any] | None = None,
    class_idx: int | None = None,
    device: torch.device | str | None = None,
    **sampler_kwargs: Any,
) -> tuple[Iterator[torch.Tensor], int]:
    """(uint8 batches of this process, their image count): the seeds cut into global batches as generate.py
    does (same images for any number of GPUs), every world_size-th batch for this rank. Nothing is written."""
    settings = resolve_settings(sampler_kwargs.pop("settings", None), sampler_kwargs)  # checked once, here
    denoiser = GuidedDenoiser.from_settings(net, None, gnet, settings)
    encoder = generation_encoder(net, encoder_settings)
    device = torch.device(device) if device is not None else dist.device()
    my_batches = process_batches(seeds, batch_size)

    def batches() -> Iterator[torch.Tensor]:
        for batch in my_batches:
            yield generate_batch(net, batch, gnet, encoder, class_idx, device, settings=settings, denoiser=denoiser)

    return batches(), sum(len(b) for b in my_batches)


# ----------------------------------------------------------------------------------------------------------
# The three tasks: reference statistics, images against a reference, a model against a reference


def _metric_list(metrics: str | Sequence[str] | None, default: Sequence[str]) -> list[str]:
    if metrics is None:
        return list(default)
    items = [m.strip() for m in metrics.split(",")] if isinstance(metrics, str) else list(metrics)
    items = [m for m in items if m]
    unknown = [m for m in items if m not in METRICS]
    if not items or unknown:
        raise MetricsError(f"metrics must be a non-empty list of {', '.join(METRICS)}; got {metrics!r}")
    return list(dict.fromkeys(items))


def dataset_statistics(
    path: str | os.PathLike,
    metrics: str | Sequence[str] | None = None,  # default: all ('fid', 'fd_dinov2')
    num: int | None = None,  # None = all; else `num` images chosen as the official tool does (official_subset)
    seed: int = 0,  # the official --seed of that choice
    batch_size: int = 64,  # images per detector call and process
    detectors: dict[str, torch.nn.Module] | None = None,  # preloaded; default: load_detectors(metrics, weights)
    weights: dict[str, str | os.PathLike | None] | None = None,
    device: torch.device | str | None = None,
    workers: int = 2,
    progress: bool = True,
) -> dict[str, FeatureStatistics]:
    """Feature statistics of a folder / zip of PNG images (works under torchrun: images split over ranks)."""
    metrics = _metric_list(metrics, METRICS)
    if num is not None and num < 2:
        raise MetricsError(f"need at least 2 images for a covariance (--num), got {num}")
    dataset = open_image_dataset(path, num)
    chosen = official_subset(len(dataset), num, seed)
    detectors = detectors if detectors is not None else load_detectors(metrics, weights, device, progress)
    mine = dist.split_for_rank(chosen)
    batches = iterate_dataset_images(dataset, mine, batch_size, workers)
    return compute_statistics(batches, {m: detectors[m] for m in metrics}, len(mine), progress, desc="images")


def model_statistics(
    net: torch.nn.Module,
    seeds: Sequence[int] = range(DEFAULT_NUM_IMAGES),
    metrics: str | Sequence[str] | None = None,
    batch_size: int = 32,  # images per sampler call and process
    gnet: torch.nn.Module | None = None,
    encoder_settings: dict[str, Any] | None = None,  # the model file's encoder (None: pixels for 3 channels)
    class_idx: int | None = None,
    detectors: dict[str, torch.nn.Module] | None = None,
    weights: dict[str, str | os.PathLike | None] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    **sampler_kwargs: Any,  # to edm2.sampling.sampling_settings (solver, num_steps, guidance, ...)
) -> dict[str, FeatureStatistics]:
    """Feature statistics of images generated on the fly, one per seed; no image touches the disk."""
    metrics = _metric_list(metrics, METRICS)
    if len(seeds) < 2:
        raise MetricsError(f"need at least 2 seeds for a covariance (--seeds, or --num), got {len(seeds)}")
    detectors = detectors if detectors is not None else load_detectors(metrics, weights, device, progress)
    batches, total = iterate_generated_images(
        net, seeds, batch_size, gnet, encoder_settings, class_idx, device, **sampler_kwargs
    )
    return compute_statistics(batches, {m: detectors[m] for m in metrics}, total, progress, desc="generating")


def compare_to_reference(
    stats: dict[str, FeatureStatistics], reference: dict[str, FeatureStatistics], source: str = "reference"
) -> dict[str, float]:
    """metric -> Frechet distance between `stats` and the reference; errors name the reference file."""
    out = {}
    for metric, s in stats.items():
        ref = reference.get(metric)
        if ref is None:
            raise MetricsError(
                f"{source}: holds statistics for {', '.join(reference) or 'nothing'}, not for {metric!r}"
            )
        if ref.feature_dim != s.feature_dim:
            raise MetricsError(
                f"{source}: {metric} statistics have {ref.feature_dim} features "
                f"but the detector gives {s.feature_dim}: "
                "the reference was made with another detector"
            )
        if ref.detector and s.detector and ref.detector.get("kwargs") != s.detector.get("kwargs"):
            warnings.warn(f"{source}: {metric} reference made with detector {ref.detector}, now {s.detector}")
        out[metric] = frechet_distance(s.mu, s.sigma, ref.mu, ref.sigma)
    return out


def _reference_and_metrics(ref, metrics) -> tuple[dict[str, FeatureStatistics], str, list[str]]:
    source = str(ref) if isinstance(ref, (str, os.PathLike)) else "reference"
    reference = load_reference(ref) if isinstance(ref, (str, os.PathLike)) else ref
    metrics = _metric_list(metrics, [m for m in METRICS if m in reference])
    missing = [m for m in metrics if m not in reference]
    if missing or not metrics:
        raise MetricsError(
            f"{source}: holds statistics for {', '.join(reference) or 'nothing'}, "
            f"not for {', '.join(missing) or 'any metric'}"
        )
    return reference, source, metrics


def calc_metrics_for_images(
    path: str | os.PathLike,
    ref: str | os.PathLike | dict[str, FeatureStatistics],  # reference file / URL or loaded statistics
    metrics: str | Sequence[str] | None = None,  # default: every metric the reference holds
    num: int = DEFAULT_NUM_IMAGES,  # images to use (the official seeded choice when more); fewer is an error
    **kwargs: Any,  # to dataset_statistics (seed, batch_size, detectors, weights, device, workers, progress)
) -> dict[str, float]:
    """metric -> Frechet distance of a folder / zip of generated images against the reference."""
    reference, source, metrics = _reference_and_metrics(ref, metrics)
    stats = dataset_statistics(path, metrics, num=num, **kwargs)
    return compare_to_reference(stats, reference, source)


def calc_metrics_for_model(
    net: torch.nn.Module,
    ref: str | os.PathLike | dict[str, FeatureStatistics],
    metrics: str | Sequence[str] | None = None,
    seeds: Sequence[int] = range(DEFAULT_NUM_IMAGES),
    **kwargs: Any,  # to model_statistics (batch_size, gnet, encoder_settings, detectors, sampler settings, ...)
) -> dict[str, float]:
    """metric -> Frechet distance of a model's images (generated on the fly, never written) against the reference."""
    reference, source, metrics = _reference_and_metrics(ref, metrics)
    stats = model_statistics(net, seeds, metrics, **kwargs)
    return compare_to_reference(stats, reference, source)


def model_metric(
    ref: str | os.PathLike | dict[str, FeatureStatistics],
    metric: str,  # 'fid' or 'fd_dinov2'
    seeds: Sequence[int] = range(DEFAULT_NUM_IMAGES),
    detectors: dict[str, torch.nn.Module] | None = None,  # loaded once here when None
    weights: dict[str, str | os.PathLike | None] | None = None,
    device: torch.device | str | None = None,
    **kwargs: Any,  # to model_statistics (batch_size, encoder_settings, sampler settings, ...)
) -> Callable[[torch.nn.Module], float]:
    """A callable net -> metric value (for the post-hoc EMA sweep): the reference and the detector are loaded
    once, each call generates len(seeds) images and never writes them."""
    reference, source, metrics = _reference_and_metrics(ref, [metric])
    detectors = (
        detectors if detectors is not None else load_detectors(metrics, weights, device, kwargs.get("progress", True))
    )

    def score(net: torch.nn.Module) -> float:
        stats = model_statistics(net, seeds, metrics, detectors=detectors, device=device, **kwargs)
        return compare_to_reference(stats, reference, source)[metric]

    score.__name__ = metric
    return score
