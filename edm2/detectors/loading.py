"""Finding, verifying and loading the detector weights (FID Inception-v3, DINOv2 ViT-L/14).

Where the weights come from, first match wins:
1. the `weights` argument (CLI: --inception-weights / --dinov2-weights): a local file or an http(s) URL;
2. the environment variable (EDM2_INCEPTION_WEIGHTS / EDM2_DINOV2_WEIGHTS): a file or URL;
3. the public URL, downloaded once into the edm2 download cache ($EDM2_CACHE_DIR, default ~/.cache/edm2).

Files are read without running code from them: `.safetensors` with safetensors, anything else with
`torch.load(weights_only=True)` (torch's restricted unpickler). A `.safetensors` file may carry the
architecture in its metadata (key "edm2_detector": JSON {"metric", "kwargs"}), written by `save_detector`;
this is how narrow test detectors, or converted official weights, describe themselves. Other files get the
published architecture. Checksums: a file whose name ends in `-<8..64 hex digits>.<ext>` must have a SHA-256
starting with those digits (torch hub's convention, e.g. pt_inception-2015-12-05-6726825d.pth); a full
SHA-256, when one is known for the public URL, is checked on download.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import tempfile
from collections.abc import Callable
from typing import Any

import torch

from ..download import DownloadError, cache_path_for, download, file_sha256, is_url
from .dinov2 import DINOv2ViT
from .inception import InceptionV3FID

METADATA_KEY = "edm2_detector"  # safetensors metadata key of the architecture description
HASH_SUFFIX = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")


class DetectorWeightsError(ValueError):
    """A detector weight file is missing, unreadable, does not fit the architecture or fails its checksum."""


@dataclasses.dataclass(frozen=True)
class DetectorSpec:
    """One metric's feature detector: the architecture and where its published weights live."""

    metric: str  # metric name: 'fid' or 'fd_dinov2'
    title: str  # for messages
    build: Callable[..., torch.nn.Module]  # the architecture; keyword arguments from file metadata
    feature_dim: int  # features of the published network
    file_name: str  # the published weight file
    url: str  # where it is published
    sha256: str | None  # full SHA-256 of the published file, if known (checked on download)
    env_var: str  # environment variable naming a local file or URL
    option: str  # command-line option naming a local file or URL
    ignored_keys: str | None = None  # regex of checkpoint keys that carry no information (dropped)


DETECTORS: dict[str, DetectorSpec] = {
    "fid": DetectorSpec(
        metric="fid",
        title="FID Inception-v3 (2015-12-05 graph)",
        build=InceptionV3FID,
        feature_dim=2048,
        file_name="pt_inception-2015-12-05-6726825d.pth",
        url="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
        "pt_inception-2015-12-05-6726825d.pth",
        sha256=None,  # only the prefix 6726825d (in the name) is published by the file's source
        env_var="EDM2_INCEPTION_WEIGHTS",
        option="--inception-weights",
        ignored_keys=r"(^|\.)num_batches_tracked$",  # batch-norm step counters, if a file carries them
    ),
    "fd_dinov2": DetectorSpec(
        metric="fd_dinov2",
        title="DINOv2 ViT-L/14",
        build=DINOv2ViT,
        feature_dim=1024,
        file_name="dinov2_vitl14_pretrain.pth",
        url="https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth",
        sha256=None,  # Meta publishes no checksum for this file
        env_var="EDM2_DINOV2_WEIGHTS",
        option="--dinov2-weights",
    ),
}
METRICS = tuple(DETECTORS)


def get_spec(metric: str) -> DetectorSpec:
    if metric not in DETECTORS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(DETECTORS)}")
    return DETECTORS[metric]


# ----------------------------------------------------------------------------------------------------------
# Finding the file


def _missing_weights_message(spec: DetectorSpec, reason: str, cache_dir: str | os.PathLike | None) -> str:
    return (
        f"{spec.title} weights are needed for {spec.metric}: the file {spec.file_name} ({spec.url}). {reason}. "
        f"Download it where there is network access and either pass {spec.option} PATH, set {spec.env_var}=PATH, "
        f"or place it at {cache_path_for(spec.url, cache_dir)} (the download cache)."
    )


def resolve_weights(
    metric: str,
    weights: str | os.PathLike | None = None,  # local file or URL; None = environment variable, then the public URL
    cache_dir: str | os.PathLike | None = None,  # download cache; None = edm2's default
    progress: bool = True,
) -> pathlib.Path:
    """The local path of the metric's detector weights (downloading them when needed), checksum verified."""
    spec = get_spec(metric)
    source, origin = weights, spec.option
    if source is None and os.environ.get(spec.env_var):
        source, origin = os.environ[spec.env_var], spec.env_var
    if source is None:
        try:
            path = download(spec.url, cache_dir=cache_dir, sha256=spec.sha256, progress=progress)
        except DownloadError as e:
            raise DetectorWeightsError(_missing_weights_message(spec, f"Downloading it failed ({e})", cache_dir)) from e
    elif is_url(str(source)):
        try:
            path = download(str(source), cache_dir=cache_dir, progress=progress)
        except DownloadError as e:
            raise DetectorWeightsError(f"{origin}: cannot download {spec.title} weights from {source}: {e}") from e
    else:
        path = pathlib.Path(source).expanduser()
        if not path.is_file():
            raise DetectorWeightsError(
                f"{origin}: no such file {str(source)!r}; "
                + _missing_weights_message(spec, "The given path does not exist", cache_dir)
            )
    check_name_hash(path)
    return pathlib.Path(path)


def check_name_hash(path: str | os.PathLike) -> None:
    """A file named `...-<hex>.<ext>` must have a SHA-256 starting with <hex> (torch hub's convention)."""
    path = pathlib.Path(path)
    match = HASH_SUFFIX.search(path.name)
    if match is None:
        return
    digest = file_sha256(path)
    if not digest.startswith(match.group(1)):
        raise DetectorWeightsError(
            f"{path}: checksum mismatch: its name promises a SHA-256 starting with {match.group(1)}, "
            f"the file's is {digest}; the file is damaged or not the published one (delete it and download again)"
        )


# ----------------------------------------------------------------------------------------------------------
# Reading and checking


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(state dict, architecture description or None) of a weight file; never runs code from it."""
    path = pathlib.Path(path)
    description = None
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
            if METADATA_KEY in metadata:
                description = json.loads(metadata[METADATA_KEY])
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DetectorWeightsError(f"{path}: cannot read detector weights: {type(e).__name__}: {e}") from e
    if isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        for key in ("model", "state_dict", "teacher"):  # common wrappers around a state dict
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise DetectorWeightsError(f"{path}: expected a state dict (names -> tensors), got {type(state).__name__}")
    if description is not None and not (isinstance(description, dict) and isinstance(description.get("kwargs"), dict)):
        raise DetectorWeightsError(
            f"{path}: metadata {METADATA_KEY!r} must be JSON {{'metric': ..., 'kwargs': {{...}}}}"
        )
    return state, description


def check_state_dict(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    source: str,  # named in errors (the file)
    ignored_keys: str | None = None,  # regex of keys to drop before comparing
) -> dict[str, torch.Tensor]:
    """The state dict with ignored keys dropped; DetectorWeightsError on missing / unexpected keys or shapes."""
    if ignored_keys is not None:
        state = {k: v for k, v in state.items() if not re.search(ignored_keys, k)}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k}: {list(state[k].shape)} (expected {list(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
        if keys:
            shown = ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")
            problems.append(f"{what}: {shown}")
    if problems:
        raise DetectorWeightsError(f"{source}: does not fit {type(model).__name__}: " + "; ".join(problems))
    return state


def build_detector(
    metric: str, state: dict[str, torch.Tensor], description: dict | None, source: str
) -> torch.nn.Module:
    """The metric's detector with `state` loaded strictly; `description` (file metadata) may set the architecture."""
    spec = get_spec(metric)
    kwargs: dict[str, Any] = {}
    if description is not None:
        if description.get("metric", metric) != metric:
            raise DetectorWeightsError(
                f"{source}: holds a detector for {description.get('metric')!r}, not for {metric!r} ({spec.option})"
            )
        kwargs = dict(description["kwargs"])
    try:
        with torch.device("meta"):
            model = spec.build(**kwargs)
    except (TypeError, ValueError) as e:
        raise DetectorWeightsError(f"{source}: bad architecture in metadata {kwargs}: {e}") from e
    state = check_state_dict(model, state, source, spec.ignored_keys)
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load_detector(
    metric: str,
    weights: str | os.PathLike | None = None,  # file or URL; None = environment variable, then the public URL
    device: torch.device | str = "cpu",
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> torch.nn.Module:
    """The metric's feature detector with its weights, in eval mode on `device` (uint8 images in, features out)."""
    path = resolve_weights(metric, weights, cache_dir=cache_dir, progress=progress)
    state, description = read_weights(path)
    model = build_detector(metric, state, description, str(path)).to(device)
    model.weights_path = path  # recorded in reference files
    return model


def save_detector(path: str | os.PathLike, model: torch.nn.Module) -> pathlib.Path:
    """Write a detector as .safetensors with its architecture in the metadata (atomically)."""
    from safetensors.torch import save_file

    path = pathlib.Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_detector: {path} must end in .safetensors")
    description = json.dumps({"metric": model.metric, "kwargs": model.init_kwargs})
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={METADATA_KEY: description})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return path
