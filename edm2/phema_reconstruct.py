"""Post-hoc EMA reconstruction (EDM2 Sec. 3.2, App. C.3; docs/design.md §6): any EMA length from the training
snapshots.

The snapshots of the power-function EMAs tracked during training (files `network-snapshot-{kimg}-{std}`)
are combined linearly with the coefficients of `training.phema.solve_posthoc_coefficients`. The inputs
are streamed: every pass over them builds up to `batch` outputs, so memory holds one input network plus
the outputs of the pass, whatever the number of snapshots.

    for rec in reconstruct('training-runs/00000', out_std=[0.05, 0.1, 0.15]):
        evaluate(rec.net)                      # rec.std, rec.nimg, rec.kimg, rec.coefs
    reconstruct_to_dir('training-runs/00000', 'phema-out', out_std=parse_std_list('0.010,0.015,...,0.250'))
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import pathlib
import re
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
import tqdm

from training.phema import STD_LIMIT, check_std, solve_posthoc_coefficients

from . import model_files  # module attribute calls: tests may stand in for load_network

# Snapshot files: any PREFIX-KIMG-STD name, as the official reconstruct_phema.py lists them (training's
# network-snapshot-*, NVIDIA's published raw snapshots edm2-img512-xs-0134217-0.050.pkl, ...). Official .pkl files
# carry their time only in the name, read back by edm2.official_import.kimg_to_nimg; .safetensors in the header.
SNAPSHOT_PATTERNS = ("*.safetensors", "*.pkl")
SNAPSHOT_NAME = re.compile(r"(.*)-(\d+)-(\d+\.\d+)\.(?:pkl|safetensors)")
# The traditional EMA's snapshots (training/run_dir.TRADITIONAL_SNAPSHOT_PATTERN, ablation configs A-B): no profile
# to combine, so never inputs; named in the error when a folder holds nothing else.
TRADITIONAL_NAME = re.compile(r".*-\d+-ema\.safetensors")
OUTPUT_PREFIX = "phema"  # reconstructed files: {prefix}-{kimg:07d}-{std:.3f}.safetensors


class SnapshotError(ValueError):
    """The snapshots given to the reconstruction cannot be used (missing, mixed, incomplete)."""


@dataclasses.dataclass(frozen=True)
class SnapshotInfo:
    """What the reconstruction needs to know about one input snapshot, read from its header only."""

    path: pathlib.Path  # the snapshot file
    nimg: int  # training images seen when it was taken: the end time of its EMA profile
    std: float  # relative std of its power-function EMA profile
    network: str  # JSON of the network's constructor arguments, to refuse mixed shapes

    @property
    def kimg(self) -> int:
        return self.nimg // 1000


Snapshots = str | os.PathLike | Iterable[str | os.PathLike] | Sequence[SnapshotInfo]


@dataclasses.dataclass
class ReconstructedNetwork:
    """One output of `reconstruct`: the network with the EMA profile (std, nimg)."""

    std: float  # relative std of the reconstructed profile
    nimg: int  # its end time (training images) = the training image count of the `out_kimg` snapshot
    net: torch.nn.Module  # the reconstructed network (Precond, eval mode)
    encoder: dict | None  # the encoder description carried by the input snapshots
    coefs: dict[str, float]  # input file name -> its coefficient

    @property
    def kimg(self) -> int:
        return self.nimg // 1000

    def filename(self, prefix: str = OUTPUT_PREFIX) -> str:
        return output_filename(prefix, self.kimg, self.std)


def output_filename(prefix: str, kimg: int, std: float) -> str:
    return f"{prefix}-{kimg:07d}-{std:.3f}.safetensors"


# ----------------------------------------------------------------------------------------------------------
# Options


class StdList(tuple):
    """EMA stds as parse_std_list returns them: distinct, each in (0, STD_LIMIT]. Functions that take a std list
    take this one as it is, so a list is checked once, where it enters (a command line's option, or the first
    library call)."""


MAX_STDS = 10_000  # EMA lengths per list at most (each one a network to reconstruct)


def parse_std_list(text: str | float | Sequence[float]) -> StdList:
    """Parse '0.05,0.1' or a range '0.010,0.015,...,0.250' (step from the two values before '...', end
    included) into the stds, each checked to lie in (0, STD_LIMIT]. Numbers and sequences of numbers are checked
    too; a StdList (already checked) is returned as it is."""
    if isinstance(text, StdList):
        return text
    if isinstance(text, (int, float)):
        items: list = [text]
    elif isinstance(text, str):
        items = [t.strip() for t in text.split(",") if t.strip()]
    else:
        items = list(text)
    values: list[float] = []
    for i, item in enumerate(items):
        if item in ("...", "…"):
            if len(values) < 2 or i + 1 >= len(items) or items[i + 1] in ("...", "…"):
                raise ValueError(f"std list {text!r}: '...' needs two values before it and one after it")
            continue
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"std list {text!r}: {item!r} is not a number") from None
        if i > 0 and items[i - 1] in ("...", "…"):
            start, step = values[-1], values[-1] - values[-2]
            if not step > 0 or value <= start:
                raise ValueError(f"std list {text!r}: a range must increase, got step {step:g} up to {value:g}")
            count = math.floor((value - start) / step + 1e-6)
            if len(values) + count > MAX_STDS:  # before the list is built: a mistyped step would fill the memory
                raise ValueError(f"std list {text!r}: more than {MAX_STDS} stds (step {step:g})")
            # Round to 12 digits so that 0.010 + k * 0.005 prints and compares as the user wrote it.
            values.extend(round(start + k * step, 12) for k in range(1, count + 1))
            if not math.isclose(values[-1], value, rel_tol=1e-9):
                values.append(value)
            continue
        values.append(value)
    if not values:
        raise ValueError(f"std list {text!r} is empty")
    for value in values:
        check_std(value, "std")
    return StdList(dict.fromkeys(values))  # distinct, in order


# ----------------------------------------------------------------------------------------------------------
# Inputs


def read_snapshot_info(path: str | os.PathLike) -> SnapshotInfo:
    """Read a snapshot's EMA std, training image count and network config from its header (no weights)."""
    path = pathlib.Path(path)
    try:
        header = model_files.read_header(path)
    except model_files.ModelFileError as error:
        raise SnapshotError(str(error)) from None
    std, nimg = header.get("ema_std"), header.get("training_nimg")
    extra = header.get("extra")
    ema = extra.get("ema") if isinstance(extra, dict) else None
    if isinstance(ema, dict) and ema.get("kind") == "traditional":
        raise SnapshotError(
            f"{path}: a traditional EMA snapshot (half-life {ema.get('halflife_nimg')} images, ramp-up "
            f"{ema.get('rampup_ratio')}; docs/design.md §13), not a power-function one: post-hoc reconstruction "
            "cannot combine it; use it as it is (generate.py --net)"
        )
    if std is None or nimg is None:
        raise SnapshotError(
            f"{path}: not a power-function EMA snapshot (its header needs ema_std and training_nimg, "
            f"got ema_std={std!r}, training_nimg={nimg!r})"
        )
    try:
        std = check_std(std, f"{path}: ema_std")
    except ValueError as error:
        raise SnapshotError(str(error)) from None
    network = json.dumps({"class": header["network_class"], "init_kwargs": header["init_kwargs"]}, sort_keys=True)
    return SnapshotInfo(path=path, nimg=int(nimg), std=std, network=network)


def filter_snapshot_names(
    paths: Iterable[pathlib.Path], in_prefix: str | None = None, in_std: Sequence[float] | None = None
) -> list[pathlib.Path]:
    """The paths named PREFIX-KIMG-STD.{pkl,safetensors}, with PREFIX == in_prefix and STD in in_std where given
    (the official tool's selection of input files; everything else in a run folder is ignored)."""
    wanted = None if in_std is None else {float(v) for v in in_std}
    kept = []
    for p in paths:
        m = SNAPSHOT_NAME.fullmatch(pathlib.PurePath(p).name)
        if m and (in_prefix is None or m.group(1) == in_prefix) and (wanted is None or float(m.group(3)) in wanted):
            kept.append(p)
    return kept


def scan_snapshots(
    snapshots: str | os.PathLike | Iterable[str | os.PathLike],
    patterns: str | Sequence[str] = SNAPSHOT_PATTERNS,
    in_prefix: str | None = None,  # only files named {in_prefix}-KIMG-STD (the official --inprefix); None = any
    in_std: Sequence[float] | None = None,  # only files whose name's STD is one of these (--instd); None = any
) -> list[SnapshotInfo]:
    """The snapshots in a directory (files matching `patterns` named PREFIX-KIMG-STD) or a list of files, sorted
    by (nimg, std).

    Raises SnapshotError when there are none, when they hold different network shapes, or when two files
    claim the same (nimg, std).
    """
    folder = None
    if isinstance(snapshots, (str, os.PathLike)):
        folder = pathlib.Path(snapshots)
        if not folder.is_dir():
            raise SnapshotError(f"snapshot directory {str(folder)!r} does not exist")
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        paths = sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})
        paths = filter_snapshot_names(paths)
        where = f"{str(folder)!r} (looked for PREFIX-KIMG-STD names matching {', '.join(patterns)})"
    else:
        paths = [pathlib.Path(p) for p in snapshots]
        where = "the given file list"
    if in_prefix is not None or in_std is not None:
        paths = filter_snapshot_names(paths, in_prefix, in_std)
        where += f" with prefix {in_prefix!r}" if in_prefix is not None else ""
        where += f" with std in {sorted(in_std)}" if in_std is not None else ""
    if not paths:
        names = [] if folder is None else [p.name for p in folder.iterdir()]
        traditional = sorted(n for n in names if TRADITIONAL_NAME.fullmatch(n))
        if traditional:
            where += (
                f"; it holds traditional EMA snapshots ({traditional[-1]}, ...), which post-hoc reconstruction cannot "
                "combine: that run trained with --ema-halflife (docs/design.md §13)"
            )
        raise SnapshotError(f"no snapshots found in {where}")
    infos = sorted((read_snapshot_info(p) for p in paths), key=lambda s: (s.nimg, s.std))
    first = infos[0]
    for info in infos[1:]:
        if info.network != first.network:
            a, b = json.loads(first.network), json.loads(info.network)
            a, b = dict(a["init_kwargs"], network_class=a["class"]), dict(b["init_kwargs"], network_class=b["class"])
            diff = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
            raise SnapshotError(
                f"snapshots hold different networks: {first.path.name} vs {info.path.name} differ in "
                + ", ".join(f"{k} ({x!r} vs {y!r})" for k, (x, y) in diff.items())
            )
    seen: dict[tuple[int, float], pathlib.Path] = {}
    for info in infos:
        key = (info.nimg, info.std)
        if key in seen:
            raise SnapshotError(
                f"{seen[key].name} and {info.path.name} both hold std {info.std:.3f} at {info.nimg} images"
            )
        seen[key] = info.path
    return infos


def select_inputs(infos: Sequence[SnapshotInfo], out_kimg: int | None = None) -> tuple[list[SnapshotInfo], int]:
    """The snapshots usable for profiles ending at `out_kimg` (default: the latest snapshot) and the exact
    training image count of that time. Snapshots taken at 0 images carry no profile and are skipped."""
    if out_kimg is None:
        out_nimg = max(s.nimg for s in infos)
    else:
        matches = {s.nimg for s in infos if s.kimg == out_kimg}
        if not matches:
            available = sorted({s.kimg for s in infos})
            raise SnapshotError(f"out_kimg {out_kimg} matches no snapshot; available kimg: {available}")
        out_nimg = max(matches)
    inputs = [s for s in infos if 0 < s.nimg <= out_nimg]
    if not inputs:
        raise SnapshotError(f"no snapshot with 0 < training images <= {out_nimg}")
    return inputs, out_nimg


# ----------------------------------------------------------------------------------------------------------
# Reconstruction


def _parameter_tensors(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in net.named_parameters()}


def reconstruct(
    snapshots: Snapshots,  # a directory, a list of files or the result of scan_snapshots
    out_std: str | float | Sequence[float],  # the wanted EMA lengths (see parse_std_list)
    out_kimg: int | None = None,  # end time of the wanted profiles: a snapshot's kimg; None = the latest
    batch: int = 8,  # outputs built per pass over the inputs (memory: one input + `batch` outputs)
    device: torch.device | str = "cpu",  # where the inputs are loaded and summed
    progress: bool = True,  # a progress bar over the inputs of every pass
    accumulate_dtype: torch.dtype = torch.float64,  # the sums, cast back to the parameter dtype at the end
) -> Iterator[ReconstructedNetwork]:
    """An iterator over the network of every wanted std (in the given order); nothing is written.

    Parameters are sum_i X_ij theta_i over the input snapshots; buffers (not trained) are copied from the
    latest input. Every pass reads each input once. Arguments and snapshots are checked before returning.
    """
    stds = parse_std_list(out_std)
    if not (isinstance(batch, int) and batch >= 1):
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    infos = list(snapshots) if _is_scan_result(snapshots) else scan_snapshots(snapshots)
    inputs, out_nimg = select_inputs(infos, out_kimg)
    coefs = solve_posthoc_coefficients(
        in_ofs=[s.nimg for s in inputs],
        in_std=[s.std for s in inputs],
        out_ofs=[out_nimg] * len(stds),
        out_std=stds,
    )
    return _reconstruct_passes(inputs, stds, out_nimg, coefs, batch, device, progress, accumulate_dtype)


def _reconstruct_passes(
    inputs: list[SnapshotInfo],
    stds: list[float],
    out_nimg: int,
    coefs: np.ndarray,
    batch: int,
    device: torch.device | str,
    progress: bool,
    accumulate_dtype: torch.dtype,
) -> Iterator[ReconstructedNetwork]:
    passes = math.ceil(len(stds) / batch)
    for first in range(0, len(stds), batch):
        columns = list(range(first, min(first + batch, len(stds))))
        sums: list[dict[str, torch.Tensor]] | None = None
        template = None
        bar = tqdm.tqdm(
            inputs, desc=f"phema pass {first // batch + 1}/{passes}", unit="snapshot", disable=not progress, leave=False
        )
        for row, info in enumerate(bar):
            template = None  # drop the previous input before loading the next: one input in memory at a time
            template = model_files.load_network(info.path, device=device)
            params = _parameter_tensors(template.net)
            if sums is None:
                sums = [{k: torch.zeros_like(v, dtype=accumulate_dtype) for k, v in params.items()} for _ in columns]
                shapes = {k: v.shape for k, v in params.items()}
            elif {k: v.shape for k, v in params.items()} != shapes:
                raise SnapshotError(f"{info.path}: parameters differ from those of {inputs[0].path.name}")
            for out, column in zip(sums, columns):
                weight = float(coefs[row, column])
                for name, value in params.items():
                    out[name].add_(value.to(accumulate_dtype), alpha=weight)
            del params
        bar.close()
        for out, column in zip(sums, columns):
            net = copy.deepcopy(template.net).eval()  # buffers of the latest input (copied, not averaged)
            with torch.no_grad():
                for name, p in net.named_parameters():
                    p.copy_(out[name].to(p.dtype))
                    out[name] = None  # free the sum as soon as it is cast
            net.requires_grad_(False)
            yield ReconstructedNetwork(
                std=stds[column],
                nimg=out_nimg,
                net=net,
                encoder=template.encoder,
                coefs={s.path.name: float(coefs[i, column]) for i, s in enumerate(inputs)},
            )
        del sums, template


def _is_scan_result(snapshots) -> bool:
    return (
        isinstance(snapshots, (list, tuple))
        and len(snapshots) > 0
        and all(isinstance(s, SnapshotInfo) for s in snapshots)
    )


def _is_reconstruction(path: pathlib.Path) -> bool:
    """Whether the file is a model file that reconstruct_to_dir wrote (its header holds the phema coefficients)."""
    try:
        header = model_files.read_header(path)
    except model_files.ModelFileError:
        return False
    return isinstance(header.get("extra"), dict) and "phema" in header["extra"]


def reconstruct_to_dir(
    indir: str | os.PathLike,  # the training run's snapshots
    outdir: str | os.PathLike,  # where the reconstructed files go (created if needed)
    out_std: str | float | Sequence[float],  # the wanted EMA lengths (see parse_std_list)
    out_kimg: int | None = None,  # end time: a snapshot's kimg; None = the latest snapshot
    batch: int = 8,  # outputs built per pass over the inputs
    prefix: str = OUTPUT_PREFIX,  # output file name prefix
    skip_existing: bool = False,  # leave outputs that already exist alone (and do not rebuild them)
    device: torch.device | str = "cpu",  # where the inputs are loaded and summed
    progress: bool = True,  # progress bars
    in_prefix: str | None = None,  # only inputs named {in_prefix}-KIMG-STD; None = any
    in_std: Sequence[float] | None = None,  # only inputs with these stds in their names; None = any
) -> list[pathlib.Path]:
    """Reconstruct and write `{prefix}-{kimg:07d}-{std:.3f}.safetensors` files (atomically, in the model
    file format of training snapshots); returns the paths written (or kept, with skip_existing)."""
    if not re.fullmatch(r"[A-Za-z0-9._-]+", prefix):
        raise ValueError(f"prefix must be a plain file-name prefix (letters, digits, . _ -), got {prefix!r}")
    stds = parse_std_list(out_std)
    infos = scan_snapshots(indir, in_prefix=in_prefix, in_std=in_std)
    _, out_nimg = select_inputs(infos, out_kimg)
    outdir = pathlib.Path(outdir)
    paths = {std: outdir / output_filename(prefix, out_nimg // 1000, std) for std in stds}
    if len(set(paths.values())) != len(paths):
        raise ValueError(f"out_std {list(stds)}: some stds are equal to 3 decimals and would share an output file name")
    # An output named as a snapshot of the run in its folder would replace it: every file named PREFIX-KIMG-STD
    # there counts, not only the inputs selected; an earlier reconstruction (its header says so) may be replaced.
    named = {p.resolve() for p in filter_snapshot_names(pathlib.Path(indir).iterdir())}
    for path in paths.values():
        if not skip_existing and path.resolve() in named and not _is_reconstruction(path):
            raise ValueError(f"the output {path} would replace a snapshot of the run; give another outdir or "
                             "prefix (--outdir, --prefix)")
    outdir.mkdir(parents=True, exist_ok=True)
    todo = StdList(std for std in stds if not (skip_existing and paths[std].exists()))  # checked: a part of stds
    if todo:
        for rec in reconstruct(infos, todo, out_kimg=out_kimg, batch=batch, device=device, progress=progress):
            model_files.save_network(
                paths[rec.std],
                rec.net,
                encoder=rec.encoder,
                ema_std=rec.std,
                training_nimg=rec.nimg,
                extra={"phema": {"inputs": list(rec.coefs), "coefs": list(rec.coefs.values())}},
            )
    return [paths[std] for std in stds]


__all__ = [
    "OUTPUT_PREFIX",
    "SNAPSHOT_PATTERNS",
    "STD_LIMIT",
    "ReconstructedNetwork",
    "SnapshotError",
    "SnapshotInfo",
    "StdList",
    "filter_snapshot_names",
    "output_filename",
    "parse_std_list",
    "read_snapshot_info",
    "reconstruct",
    "reconstruct_to_dir",
    "scan_snapshots",
    "select_inputs",
]
