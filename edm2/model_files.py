"""Loading model files from anywhere: this project's .safetensors model files (the format of
training/model_files.py, re-exported here) and official EDM2 pickles, local paths or http(s) URLs.

    edm2.save_network("snap.safetensors", net, encoder=enc.config(), ema_std=0.1, training_nimg=nimg)
    f = edm2.load_network("snap.safetensors")      # or an official .pkl, or an http(s) URL of either
    f.net, f.encoder, f.meta

The format is recognised from the file's first bytes. Loading runs no code from the file: safetensors holds only
tensors, the header is JSON, and official pickles go through the allow-listed unpickler of `edm2.official_pickle`.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import torch

from training.model_files import (  # noqa: F401 (the format's public names, re-exported)
    CHECKSUM_KEY,
    FORMAT_NAME,
    FORMAT_VERSION,
    HEADER_KEY,
    NETWORK_CLASSES,
    SUFFIX,
    ModelFileError,
    NetworkFile,
    _parse_header,
    build_network,
    detect_format,
    load_model_file,
    make_header,
    network_class,
    network_class_name,
    read_file_header,
    register_network_class,
    save_network,
)

from .download import resolve_path_or_url
from .official_import import load_official_network, read_official_header


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a model file, without reading the tensors. For an official `.pkl` (recognised by
    content), the equivalent summary: training_nimg and ema_std then come from the official file name, and the
    whole pickle is read (it has no separate header)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file")
    if detect_format(path) == "pickle":
        return read_official_header(path)
    return read_file_header(path)


def load_network(
    path_or_url: str | os.PathLike,
    device: torch.device | str = "cpu",
    sha256: str | None = None,
) -> NetworkFile:
    """Load a network from a model file of this project or an official EDM2 pickle (local path or http(s) URL).

    The format is recognised from the file's first bytes. No code from the file is executed.
    """
    path = resolve_path_or_url(path_or_url, sha256=sha256)
    if detect_format(path) == "safetensors":
        return load_model_file(path, device)
    return load_official_network(path, device)
