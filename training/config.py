"""The training configuration: one typed dataclass, its JSON form (training_options.json) and every check on its
values, in one place (docs/design.md §11).

    config = TrainingConfig(data="demo-data.zip", batch=256).validate(world_size=1)   # TrainingError if bad
    config = TrainingConfig.from_json("runs/demo/training_options.json")               # also today's older files
    config.to_dict()                                                                   # the same keys as the file

The JSON keys are the field names (nested objects for `loss` and `lr`), so options files written before this
class existed load unchanged, except for the speed switches that the `--kernels` choice replaced (LEGACY_KEYS:
dropped on load, they never changed what is computed).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import torch

from accel import GRAD_SYNCS, KERNELS
from torch_utils.state_io import write_json

from .phema import STD_LIMIT

# Images of non-finite loss in a row a run survives, counted in status intervals (a rare fp16 overflow zeroes one
# step's gradients; a diverged run stays non-finite): then it stops without saving, its last good checkpoint kept.
MAX_NONFINITE_STATUS = 3
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
# Keys of options files written before `kernels`: speed switches that never changed what is computed.
LEGACY_KEYS = ("channels_last", "fused_step", "batched_weights", "fast_dropout", "ddp_overlap")
LEGACY_GRAD_SYNCS = ("grouped", "overlap")  # read as None, the default


class TrainingError(ValueError):
    """A configuration or run directory that cannot be trained; the message names the option or file."""


def _resumable(default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A field that may change between a run and its resumption without changing what is computed."""
    return field(default=default, metadata=dict(resumable=True), **kwargs)


@dataclass
class LossConfig:
    """EDM2Loss arguments: the log-normal sigma distribution of training (Eq. 12) and sigma_data."""

    P_mean: float = -0.4
    P_std: float = 1.0
    sigma_data: float = 0.5
    # False: the EDM loss weighting lambda(sigma) alone, no learned uncertainty u(sigma) (ablation config A)
    learned_weighting: bool = True


@dataclass
class LrConfig:
    """learning_rate_schedule arguments (Eq. 67 of the paper, with a linear ramp-up)."""

    ref_lr: float = 0.0100
    ref_batches: float = 70000  # decay start t_ref in optimizer steps; 0 = none
    rampup_img: int = 10_000_000


@dataclass
class TrainingConfig:
    data: str | None = _resumable(None)  # dataset folder or zip; compared by data_identity, so a run may move
    cond: bool = True  # class-conditional (needs dataset.json labels)
    xflip: bool = False  # x-flip augmentation
    encoder: dict = field(default_factory=lambda: {"class": "standard_rgb"})  # training/encoders.py settings
    # Precond keyword arguments; dataset shape and label width are added. precision 'auto' is resolved for the
    # device (for_device).
    network: dict = field(default_factory=dict)
    loss: LossConfig = field(default_factory=LossConfig)
    lr: LrConfig = field(default_factory=LrConfig)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])  # Adam
    eps: float = 1e-8  # Adam
    duration: int = _resumable(2048 * 2**20)  # training images
    batch: int = 2048  # images per optimizer step, all GPUs
    batch_gpu: int | None = _resumable(None)  # images per GPU per accumulation round; None = batch / GPUs
    # Forced weight normalization of the MPConv weights after every step (Eq. 66); off in ablation configs A-D
    force_weight_norm: bool = True
    ema_stds: list[float] = field(default_factory=lambda: [0.050, 0.100])  # power-function EMA profiles
    # The traditional EMA of EDM (ablation configs A-B, docs/design.md §13) instead of the power-function EMAs: its
    # half-life in images; None = the power-function EMAs of ema_stds (then ema_stds is unused)
    ema_halflife: float | None = None
    ema_rampup: float | None = None  # traditional EMA: half-life at most this fraction of the images seen; None = off
    status: int = _resumable(128 * 2**10)  # images between status lines
    snapshot: int = _resumable(8 * 2**20)  # images between EMA snapshots; 0 = only at the end
    checkpoint: int = _resumable(128 * 2**20)  # images between checkpoints; 0 = only at the end and on signals
    seed: int = 0
    workers: int = _resumable(2)  # DataLoader workers per GPU
    # --- speed: how, never what, is computed (the shared contract of accel.resolve_speed_plan) ---
    compile: bool | None = _resumable(None)  # torch.compile the network for training; None = on CUDA (accel)
    kernels: str | None = _resumable(None)  # 'fast' or 'reference'; None = fast on CUDA, reference elsewhere
    # multi-GPU gradient averaging: 'ddp' or 'flat' (accel/grad_sync.py); None = flat when compiled, else ddp
    grad_sync: str | None = _resumable(None)
    # cuDNN's autotuner on CUDA: faster convolutions, but its choice can differ between processes, so CUDA runs
    # (and resumes) repeat bit for bit only with it off
    cudnn_benchmark: bool = _resumable(True)
    instruments: bool | None = _resumable(None)  # per-skip / per-stage figures; None = on unless compiled
    max_nonfinite_status: int = _resumable(MAX_NONFINITE_STATUS)
    # What makes the dataset the same one wherever it lies (run_dir.dataset_identity); set by the training loop.
    data_identity: dict | None = None

    # --- JSON -----------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values under today's keys; data_identity only once the loop has recorded it, the ablation
        switches (force_weight_norm, loss.learned_weighting) only when they are off, the traditional EMA's settings
        (ema_halflife, ema_rampup) only when set."""
        out = dataclasses.asdict(self)
        for key in ("data_identity", "ema_halflife", "ema_rampup"):
            if out[key] is None:
                del out[key]
        # The ablation ladder's switches appear only when off, so that other runs' files keep their keys.
        if out["force_weight_norm"]:
            del out["force_weight_norm"]
        if out["loss"]["learned_weighting"]:
            del out["loss"]["learned_weighting"]
        return out

    @classmethod
    def from_dict(cls, values: Any, source: str = "the configuration") -> "TrainingConfig":
        """The configuration of a dict as to_dict writes it, or as options files of earlier versions hold it.
        TrainingError naming `source` and the key for an unknown key or a value of the wrong type."""
        return _from_dict(cls, values, source, "")

    def to_json(self, path: str) -> None:
        """Write the options file atomically (no temp file left behind, the previous version kept on a failure)."""
        write_json(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str) -> "TrainingConfig":
        try:
            with open(path) as f:
                values = json.load(f)
        except (OSError, ValueError, RecursionError) as e:
            raise TrainingError(f"{path}: unreadable ({e})") from None
        return cls.from_dict(values, source=path)

    @classmethod
    def coerce(cls, config: "TrainingConfig | dict[str, Any]") -> "TrainingConfig":
        """A copy of a TrainingConfig, or one from a dict (the form scripts and tests may build)."""
        return copy.deepcopy(config) if isinstance(config, TrainingConfig) else cls.from_dict(config)

    # --- checks ---------------------------------------------------------------------------------------------

    def validate(self, world_size: int = 1) -> "TrainingConfig":
        """Every check on the values, the messages naming the command-line option; returns a copy with batch_gpu
        resolved for world_size processes. Raises TrainingError."""
        c = copy.deepcopy(self)
        for key in ("duration", "batch"):
            value = getattr(c, key)
            if not _is_int(value) or value <= 0:
                raise TrainingError(f"--{key} must be a positive number of images, got {value!r}")
        if c.batch_gpu is not None and (not _is_int(c.batch_gpu) or c.batch_gpu < 0):
            raise TrainingError(f"--batch-gpu must be a positive number of images, got {c.batch_gpu!r}")
        batch, batch_gpu = c.batch, c.batch_gpu or c.batch // world_size
        if batch_gpu <= 0 or batch % (batch_gpu * world_size) != 0:
            if not c.batch_gpu:  # name only what the user gave, not the per-GPU share derived from it
                raise TrainingError(f"--batch {batch} must be divisible by the number of processes, {world_size}")
            raise TrainingError(
                f"--batch {batch} must be divisible by --batch-gpu {batch_gpu} x {world_size} process(es) "
                "(the accumulation rounds must be whole)"
            )
        c.batch_gpu = batch_gpu
        for key in ("status", "snapshot", "checkpoint"):
            value = getattr(c, key)
            if not _is_int(value) or value < 0:
                raise TrainingError(f"--{key} must be a non-negative number of images, got {value!r}")
        if not _is_int(c.max_nonfinite_status) or c.max_nonfinite_status < 1:
            raise TrainingError(f"--max-nonfinite-status must be a positive integer, got {c.max_nonfinite_status!r}")
        if not _is_int(c.workers) or c.workers < 0:
            raise TrainingError(f"--workers must be a non-negative integer, got {c.workers!r}")
        numbers = dict(
            lr=c.lr.ref_lr, decay=c.lr.ref_batches, rampup=c.lr.rampup_img, P_mean=c.loss.P_mean, P_std=c.loss.P_std,
            sigma_data=c.loss.sigma_data, eps=c.eps, betas=c.betas, ema_stds=c.ema_stds,
            dropout=c.network.get("dropout", 0.0),
        )
        for key in ("ema_halflife", "ema_rampup"):
            if getattr(c, key) is not None:
                numbers[key] = getattr(c, key)
        for option, value in numbers.items():  # nan and inf pass range checks (every comparison with nan is false)
            values = value if isinstance(value, (list, tuple)) else [value]
            if not all(_is_number(v) and math.isfinite(v) for v in values):
                name = option.replace("_", "-") if option.startswith("ema_") else option  # the command line's
                raise TrainingError(f"--{name} must be finite, got {value!r}")
        if c.ema_halflife is None:  # the power-function EMAs: each std must have a profile (Eq. 123)
            if not c.ema_stds:
                raise TrainingError("--ema-stds must name at least one EMA length")
            if len(set(c.ema_stds)) != len(c.ema_stds):
                raise TrainingError(f"--ema-stds must be distinct, got {c.ema_stds!r}")
            for std in c.ema_stds:
                if not 0 < std < STD_LIMIT:
                    raise TrainingError(f"--ema-stds must lie in (0, {STD_LIMIT:.5f}) (the widest power-function "
                                        f"profile), got {std!r}")
        if not _is_int(c.seed) or not 0 <= c.seed < 2**32:
            raise TrainingError(f"--seed must be an integer in [0, 2**32), got {c.seed!r}")
        if c.ema_halflife is not None and c.ema_halflife < 0:
            raise TrainingError(f"--ema-halflife must be a non-negative number of images, got {c.ema_halflife!r}")
        if c.ema_rampup is not None:
            if c.ema_halflife is None:
                raise TrainingError("--ema-rampup applies to the traditional EMA only: give --ema-halflife too")
            if not 0 <= c.ema_rampup <= 1:
                raise TrainingError(
                    f"--ema-rampup must lie in [0, 1] (a fraction of the images seen), got {c.ema_rampup!r}"
                )
        if len(c.betas) != 2:
            raise TrainingError(f"--betas must be two numbers, got {c.betas!r}")
        if not all(0 <= b < 1 for b in c.betas):
            raise TrainingError(f"--betas must lie in [0, 1), got {c.betas!r}")
        if c.lr.ref_lr / (1 - c.betas[0]) > torch.finfo(torch.float32).max:
            # Adam's first step is lr / (1 - beta1) in float32: beyond its range the optimizer fails mid-run.
            raise TrainingError(f"--lr {c.lr.ref_lr!r} is too large: Adam's first step overflows float32")
        if c.kernels is not None and c.kernels not in KERNELS:
            raise TrainingError(f"--kernels must be 'fast' or 'reference', got {c.kernels!r}")
        if c.grad_sync is not None and c.grad_sync not in GRAD_SYNCS:
            raise TrainingError(f"--grad-sync: expected one of {', '.join(GRAD_SYNCS)}, got {c.grad_sync!r}")
        if "kappa" in c.network and c.network.get("skip_scaling", "none") != "cs":  # it would be ignored
            raise TrainingError("--kappa applies to --skip-scaling cs only")
        precision = c.network.get("precision", "fp32")
        if precision not in PRECISIONS:
            raise TrainingError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if c.data is None:
            raise TrainingError("--data is required")
        _from_dict(TrainingConfig, dataclasses.asdict(c), "the configuration", "")  # every other field's type
        return c

    def for_device(self, device: torch.device) -> "TrainingConfig":
        """A copy with the network's precision 'auto' resolved: fp16 on CUDA, fp32 elsewhere."""
        c = copy.deepcopy(self)
        if c.network.get("precision") == "auto":
            c.network["precision"] = "fp16" if torch.device(device).type == "cuda" else "fp32"
        return c


RESUMABLE_CHANGES = tuple(f.name for f in dataclasses.fields(TrainingConfig) if f.metadata.get("resumable"))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _type_error(hint: Any, value: Any) -> str | None:
    """What the value should have been, or None if it fits the annotation (JSON numbers: an int is a float)."""
    if hint is Any:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        problems = [_type_error(a, value) for a in args if a is not type(None)]
        if any(p is None for p in problems):
            return None
        return " or ".join(p for p in problems if p) + (" or null" if type(None) in args else "")
    if origin is list:
        if not isinstance(value, list):
            return "a list"
        return "a list of numbers" if any(_type_error(args[0], v) for v in value) else None
    checks = {
        bool: (lambda v: isinstance(v, bool), "true or false"),
        int: (_is_int, "an integer"),
        float: (_is_number, "a number"),
        str: (lambda v: isinstance(v, str), "a string"),
        dict: (lambda v: isinstance(v, dict), "an object"),
    }
    ok, expected = checks[hint]
    return None if ok(value) else expected


def _from_dict(cls: type, values: Any, source: str, prefix: str) -> Any:
    if not isinstance(values, dict):
        where = f"key '{prefix[:-1]}'" if prefix else "the configuration"
        raise TrainingError(f"{source}: {where} must be an object, got {type(values).__name__}")
    values = dict(values)
    if cls is TrainingConfig:
        for key in LEGACY_KEYS:
            values.pop(key, None)
        if values.get("grad_sync") in LEGACY_GRAD_SYNCS:
            values["grad_sync"] = None
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise TrainingError(f"{source}: unknown key '{prefix}{key}' (known: {', '.join(sorted(names))})")
    kwargs = {}
    for key, value in values.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _from_dict(hint, value, source, f"{prefix}{key}.")
            continue
        expected = _type_error(hint, value)
        if expected:
            raise TrainingError(f"{source}: key '{prefix}{key}' must be {expected}, got {value!r}")
        kwargs[key] = copy.deepcopy(value)
    return cls(**kwargs)
