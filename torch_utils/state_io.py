"""Nested training state (dicts, lists, numbers, strings, tensors) in one safetensors file, written atomically.

Tensors go into the safetensors body; everything else into a JSON skeleton in its metadata, where each
tensor is a {"__tensor__": key} placeholder. Loading parses JSON and tensors only: no code runs.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch

SKELETON_KEY = "edm2_state_skeleton"


class StateFileError(ValueError):
    """A state file that is missing, truncated or damaged; the message names it."""


def flatten_state(obj: Any, prefix: str = "", tensors: dict[str, torch.Tensor] | None = None) -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON skeleton, {key: tensor}) for a nested structure; tuples become lists, dict keys strings."""
    tensors = {} if tensors is None else tensors
    if isinstance(obj, torch.Tensor):
        key = prefix or "_"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}, tensors
    if isinstance(obj, dict):
        if any(not isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"flatten_state: dict keys must be str or int at {prefix!r}")
        # Integer keys (optimizer state) are kept apart from string keys so they round-trip.
        items = {("i:" if isinstance(k, int) else "s:") + str(k): v for k, v in obj.items()}
        return {"__dict__": {k: flatten_state(v, f"{prefix}/{k[2:]}", tensors)[0] for k, v in items.items()}}, tensors
    if isinstance(obj, (list, tuple)):
        return [flatten_state(v, f"{prefix}/{i}", tensors)[0] for i, v in enumerate(obj)], tensors
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj, tensors
    raise TypeError(f"flatten_state: cannot store {type(obj).__name__} at {prefix!r}")


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict) and "__tensor__" in skeleton:
        return tensors[skeleton["__tensor__"]]
    if isinstance(skeleton, dict) and "__dict__" in skeleton:
        return {
            (int(k[2:]) if k.startswith("i:") else k[2:]): unflatten_state(v, tensors) for k, v in skeleton["__dict__"].items()
        }
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    return skeleton


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (os.umask can only be read by setting it,
    which would briefly change it for every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Any) -> None:
    """Call write(tmp_path), fsync, then rename over path: a crash leaves the old file or the new one."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the mode a plain open() would, so colleagues can read results.
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes to path atomically (see atomic_write)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def save_state(path: str | os.PathLike, state: Any) -> None:
    """Write a nested state atomically as safetensors + JSON skeleton."""
    from safetensors.torch import save_file

    skeleton, tensors = flatten_state(state)
    metadata = {SKELETON_KEY: json.dumps(skeleton)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_state(path: str | os.PathLike, device: str | torch.device = "cpu") -> Any:
    """Read a file written by save_state; a damaged file raises StateFileError naming it."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise StateFileError(f"{path}: no such file")
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        skeleton = json.loads(metadata[SKELETON_KEY])
        return unflatten_state(skeleton, tensors)
    except StateFileError:
        raise
    except Exception as e:  # noqa: BLE001 - truncation and corruption surface as many error types
        raise StateFileError(f"{path}: not a readable training state ({type(e).__name__}: {e})") from e
