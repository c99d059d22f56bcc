"""Nested training state (dicts, lists, numbers, strings, tensors) in one safetensors file, written atomically.

Tensors go into the safetensors body; everything else into a JSON skeleton in its metadata, where each
tensor is a {"__tensor__": key} placeholder. Loading parses JSON and tensors only: no code runs.

Every tensor's CRC-32 (of its raw bytes as stored) goes into the metadata key "edm2_tensor_checksums" as JSON
{"algorithm": "crc32", "tensors": {key: "8 hex digits"}}; loading verifies them, so a flipped byte in the body
is an error instead of silently wrong weights. Files without that key (written before it existed) still load
unverified; a key that is present but malformed or incomplete marks the file as damaged. CRC-32 rather than a
cryptographic hash: it guards against accidents (disk, copy, truncation), not tampering, and it hashes
several times faster than blake2b on a CPU, which matters for multi-GB checkpoints.
The same key and helpers serve the model files of `edm2.model_files`.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import zlib
from typing import Any

import torch

SKELETON_KEY = "edm2_state_skeleton"
CHECKSUM_KEY = "edm2_tensor_checksums"  # safetensors metadata key: per-tensor checksums (see the module docstring)
CHECKSUM_ALGORITHM = "crc32"
_CHECKSUM_RE = re.compile(r"[0-9a-f]{8}")


class StateFileError(ValueError):
    """A state file that is missing, truncated or damaged; the message names it."""


# ---------------------------------------------------------------------------------------------------------
# Per-tensor checksums, shared with edm2.model_files.


def non_utf8_path_problem(path: str | os.PathLike) -> str | None:
    """Why safetensors cannot open `path` (it takes only paths of valid UTF-8, which a folder named in another
    encoding is not), or None."""
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        return f"{os.fsdecode(path)!r}: the path is not valid UTF-8, which safetensors files need; rename the folder"
    return None


def tensor_checksum(t: torch.Tensor) -> str:
    """CRC-32 of a tensor's bytes as safetensors stores them (C order, native = little-endian byte order)."""
    t = t.detach().to("cpu").contiguous()
    return "%08x" % zlib.crc32(t.reshape(-1).view(torch.uint8).numpy())


def checksum_metadata(tensors: dict[str, torch.Tensor]) -> str:
    """The CHECKSUM_KEY metadata value for the tensors about to be saved."""
    return json.dumps({"algorithm": CHECKSUM_ALGORITHM, "tensors": {k: tensor_checksum(t) for k, t in tensors.items()}})


def read_checksums(
    metadata: dict[str, str], keys: list[str], source: str, error: type[ValueError] = StateFileError
) -> dict[str, str] | None:
    """The expected checksum of each tensor in `keys`, or None for a file written before checksums existed.
    A CHECKSUM_KEY that is malformed, or does not cover exactly the file's tensors, raises `error`."""
    if CHECKSUM_KEY not in metadata:
        return None
    try:
        record = json.loads(metadata[CHECKSUM_KEY])
    except (json.JSONDecodeError, RecursionError):
        record = None
    sums = record.get("tensors") if isinstance(record, dict) else None
    if not isinstance(sums, dict) or record.get("algorithm") != CHECKSUM_ALGORITHM:
        raise error(f"{source}: damaged (malformed {CHECKSUM_KEY!r} metadata; expected {CHECKSUM_ALGORITHM} checksums)")
    bad = sorted(k for k, v in sums.items() if not (isinstance(v, str) and _CHECKSUM_RE.fullmatch(v)))
    if bad:
        raise error(f"{source}: damaged (malformed checksum for tensor {bad[0]!r}: expected 8 hex digits)")
    missing = [k for k in keys if k not in sums]
    if missing:
        raise error(f"{source}: damaged (no checksum for tensor {missing[0]!r})")
    absent = sorted(set(sums) - set(keys))
    if absent:
        raise error(f"{source}: damaged (tensor {absent[0]!r} has a checksum but is not in the file)")
    return sums


def verify_checksum(
    key: str,
    t: torch.Tensor,
    checksums: dict[str, str] | None,
    source: str,
    error: type[ValueError] = StateFileError,
    advice: str = "its bytes changed after it was written",
) -> None:
    """Raise `error` if tensor `key` does not match its stored checksum (no-op for a file without checksums)."""
    if checksums is not None and tensor_checksum(t) != checksums[key]:
        raise error(f"{source}: damaged (checksum mismatch in tensor {key!r}); {advice}")


def flatten_state(
    obj: Any, prefix: str = "", tensors: dict[str, torch.Tensor] | None = None
) -> tuple[Any, dict[str, torch.Tensor]]:
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
            (int(k[2:]) if k.startswith("i:") else k[2:]): unflatten_state(v, tensors)
            for k, v in skeleton["__dict__"].items()
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


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """obj as indented JSON, written atomically."""
    text = json.dumps(obj, indent=2)
    atomic_write(path, lambda tmp: open(tmp, "w").write(text))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes to path atomically (see atomic_write)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


_OS_ERROR_RE = re.compile(r"\(os error (\d+)\)")


def save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """safetensors.torch.save_file, atomically. A failed write (disk full, file-size limit, permissions) raises
    OSError naming `path` with its errno, as a Python write would: safetensors raises its own SafetensorError
    ("I/O error: File too large (os error 27)"), which callers that catch OSError would let through."""
    from safetensors.torch import save_file

    def write(tmp: str) -> None:
        try:
            save_file(tensors, tmp, metadata=metadata)
        except Exception as e:  # noqa: BLE001 - SafetensorError is not importable by a stable name in every version
            m = _OS_ERROR_RE.search(str(e)) if type(e).__name__ == "SafetensorError" else None
            if m is None:
                raise
            code = int(m.group(1))
            raise OSError(code, os.strerror(code), os.fspath(path)) from e

    atomic_write(path, write)


def save_state(path: str | os.PathLike, state: Any) -> None:
    """Write a nested state atomically as safetensors + JSON skeleton + per-tensor checksums."""
    skeleton, tensors = flatten_state(state)
    save_safetensors(path, tensors, {SKELETON_KEY: json.dumps(skeleton), CHECKSUM_KEY: checksum_metadata(tensors)})


_STATE_ADVICE = "the file changed after it was written (disk or copy error); resume from an earlier checkpoint"


def _read_state(path: str, device: str | torch.device | None) -> tuple[Any, dict[str, torch.Tensor]]:
    """(skeleton, tensors) of a state file, every tensor checked; device None checks without keeping them."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise StateFileError(f"{path}: no such file")
    try:
        # Read on the CPU, where the checksum is computed, then move: one tensor at a time stays on the host.
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            skeleton = json.loads(metadata[SKELETON_KEY])
            keys = list(f.keys())
            checksums = read_checksums(metadata, keys, path)
            tensors = {}
            for k in keys:
                t = f.get_tensor(k)
                verify_checksum(k, t, checksums, path, advice=_STATE_ADVICE)
                if device is not None:
                    tensors[k] = t.to(device)
        return skeleton, tensors
    except StateFileError:
        raise
    except Exception as e:  # noqa: BLE001 - truncation and corruption surface as many error types
        raise StateFileError(f"{path}: not a readable training state ({type(e).__name__}: {e})") from e


def load_state(path: str | os.PathLike, device: str | torch.device = "cpu") -> Any:
    """Read a file written by save_state; a missing, damaged or checksum-failing file raises StateFileError."""
    path = os.fspath(path)
    skeleton, tensors = _read_state(path, device)
    try:
        return unflatten_state(skeleton, tensors)
    except Exception as e:  # noqa: BLE001 - a skeleton that names absent tensors or is not a skeleton at all
        raise StateFileError(f"{path}: not a readable training state ({type(e).__name__}: {e})") from e


def verify_state(path: str | os.PathLike) -> None:
    """Check a state file without keeping its tensors: raises StateFileError as load_state would."""
    _read_state(os.fspath(path), None)
