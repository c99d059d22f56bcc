"""One model file format for snapshots, post-hoc reconstructions and exported models.

A model file is a single `.safetensors` file: the network's parameters and buffers in float32, and in the
safetensors metadata under the key "edm2" a JSON header:

    {"format": "edm2-model", "format_version": 1,
     "network_class": "Precond",              # looked up in NETWORK_CLASSES, never imported from the file
     "init_kwargs": {...},                    # the network's constructor arguments (net.init_kwargs)
     "encoder": {"class": "stability_vae", ...} or null,
     "training_nimg": 2147483648 or null,     # training images seen when the weights were taken
     "ema_std": 0.1 or null,                  # relative std of the EMA profile (docs/design.md §6); null = raw weights
     "edm2_version": "0.1.0", "extra": {...}}

Beside the header, the metadata key "edm2_tensor_checksums" holds a CRC-32 of every tensor's bytes,
{"algorithm": "crc32", "tensors": {name: "8 hex digits"}} (`torch_utils.state_io.checksum_metadata`), which
load_network verifies: a damaged body raises ModelFileError naming the file and tensor instead of loading wrong
weights. Files without the key (written before it existed) load unverified; format_version is unchanged, since
readers that ignore the key lose nothing.

    save_network("snap.safetensors", net, encoder=enc.config(), ema_std=0.1, training_nimg=nimg)
    f = load_model_file("snap.safetensors")        # f.net, f.encoder, f.meta

This module is the format's core, below edm2/ (the training loop writes snapshots with it). The public loader,
`edm2.load_network` / `edm2.read_header` (edm2/model_files.py), adds http(s) URLs and official EDM2 pickles
(edm2/official_import.py), which it recognises by content and reads with this module's `build_network`.
Loading runs no code from the file: safetensors holds only tensors and the header is JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Any

import torch

from networks import Precond
from networks.skip_scaling import LEGACY_MODE_NAMES
from torch_utils import VERSION
from torch_utils.state_io import (
    CHECKSUM_KEY, checksum_metadata, non_utf8_path_problem, read_checksums, save_safetensors, verify_checksum,
)

FORMAT_NAME = "edm2-model"
FORMAT_VERSION = 2  # 2: skip_scaling "ls" is the ScaleLong per-token gate (version 1: per channel)
HEADER_KEY = "edm2"  # safetensors metadata key holding the JSON header
SUFFIX = ".safetensors"


class ModelFileError(ValueError):
    """A model file is missing, truncated, corrupt, unsafe or inconsistent; the message names the file."""


# ---------------------------------------------------------------------------------------------------------
# Network classes a file may name. A new backbone (e.g. a U-ViT) registers itself with one call.

NETWORK_CLASSES: dict[str, type[torch.nn.Module]] = {}


def register_network_class(name: str, cls: type[torch.nn.Module]) -> None:
    """Make `cls` loadable from files whose header names `name`. Its instances need a JSON-able `init_kwargs`."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_network_class: name must be a non-empty string, got {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise ValueError(f"register_network_class: cls must be a torch.nn.Module subclass, got {cls!r}")
    if NETWORK_CLASSES.get(name, cls) is not cls:
        raise ValueError(f"register_network_class: {name!r} is already registered to {NETWORK_CLASSES[name]!r}")
    NETWORK_CLASSES[name] = cls


register_network_class("Precond", Precond)


def network_class(name: str, source: str = "model file") -> type[torch.nn.Module]:
    if name not in NETWORK_CLASSES:
        raise ModelFileError(f"{source}: unknown network class {name!r}; known: {sorted(NETWORK_CLASSES)}")
    return NETWORK_CLASSES[name]


def network_class_name(net: torch.nn.Module) -> str:
    for name, cls in NETWORK_CLASSES.items():
        if type(net) is cls:
            return name
    raise ValueError(
        f"save_network: network class {type(net).__qualname__} is not registered; known: {sorted(NETWORK_CLASSES)} "
        "(see register_network_class)"
    )


# ---------------------------------------------------------------------------------------------------------
# What load_network returns.


@dataclasses.dataclass
class NetworkFile:
    net: torch.nn.Module  # in eval mode, requires_grad False
    encoder: dict[str, Any] | None  # encoder settings ({"class": ...}); None = the file names none
    meta: dict[str, Any]  # the whole header (official pickles: an equivalent summary)
    path: pathlib.Path  # the local file read (the cache file for URLs)

    @property
    def ema_std(self) -> float | None:
        return self.meta.get("ema_std")

    @property
    def training_nimg(self) -> int | None:
        return self.meta.get("training_nimg")


# ---------------------------------------------------------------------------------------------------------
# Saving.


def _unwrap(net: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(net, torch.nn.parallel.DistributedDataParallel):
            net = net.module
        elif hasattr(net, "_orig_mod") and isinstance(net._orig_mod, torch.nn.Module):
            net = net._orig_mod
        else:
            return net


def _check_header_values(encoder: Any, ema_std: Any, training_nimg: Any, extra: Any) -> None:
    if encoder is not None and not (isinstance(encoder, dict) and isinstance(encoder.get("class"), str)):
        raise ValueError(f"save_network: encoder must be None or a settings dict with a 'class' key, got {encoder!r}")
    if ema_std is not None and not (isinstance(ema_std, (int, float)) and math.isfinite(ema_std) and ema_std > 0):
        raise ValueError(f"save_network: ema_std must be None or a positive number, got {ema_std!r}")
    if training_nimg is not None and not (isinstance(training_nimg, int) and training_nimg >= 0):
        raise ValueError(f"save_network: training_nimg must be None or a non-negative integer, got {training_nimg!r}")
    if extra is not None and not isinstance(extra, dict):
        raise ValueError(f"save_network: extra must be None or a dict, got {type(extra).__name__}")


def make_header(
    net: torch.nn.Module,
    encoder: dict | None = None,
    ema_std: float | None = None,
    training_nimg: int | None = None,
    extra: dict | None = None,
) -> dict[str, Any]:
    """The JSON header describing `net` (see the module docstring)."""
    _check_header_values(encoder, ema_std, training_nimg, extra)
    class_name = network_class_name(net)
    init_kwargs = getattr(net, "init_kwargs", None)
    if not isinstance(init_kwargs, dict):
        raise ValueError(f"save_network: {type(net).__qualname__} has no init_kwargs dict of constructor arguments")
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "network_class": class_name,
        "init_kwargs": init_kwargs,
        "encoder": encoder,
        "training_nimg": training_nimg,
        "ema_std": None if ema_std is None else float(ema_std),
        "edm2_version": VERSION,
        "extra": extra if extra is not None else {},
    }


def _header_json(header: dict) -> str:
    try:
        return json.dumps(header, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"save_network: the header (init_kwargs / encoder / extra) must be plain JSON: {e}") from e


def save_network(
    path: str | os.PathLike,
    net: torch.nn.Module,
    *,
    encoder: dict | None = None,
    ema_std: float | None = None,
    training_nimg: int | None = None,
    extra: dict | None = None,
) -> None:
    """Write `net` (parameters and buffers as float32) and its JSON header to `path` (a .safetensors file),
    atomically: a temporary file in the same folder, fsync, rename."""
    path = pathlib.Path(path)
    if path.suffix != SUFFIX:
        raise ValueError(f"save_network: the file name must end in {SUFFIX}, got {str(path)!r}")
    net = _unwrap(net)
    header_json = _header_json(make_header(net, encoder, ema_std, training_nimg, extra))
    tensors = {}
    for name, t in net.state_dict().items():
        t = t.detach().to("cpu")
        tensors[name] = (t.to(torch.float32) if t.is_floating_point() else t).contiguous()

    save_safetensors(path, tensors, {HEADER_KEY: header_json, CHECKSUM_KEY: checksum_metadata(tensors)})


# ---------------------------------------------------------------------------------------------------------
# Loading.


def detect_format(path: pathlib.Path) -> str:
    """'safetensors' or 'pickle', from the first bytes of the file (not its name)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if not head:
        raise ModelFileError(f"{path}: empty file")
    # Safetensors first: its 8-byte little-endian header length can itself start with 0x80.
    if len(head) == 9 and head[8:9] == b"{":  # 8-byte header length, then the JSON header
        return "safetensors"
    if head[:1] == b"\x80":  # PROTO opcode: pickle protocol 2 or later
        return "pickle"
    if head[:4] == b"PK\x03\x04":
        raise ModelFileError(
            f"{path}: a zip archive (torch.save?); expected a .safetensors model file or an official .pkl"
        )
    if path.suffix == ".pkl":  # protocols 0 and 1 have no magic bytes
        return "pickle"
    raise ModelFileError(f"{path}: unrecognised file format; expected a .safetensors model file or an official .pkl")


def build_network(
    class_name: str,
    init_kwargs: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    device: torch.device | str = "cpu",
    source: str = "model file",
) -> torch.nn.Module:
    """Construct a registered network and load `state_dict` into it; every key and shape must match."""
    cls = network_class(class_name, source)
    if not isinstance(init_kwargs, dict):
        raise ModelFileError(f"{source}: init_kwargs must be a dict, got {type(init_kwargs).__name__}")
    try:
        with torch.device("meta"):  # no allocation or initialisation: every tensor comes from the file
            net = cls(**init_kwargs)
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"{source}: cannot construct {class_name} from the file's init_kwargs: {e}") from e
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = [
        f"{k}: file {list(state_dict[k].shape)} vs network {list(expected[k].shape)}"
        for k in expected
        if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong_shape:
        raise ModelFileError(
            f"{source}: the tensors do not match {class_name}(**init_kwargs): "
            + "; ".join(
                f"{label} ({len(items)}): {', '.join(items[:5])}{', ...' if len(items) > 5 else ''}"
                for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
                if items
            )
        )
    state = {k: state_dict[k].to(dtype=expected[k].dtype) for k in expected}
    net.load_state_dict(state, strict=True, assign=True)
    leftover = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if t.device.type == "meta"]
    if leftover:  # tensors the state dict does not cover (e.g. non-persistent buffers) cannot be restored
        raise ModelFileError(f"{source}: {class_name} has tensors that no file provides: {leftover[:5]}")
    return net.to(device).eval().requires_grad_(False)


def read_file_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a local .safetensors model file, without reading the tensors (edm2.read_header also
    reads official pickles)."""
    from safetensors import safe_open

    path = pathlib.Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file")
    problem = non_utf8_path_problem(path)
    if problem is not None:
        raise ModelFileError(problem)
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # safetensors reports header problems with its own error types
        raise ModelFileError(f"{path}: corrupt or truncated safetensors file ({type(e).__name__}: {e})") from e
    return _parse_header(metadata, path)


def _parse_header(metadata: dict[str, str], path: pathlib.Path) -> dict[str, Any]:
    if HEADER_KEY not in metadata:
        raise ModelFileError(f"{path}: a safetensors file without the {HEADER_KEY!r} header: not an edm2 model file")
    try:
        header = json.loads(metadata[HEADER_KEY])
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{path}: the {HEADER_KEY!r} header is not valid JSON: {e}") from e
    except RecursionError:  # a deeply nested header (a JSON nesting bomb) exhausts the parser's stack
        raise ModelFileError(f"{path}: the {HEADER_KEY!r} header is nested too deeply to be an edm2 header") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        found = header.get("format") if isinstance(header, dict) else header
        raise ModelFileError(f"{path}: header format must be {FORMAT_NAME!r}, got {found!r}")
    version = header.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: format_version {version!r} is not supported (this version reads 1..{FORMAT_VERSION}; "
            "a newer edm2 may have written it)"
        )
    for key in ("network_class", "init_kwargs"):
        if key not in header:
            raise ModelFileError(f"{path}: header lacks {key!r}")
    return _upgrade_header(header)


def _upgrade_header(header: dict[str, Any]) -> dict[str, Any]:
    """Give a version-1 header the names of today: its skip_scaling 'ls' / 'ls_nonshared' were the per-channel
    gates, now 'ls_channel' / 'ls_channel_nonshared', so the file still builds the network it was saved from."""
    kwargs = header["init_kwargs"]
    if header["format_version"] < 2 and isinstance(kwargs, dict) and kwargs.get("skip_scaling") in LEGACY_MODE_NAMES:
        header = dict(header, init_kwargs=dict(kwargs, skip_scaling=LEGACY_MODE_NAMES[kwargs["skip_scaling"]]))
    return header


_DAMAGED_ADVICE = "the file changed after it was written (disk, copy or download error); copy or export it again"


def load_model_file(path: str | os.PathLike, device: torch.device | str = "cpu") -> NetworkFile:
    """A network from a local .safetensors model file, checksums verified (edm2.load_network also takes URLs and
    official pickles)."""
    from safetensors import safe_open

    path = pathlib.Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file")
    problem = non_utf8_path_problem(path)
    if problem is not None:
        raise ModelFileError(problem)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            header = _parse_header(metadata, path)
            keys = list(f.keys())
            checksums = read_checksums(metadata, keys, str(path), ModelFileError)
            tensors = {}
            for k in keys:
                tensors[k] = f.get_tensor(k)
                verify_checksum(k, tensors[k], checksums, str(path), ModelFileError, _DAMAGED_ADVICE)
    except ModelFileError:
        raise
    except Exception as e:  # safetensors checks the header's offsets against the file size
        raise ModelFileError(f"{path}: corrupt or truncated safetensors file ({type(e).__name__}: {e})") from e
    net = build_network(header["network_class"], header["init_kwargs"], tensors, device, source=str(path))
    _restore_official_gain_dtype(net, header)
    return NetworkFile(net=net, encoder=header.get("encoder"), meta=header, path=path)


def _restore_official_gain_dtype(net: torch.nn.Module, header: dict[str, Any]) -> None:
    """A file converted from an official pickle keeps sampling as the pickle does: the official code forms the gains'
    factor of Eq. 47 in the stored gains' float16 (edm2/official_import.py: official_gain_dtype)."""
    extra = header.get("extra")
    if not isinstance(extra, dict) or not extra.get("converted_from") or not hasattr(net, "unet"):
        return
    name = extra.get("official_gain_dtype")
    if name is None and extra.get("source_dtypes") == ["float16"]:  # converted before the key was written
        name = "float16"
    if name in ("float16", "bfloat16"):
        net.unet.gain_dtype = getattr(torch, name)
