"""The NFE sweep: several solvers at several step counts on one model, each scored, against the network
evaluations they cost (sweep_solvers.py; docs/design.md §7).

Scores: FID or FD_DINOv2 against reference statistics (edm2.metrics; needs the detector weights), or, where
neither is at hand (the CPU, CI), a proxy that needs no download: the mean RMS distance (0-255 pixel units) of
each solver's images to those of a high-step Heun run on the same seeds, i.e. how far the solver is from the
converged sample. Lower is better for all three. The proxy ranks deterministic solvers only: a stochastic one
(eta > 0, churn) ends on another sample of the distribution, far from the ODE's, however many steps it takes.
A solver "matches Heun-N" at the fewest swept steps whose score is at most that of Heun with N steps.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from torch_utils.state_io import atomic_write_bytes

from . import metrics as M
from .generation import generate_batch, generation_encoder, seed_batches
from .guidance import GuidedDenoiser
from .sampling import SamplingSettings, sampling_settings
from .solvers import get_solver

__all__ = ["SweepPlan", "SweepPoint", "SolverSweep", "image_distance_score", "fd_score", "plan_sweep", "run_sweep",
           "sweep_solvers"]

PROXY = "rms_to_reference"


@dataclasses.dataclass
class SweepPoint:
    solver: str
    steps: int
    evals: int  # network evaluations per image, guidance included
    value: float


@dataclasses.dataclass
class SolverSweep:
    metric: str  # 'fid', 'fd_dinov2' or PROXY
    note: str  # what the metric is measured against
    baseline: SweepPoint  # Heun with the baseline step count
    points: list[SweepPoint]

    def matches(self) -> dict[str, SweepPoint | None]:
        """Per solver: the fewest swept steps scoring at most the baseline (None if no step count does)."""
        out: dict[str, SweepPoint | None] = {}
        for p in sorted(self.points, key=lambda p: p.steps):
            out.setdefault(p.solver, None)
            if out[p.solver] is None and p.value <= self.baseline.value:
                out[p.solver] = p
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric, "note": self.note, "baseline": dataclasses.asdict(self.baseline),
            "points": [dataclasses.asdict(p) for p in self.points],
            "matches": {k: (None if v is None else dataclasses.asdict(v)) for k, v in self.matches().items()},
        }

    def markdown(self) -> str:
        b = self.baseline
        lines = [f"Metric: {self.metric} ({self.note}); lower is better.", "",
                 f"Baseline: heun, {b.steps} steps, {b.evals} evaluations per image: {b.value:.4g}", "",
                 "| solver | steps | evaluations per image | " + self.metric + " |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {p.solver} | {p.steps} | {p.evals} | {p.value:.4g} |" for p in self.points]
        lines += ["", f"Fewest steps at or below the baseline ({b.value:.4g}):", "",
                  "| solver | steps | evaluations per image |", "| --- | ---: | ---: |"]
        for solver, p in self.matches().items():
            lines.append(f"| {solver} | {p.steps} | {p.evals} |" if p else f"| {solver} | not reached | |")
        return "\n".join(lines) + "\n"


Score = Callable[[SamplingSettings], float]


def _images(net, seeds, settings, gnet, class_idx, batch_size, encoder) -> torch.Tensor:
    denoiser = GuidedDenoiser.from_settings(net, None, gnet, settings)
    return torch.cat([generate_batch(net, b, gnet, encoder, class_idx, settings=settings, denoiser=denoiser)
                      for b in seed_batches(seeds, batch_size)])


def image_distance_score(
    net: torch.nn.Module,
    seeds: Sequence[int],
    reference: SamplingSettings,
    gnet: torch.nn.Module | None = None,
    class_idx: int | None = None,
    batch_size: int = 32,
    encoder_settings: dict[str, Any] | None = None,
) -> Score:
    """The proxy score: settings -> mean over seeds of the RMS distance (0-255) of its images to the
    `reference` sampler's images of the same seeds (generated once, here)."""
    encoder = generation_encoder(net, encoder_settings)
    target = _images(net, seeds, reference, gnet, class_idx, batch_size, encoder).double()

    def score(settings: SamplingSettings) -> float:
        images = _images(net, seeds, settings, gnet, class_idx, batch_size, encoder).double()
        return (images - target).square().mean(dim=[1, 2, 3]).sqrt().mean().item()

    return score


def fd_score(
    net: torch.nn.Module,
    seeds: Sequence[int],
    ref: str | os.PathLike,
    metric: str,
    gnet: torch.nn.Module | None = None,
    class_idx: int | None = None,
    batch_size: int = 32,
    encoder_settings: dict[str, Any] | None = None,
    weights: dict[str, Any] | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> Score:
    """settings -> FID / FD_DINOv2 of the model's images against the reference statistics (edm2.metrics); the
    reference and the detector are loaded once, here."""
    reference = M.load_reference(ref)
    detectors = M.load_detectors([metric], weights, device, progress)

    def score(settings: SamplingSettings) -> float:
        return M.calc_metrics_for_model(
            net, reference, [metric], seeds, batch_size=batch_size, gnet=gnet, encoder_settings=encoder_settings,
            class_idx=class_idx, detectors=detectors, device=device, progress=progress, settings=settings,
        )[metric]

    return score


@dataclasses.dataclass(frozen=True)
class SweepPlan:
    """The checked settings of a sweep: Heun at the baseline step count, then every solver at every step count."""

    baseline: SamplingSettings
    points: tuple[SamplingSettings, ...]


def plan_sweep(
    solvers: Sequence[str], steps: Sequence[int], baseline_steps: int = 32, **settings_kwargs: Any
) -> SweepPlan:
    """Every point's settings, checked (SamplingOptionError naming the setting): settings_kwargs go to
    sampling_settings (schedule, sigmas, guidance, ...); `eta` goes only to the solvers that take it."""
    points = []
    for solver in solvers:
        kwargs = dict(settings_kwargs)
        if "eta" in kwargs and "eta" not in get_solver(solver).options:
            kwargs.pop("eta")
        points += [sampling_settings(solver, n, **kwargs) for n in steps]
    base_kwargs = {k: v for k, v in settings_kwargs.items() if k != "eta"}
    return SweepPlan(sampling_settings("heun", baseline_steps, **base_kwargs), tuple(points))


def run_sweep(
    score: Score,
    plan: SweepPlan,
    metric: str = PROXY,
    note: str = "",
    progress: Callable[[str], None] | None = None,
) -> SolverSweep:
    """Score the baseline and every point of the plan."""

    def run(settings: SamplingSettings) -> SweepPoint:
        value = float(score(settings))
        if progress is not None:
            progress(f"{settings.describe()}: {metric} {value:.4g}")
        return SweepPoint(settings.solver, settings.num_steps, settings.evals.total_evals, value)

    baseline = run(plan.baseline)
    return SolverSweep(metric, note, baseline, [run(s) for s in plan.points])


def sweep_solvers(
    score: Score,
    solvers: Sequence[str],
    steps: Sequence[int],
    baseline_steps: int = 32,
    metric: str = PROXY,
    note: str = "",
    progress: Callable[[str], None] | None = None,
    **settings_kwargs: Any,
) -> SolverSweep:
    """Score every solver at every step count and Heun at baseline_steps (plan_sweep, then run_sweep): all
    settings are checked before the first image is generated."""
    return run_sweep(score, plan_sweep(solvers, steps, baseline_steps, **settings_kwargs), metric, note, progress)


def write_sweep(sweep: SolverSweep, outdir: str | os.PathLike, title: str | None = None) -> list[pathlib.Path]:
    """solver_sweep.json, solver_sweep.md and solver_sweep.png (the metric against the evaluations per image,
    one line per solver, the baseline dashed) in outdir, each written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    outdir = pathlib.Path(outdir)
    paths = [outdir / "solver_sweep.json", outdir / "solver_sweep.md", outdir / "solver_sweep.png"]
    atomic_write_bytes(paths[0], json.dumps(sweep.to_dict(), indent=2).encode())
    atomic_write_bytes(paths[1], sweep.markdown().encode())
    fig = Figure(figsize=(6, 4), dpi=150)
    ax = fig.add_subplot()
    for solver in dict.fromkeys(p.solver for p in sweep.points):
        pts = sorted((p for p in sweep.points if p.solver == solver), key=lambda p: p.evals)
        ax.plot([p.evals for p in pts], [p.value for p in pts], "-o", markersize=3, linewidth=1.2, label=solver)
    b = sweep.baseline
    ax.axhline(b.value, color="black", linewidth=0.8, linestyle="--", label=f"heun, {b.steps} steps ({b.evals} NFE)")
    ax.set_xscale("log", base=2)
    if all(p.value > 0 for p in [b, *sweep.points]):
        ax.set_yscale("log")
    ax.set_xlabel("network evaluations per image (NFE)")
    ax.set_ylabel(sweep.metric)
    ax.set_title(title or f"{sweep.metric} against network evaluations")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(paths[2], buffer.getvalue())
    return paths
