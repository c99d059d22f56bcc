"""The run directory of a training run: one writer at a time, its checkpoints (newest valid first, damaged ones
set aside), the configuration a resume must match, and the debris a killed process leaves behind.

    with RunLock(run_dir):                      # a second process on the same directory fails at once
        remove_temp_files(run_dir)
        state = load_latest_checkpoint(run_dir)  # damaged files renamed *.damaged and reported
        ...
        save_state(checkpoint_path(run_dir, nimg), state)
        prune_checkpoints(run_dir, nimg)
"""

from __future__ import annotations

import datetime
import fcntl
import glob
import hashlib
import json
import os
import re
import socket
from typing import Any, Callable

from torch_utils.state_io import StateFileError, atomic_write, load_state, write_json  # noqa: F401 (re-exported)

from .config import LEGACY_KEYS, RESUMABLE_CHANGES, TrainingConfig, TrainingError
from .encoders import LEGACY_VAE_PIXEL_RANGE

CHECKPOINT_PATTERN = "training-state-{nimg:012d}.safetensors"
SNAPSHOT_PATTERN = "network-snapshot-{kimg:07d}-{std:.3f}.safetensors"
# The traditional EMA's snapshots (ablation configs A-B): no std in the name, so that no tool reads them as one
TRADITIONAL_SNAPSHOT_PATTERN = "network-snapshot-{kimg:07d}-ema.safetensors"
OPTIONS_FILE = "training_options.json"
STATS_FILE = "stats.jsonl"
LOCK_FILE = ".lock"
DAMAGED_SUFFIX = ".damaged"
KEEP_CHECKPOINTS = 2  # the newest and one before it, in case the newest is damaged
# RESUMABLE_CHANGES: the options that may change between a run and its resumption without changing what is
# computed, from TrainingConfig's field flags. The dataset is compared by its identity ("data_identity"), not by its
# path, so a run directory can move to another disk. LEGACY_KEYS (speed switches of earlier versions) are ignored.
class RunDirError(ValueError):
    """A run directory that cannot be trained into; the message names the directory or file."""


# --- one writer ------------------------------------------------------------------------------------------


class RunLock:
    """An exclusive lock on a run directory, held while a training process lives.

    fcntl.flock belongs to the open file: the kernel releases it when the process ends in any way (kill -9
    included), so a lock left by a dead process never blocks a resume. The file holds the holder's pid, host
    and start time, for the message the second process prints.
    """

    def __init__(self, run_dir: str) -> None:
        self.path = os.path.join(run_dir, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:  # a folder in its place, no permission to write in the run directory
            raise RunDirError(f"--outdir {os.path.dirname(self.path)}: cannot open its lock file {self.path} "
                              f"({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise RunDirError(
                f"--outdir {os.path.dirname(self.path)} is in use by another training process ({holder}); "
                "wait for it to end or pick another --outdir"
            ) from None
        since = datetime.datetime.now().isoformat(timespec="seconds")
        holder = f"pid {os.getpid()} on {socket.gethostname()}, since {since}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file releases the lock
            self._fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


# --- checkpoints -----------------------------------------------------------------------------------------


def checkpoint_path(run_dir: str, nimg: int) -> str:
    return os.path.join(run_dir, CHECKPOINT_PATTERN.format(nimg=nimg))


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """[(images, path)] of the training checkpoints in run_dir, newest first (damaged ones set aside excluded)."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(run_dir), "training-state-*.safetensors")):
        m = re.fullmatch(r"training-state-(\d+)\.safetensors", os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found, reverse=True)


def set_aside(path: str) -> str:
    """Rename a damaged file to *.damaged (numbered if that exists), so it is kept for a look but never loaded
    or counted again; returns the new path."""
    target, n = path + DAMAGED_SUFFIX, 1
    while os.path.exists(target):
        target, n = f"{path}{DAMAGED_SUFFIX}.{n}", n + 1
    os.replace(path, target)
    return target


def load_latest_checkpoint(run_dir: str, log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """The newest valid checkpoint; each damaged one before it is reported and renamed to *.damaged."""
    for _nimg, path in list_checkpoints(run_dir):
        try:
            return load_state(path)
        except StateFileError as e:
            log(f"WARNING: skipping damaged checkpoint: {e}; renamed to {os.path.basename(set_aside(path))}")
    return None


def prune_checkpoints(run_dir: str, newest_nimg: int, keep: int = KEEP_CHECKPOINTS) -> None:
    """Delete all but the `keep` newest checkpoints up to newest_nimg (the one just written, which is valid).
    Files above newest_nimg are left alone: they can only be there if something else wrote them."""
    older = [path for nimg, path in list_checkpoints(run_dir) if nimg < newest_nimg]
    for path in older[keep - 1:]:
        os.remove(path)


# --- configuration ---------------------------------------------------------------------------------------


def dataset_identity(dataset: Any) -> dict[str, Any]:
    """What makes a dataset the same one wherever it lies: its file count, total size and a hash of its index
    (names, sizes and labels). Reading sizes is one stat per file (or the zip's directory), no file contents."""
    import zipfile

    if os.path.isdir(dataset.path):
        sizes = [os.path.getsize(os.path.join(dataset.path, name)) for name in dataset.names]
    else:
        with zipfile.ZipFile(dataset.path) as z:
            table = {info.filename: info.file_size for info in z.infolist()}
        sizes = [table[name] for name in dataset.names]
    labels = None if dataset.labels is None else [int(v) for v in dataset.labels]
    index = json.dumps(dict(names=dataset.names, sizes=sizes, labels=labels), separators=(",", ":"))
    digest = hashlib.sha256(index.encode()).hexdigest()
    return dict(num_files=len(dataset.names), num_bytes=sum(sizes), index_sha256=digest)


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'key: old there, new now' for every option that a resume may not change. A run recorded before the
    dataset identity existed is compared without it."""
    keys = {k for k in set(old) | set(new) if k not in RESUMABLE_CHANGES and k not in LEGACY_KEYS}
    if "data_identity" not in old:
        keys.discard("data_identity")
    old, new = dict(old), dict(new)
    for c in (old, new):  # settings written before a key existed mean what they meant then
        if isinstance(c.get("encoder"), dict) and c["encoder"].get("class") == "stability_vae":
            c["encoder"] = {"pixel_range": LEGACY_VAE_PIXEL_RANGE, **c["encoder"]}
    out = []
    for key in sorted(k for k in keys if old.get(k) != new.get(k)):
        if key == "encoder" and isinstance(old.get(key), dict) and isinstance(new.get(key), dict):
            changed = sorted(k for k in set(old[key]) | set(new[key]) if old[key].get(k) != new[key].get(k))
            out.extend(f"encoder {k}: {old[key].get(k)!r} there, {new[key].get(k)!r} now" for k in changed)
            if "pixel_range" in changed:
                out.append(
                    f"pass --vae-pixel-range={old[key].get('pixel_range')} to go on with the run's VAE convention"
                )
        elif key == "data_identity":
            out.append(f"dataset: {_describe_identity(old.get(key))} there, {_describe_identity(new.get(key))} now")
        else:
            out.append(f"{key}: {old.get(key)!r} there, {new.get(key)!r} now")
    return out


def _describe_identity(identity: Any) -> str:
    if not isinstance(identity, dict):
        return repr(identity)
    index = str(identity.get("index_sha256"))[:12]
    return f"{identity.get('num_files')} files of {identity.get('num_bytes')} bytes, index {index}"


def check_config(run_dir: str, config: dict[str, Any], recorded: dict[str, Any] | None, source: str) -> None:
    """Refuse to go on in run_dir if `recorded` (the configuration in `source`) differs from config."""
    if recorded is None:
        return
    if not isinstance(recorded, dict):
        raise RunDirError(f"{source}: holds no configuration object; move the directory away or pick another --outdir")
    try:  # an earlier version's keys read as they are meant now (the removed speed switches dropped)
        recorded = TrainingConfig.from_dict(recorded, source).to_dict()
    except TrainingError as e:
        raise RunDirError(f"{e}; move the directory away or pick another --outdir") from None
    differ = config_differences(recorded, config)
    if differ:
        raise RunDirError(
            f"--outdir {run_dir} holds a run with a different configuration ({'; '.join(differ)}, "
            f"per {os.path.basename(source)}); "
            "use another --outdir"
        )


def read_options(run_dir: str) -> dict[str, Any] | None:
    path = os.path.join(run_dir, OPTIONS_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise RunDirError(f"{path}: unreadable ({e}); move the directory away or pick another --outdir") from None


# --- crash debris ----------------------------------------------------------------------------------------


def remove_temp_files(run_dir: str) -> list[str]:
    """Delete the temp files of writes a killed process never finished (atomic_write's `.NAME.XXXX.tmp`);
    returns their names. Call with the run lock held: no live writer can own them then."""
    removed = []
    for path in glob.glob(os.path.join(glob.escape(run_dir), ".*.tmp")):
        if os.path.isfile(path):
            os.remove(path)
            removed.append(os.path.basename(path))
    return removed


def truncate_stats(run_dir: str, nimg: int) -> int:
    """Cut stats.jsonl back to the lines of status steps up to nimg (the resumed checkpoint): the lines a killed
    run wrote after its last checkpoint are written again by the resumed run. Returns the lines dropped; an
    unreadable trailing line (a kill mid-write) is dropped too."""
    path = os.path.join(run_dir, STATS_FILE)
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        lines = f.read().splitlines()
    kept = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("nimg"), int) and entry["nimg"] <= nimg:
            kept.append(line)
    if len(kept) != len(lines):
        text = "".join(line + "\n" for line in kept)
        atomic_write(path, lambda tmp: open(tmp, "w").write(text))
    return len(lines) - len(kept)
