"""From the records of an official EDM2 pickle to this project's network and encoder settings (docs/design.md §10).

`edm2.official_pickle` turns the file into plain data: the network, encoder and loss become InertObjects
holding `_init_args` / `_init_kwargs` and, for modules, `_parameters` / `_buffers` / `_modules`. Here the
official Precond's constructor arguments become this project's Precond arguments, the nested parameters and
buffers become a state dict (the module names are the same, docs/design.md §4), and the official encoder record becomes
the shared encoder settings dict.
"""

from __future__ import annotations

import inspect
import math
import os
import pathlib
import re
from typing import Any

import numpy as np
import torch

from networks import Precond

# The official StabilityVAEEncoder's defaults are ours; they fill in pickles that recorded no arguments.
from training.encoders import STABILITY_VAE_DEFAULTS
from training.model_files import ModelFileError, NetworkFile, build_network

from .official_pickle import InertObject, load_official_pickle

OFFICIAL_FORMAT = "edm2-official-pickle"

# The official Precond's positional parameters, in order (its remaining arguments are keywords).
PRECOND_POSITIONAL = ("img_resolution", "img_channels", "label_dim")


# network-snapshot-0671088-0.100.pkl, edm2-img512-xs-2147483-0.135.pkl, phema-2147483-0.150.pkl: kimg and std.
SNAPSHOT_NAME = re.compile(r"(?:^|-)(\d+)(?:-(\d+\.\d+))?\.pkl$")


def _plain(value: Any) -> Any:
    """JSON-able copy of pickled plain data (dict subclasses, tuples, numpy scalars and arrays)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, InertObject):
        return {"class": value.class_name, "init_kwargs": _plain(value.init_kwargs)}
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    return repr(value)


def _record(value: Any, what: str, source: str) -> InertObject:
    if not isinstance(value, InertObject) or not isinstance(value.state, dict):
        raise ModelFileError(f"{source}: {what} is not an official persistent object (got {type(value).__name__})")
    return value


def official_state_dict(record: InertObject, source: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers of a module record and its submodules, under state-dict names."""
    state = record.state if isinstance(record.state, dict) else {}
    out: dict[str, torch.Tensor] = {}
    non_persistent = set(state.get("_non_persistent_buffers_set") or ())
    for group in ("_parameters", "_buffers"):
        for name, tensor in (state.get(group) or {}).items():
            if tensor is None or (group == "_buffers" and name in non_persistent):
                continue
            if not isinstance(tensor, torch.Tensor):
                raise ModelFileError(f"{source}: {prefix}{name} should be a tensor, got {type(tensor).__name__}")
            out[prefix + name] = tensor.detach()
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, InertObject):
            raise ModelFileError(f"{source}: submodule {prefix}{name} is a {type(child).__name__}, not a module record")
        out.update(official_state_dict(child, source, f"{prefix}{name}."))
    return out


def precond_kwargs_from_official(record: InertObject, source: str) -> dict[str, Any]:
    """This project's Precond arguments from the official Precond's recorded constructor arguments."""
    args = record.init_args
    if len(args) > len(PRECOND_POSITIONAL):
        raise ModelFileError(f"{source}: official Precond has {len(args)} positional arguments, expected at most 3")
    kwargs = dict(zip(PRECOND_POSITIONAL, args))
    for key, value in record.init_kwargs.items():
        if key in kwargs:
            raise ModelFileError(f"{source}: official Precond argument {key!r} given twice")
        kwargs[key] = _plain(value)
    accepted = set(inspect.signature(Precond).parameters) - {"precision", "unknown"} | {"use_fp16"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ModelFileError(
            f"{source}: official Precond arguments not supported by this project: {unknown}; "
            f"supported: {sorted(accepted)}"
        )
    if "use_fp16" in kwargs:  # the official switch; this project names the activation dtype
        kwargs["precision"] = "fp16" if kwargs.pop("use_fp16") else "fp32"
    missing = [k for k in PRECOND_POSITIONAL if k not in kwargs]
    if missing:
        raise ModelFileError(f"{source}: official Precond record lacks {missing}")
    return kwargs


def encoder_settings_from_official(record: Any, source: str) -> dict[str, Any] | None:
    """The shared encoder settings dict for an official encoder record (None when the pickle has none)."""
    if record is None:
        return None
    record = _record(record, "the encoder", source)
    if record.class_name == "StandardRGBEncoder":
        return {"class": "standard_rgb"}
    if record.class_name != "StabilityVAEEncoder":
        raise ModelFileError(
            f"{source}: unsupported official encoder class {record.class_name!r}; "
            "supported: StandardRGBEncoder, StabilityVAEEncoder"
        )
    unknown = sorted(set(record.init_kwargs) - set(STABILITY_VAE_DEFAULTS))
    if unknown:
        raise ModelFileError(f"{source}: unsupported StabilityVAEEncoder arguments {unknown}")
    settings = {**STABILITY_VAE_DEFAULTS, **_plain(record.init_kwargs)}
    state = record.state
    settings["vae_name"] = str(state.get("vae_name", settings["vae_name"]))
    settings["batch_size"] = int(state.get("batch_size", settings["batch_size"]))
    _check_encoder_scale(settings, state, source)
    return {"class": "stability_vae", **settings}


def _check_encoder_scale(settings: dict[str, Any], state: dict, source: str) -> None:
    """The official encoder stores scale = final_std / raw_std and bias = final_mean - raw_mean * scale; if
    they disagree with the recorded arguments, take raw_mean / raw_std from them (they are what it applied)."""
    if "scale" not in state or "bias" not in state:
        return
    scale = np.asarray(state["scale"], dtype=np.float64).reshape(-1)
    bias = np.asarray(state["bias"], dtype=np.float64).reshape(-1)
    raw_std = settings["final_std"] / scale
    raw_mean = (settings["final_mean"] - bias) / scale
    consistent = np.allclose(raw_std, settings["raw_std"], rtol=1e-5) and np.allclose(
        raw_mean, settings["raw_mean"], rtol=1e-5, atol=1e-6
    )
    if not consistent:
        if not (np.all(np.isfinite(raw_std)) and np.all(np.isfinite(raw_mean))):
            raise ModelFileError(f"{source}: the encoder's scale / bias are not finite")
        settings["raw_std"] = [float(v) for v in raw_std]
        settings["raw_mean"] = [float(v) for v in raw_mean]


def loss_settings_from_official(record: Any) -> dict[str, Any] | None:
    if not isinstance(record, InertObject) or not isinstance(record.state, dict):
        return None
    keys = ("P_mean", "P_std", "sigma_data")
    return {"class": record.class_name, **{k: _plain(record.state[k]) for k in keys if k in record.state}}


def kimg_to_nimg(kimg: int) -> int:
    """The training image count behind an official file name's kimg (nimg // 1000), as the official tools read
    it: the largest multiple of 1024 images with that kimg (official runs use batches of 1024-image multiples, so
    e.g. kimg 131 is 128Ki = 131072 images, not 131000). A kimg that no multiple of 1024 has is refused."""
    nimg = (int(kimg) * 1000 + 999) // 1024 * 1024
    if nimg // 1000 != kimg:
        raise ModelFileError(f"kimg {kimg} in an official file name is not the kimg of any multiple of 1024 images")
    return nimg


def _nimg_or_none(kimg: int | None) -> int | None:
    """kimg_to_nimg, or None (time unknown) for a renamed file whose kimg no official run can have written."""
    try:
        return None if kimg is None else kimg_to_nimg(kimg)
    except ModelFileError:
        return None


def parse_snapshot_name(name: str) -> tuple[int | None, float | None]:
    """(training kimg, EMA std) from an official file name; (None, None) when it follows no known pattern."""
    m = SNAPSHOT_NAME.search(pathlib.PurePath(name).name)
    if not m:
        return None, None
    return int(m.group(1)), (float(m.group(2)) if m.group(2) else None)


def _ema_record(data: Any, source: str) -> InertObject:
    if not isinstance(data, dict) or "ema" not in data:
        keys = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise ModelFileError(f"{source}: expected an official network pickle (a dict with key 'ema'), got {keys}")
    ema = _record(data["ema"], "'ema'", source)
    if ema.class_name != "Precond":
        raise ModelFileError(f"{source}: unsupported official network class {ema.class_name!r}; supported: Precond")
    return ema


def header_from_official(data: Any, path: pathlib.Path) -> dict[str, Any]:
    """The header-like summary of an official file's contents (the same keys as a model file's header)."""
    source = str(path)
    ema = _ema_record(data, source)
    kwargs = precond_kwargs_from_official(ema, source)
    try:
        with torch.device("meta"):  # only to normalise the arguments as this project's files record them
            init_kwargs = Precond(**kwargs).init_kwargs
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"{source}: the official Precond arguments are not valid here: {e}") from e
    kimg, ema_std = parse_snapshot_name(path.name)
    if ema_std is not None and not (math.isfinite(ema_std) and ema_std > 0):
        ema_std = None
    dtypes = {str(t.dtype).removeprefix("torch.") for t in official_state_dict(ema, source).values()}
    return {
        "format": OFFICIAL_FORMAT,
        "network_class": "Precond",
        "init_kwargs": init_kwargs,
        "encoder": encoder_settings_from_official(data.get("encoder"), source),
        # Official files record time and EMA length only in their names, in kimg (nimg // 1000).
        "training_nimg": _nimg_or_none(kimg),
        "ema_std": ema_std,
        "official_init_kwargs": _plain(ema.init_kwargs),
        "dataset_kwargs": _plain(data.get("dataset_kwargs")),
        "loss": loss_settings_from_official(data.get("loss_fn")),
        "source_dtypes": sorted(dtypes),  # official raw snapshots hold float16
    }


def network_file_from_official(data: Any, path: pathlib.Path, device: torch.device | str = "cpu") -> NetworkFile:
    """This project's network, encoder settings and header from the unpickled contents of an official file."""
    header = header_from_official(data, path)
    raw = official_state_dict(_ema_record(data, str(path)), str(path))
    state = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in raw.items()}
    net = build_network("Precond", header["init_kwargs"], state, device, source=str(path))
    net.unet.gain_dtype = official_gain_dtype(raw)
    return NetworkFile(net=net, encoder=header["encoder"], meta=header, path=path)


def official_gain_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype in which the official code forms the gains' factor gain / sqrt(fan_in) (Eq. 47) for these stored
    tensors: the stored gains' own when it is a half type (float16 in official snapshots), else float32."""
    gain = state.get("unet.out_gain")
    if gain is not None and gain.dtype in (torch.float16, torch.bfloat16):
        return gain.dtype
    return torch.float32


def read_official_header(path: str | os.PathLike) -> dict[str, Any]:
    """The header-like summary of an official `.pkl` (this unpickles the whole file, weights included)."""
    path = pathlib.Path(path)
    return header_from_official(load_official_pickle(path), path)


def load_official_network(path: str | os.PathLike, device: torch.device | str = "cpu") -> NetworkFile:
    """Read an official EDM2 `.pkl` (network snapshot or post-hoc reconstruction) without running its code."""
    path = pathlib.Path(path)
    return network_file_from_official(load_official_pickle(path), path, device)
