"""Sampler settings for generation: a solver, a schedule, guidance and the solver's options, validated once, here,
where they enter the library (docs/design.md §7). The command-line options that set them are edm2/cli.py's.

    settings = sampling_settings('dpmpp_2m_sde', num_steps=20, schedule='log_linear', eta=1.0)
    settings.evals.total_evals      # network evaluations per image, guidance included
    sigmas = settings.sigmas(device)
    settings.evaluation_sigmas()    # the noise levels at which the solver evaluates the denoiser

Every bad value raises SamplingOptionError (a ValueError) whose `option` is the argument's name, so that a
command line can name its own option for it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import schedules
from .guidance import Denoiser, GuidedDenoiser, SamplerStats, check_guidance, check_guidance_interval
from .solvers import NoiseSource, get_solver

__all__ = ["CHURN_SOLVERS", "MAX_STEPS", "SamplingOptionError", "SamplingSettings", "sampling_settings"]

CHURN_SOLVERS = ("euler", "heun")  # the solvers with EDM's churn (S_churn, S_min, S_max, S_noise)
MAX_STEPS = 100_000  # sampling steps per image at most: far more than any schedule gains from
_RUN_OPTIONS = ("noise", "dtype", "callback")  # solver arguments that generation itself supplies


class SamplingOptionError(ValueError):
    """A bad sampler setting; `option` is the argument's name (solver, num_steps, schedule, eta, ...)."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """Checked sampler settings; `evals` holds the network evaluations per image they cost."""

    solver: str
    schedule: str | tuple[float, ...]  # a name of edm2.schedules.SCHEDULES or explicit noise levels
    num_steps: int
    sigma_min: float
    sigma_max: float
    rho: float
    guidance: float
    guidance_interval: tuple[float, float] | None
    options: dict[str, Any]  # keyword options of the solver (S_churn, eta, solver_type, ...)
    dtype: torch.dtype  # precision of the solver's state
    evals: SamplerStats

    def sigmas(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The schedule in the state's dtype on `device` (karras computed there, as edm_sampler does). The
        settings were checked when they were made (sampling_settings), so the schedule is not checked again."""
        if isinstance(self.schedule, tuple):  # explicit levels, final 0 included, as schedules.explicit made them
            return torch.tensor(self.schedule, dtype=torch.float64).to(dtype=self.dtype, device=device)
        if self.schedule == "log_linear":
            return schedules.log_linear_unchecked(self.num_steps, self.sigma_min, self.sigma_max, self.dtype, device)
        return schedules.karras_unchecked(self.num_steps, self.sigma_min, self.sigma_max, self.rho, self.dtype, device)

    @property
    def needs_guide(self) -> bool:
        """Whether sampling evaluates a guiding network (guidance 1 never does)."""
        return self.guidance != 1

    def evaluation_sigmas(self) -> list[float]:
        """The noise levels at which the solver evaluates the main network, in order, as it passes them (in the
        state's dtype): traced by running it on one pixel, like `evals`."""
        return _trace(self)[1]

    def run(
        self,
        denoiser: Denoiser,
        x: torch.Tensor,
        sigmas: torch.Tensor,
        noise: NoiseSource | None = None,
        callback: Callable[[int, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """The solver with these settings' options from x at sigmas[0] (self.sigmas(x.device), x in self.dtype)
        along sigmas, without checking again what the settings checked when they were made."""
        return get_solver(self.solver).function.core(denoiser, x, sigmas, noise=noise, dtype=self.dtype,
                                                     callback=callback, **self.options)

    def describe(self) -> str:
        """One line: solver, steps, schedule, options and the evaluations per image."""
        schedule = "explicit" if isinstance(self.schedule, tuple) else self.schedule
        options = "".join(f", {k}={v}" for k, v in self.options.items())
        return (f"{self.solver}, {self.num_steps} steps, {schedule} schedule{options}: "
                f"{self.evals.total_evals} network evaluations per image")


def _option_of(error: ValueError, default: str) -> str:
    """The argument a ValueError of edm2.schedules / edm2.solvers is about: its messages start with its name."""
    word = str(error).split(" ", 1)[0]
    return {"sigmas": "schedule"}.get(word, word if word.isidentifier() else default)


def sampling_settings(
    solver: str = "heun",
    num_steps: int | None = 32,
    schedule: str | Sequence[float] = "karras",
    sigma_min: float = 0.002,
    sigma_max: float = 80,
    rho: float = 7,
    guidance: float = 1,
    guidance_interval: Sequence[float] | None = None,
    dtype: torch.dtype = torch.float32,
    **options: Any,
) -> SamplingSettings:
    """Check every setting once and count the evaluations per image. schedule: 'karras' (EDM, the default),
    'log_linear', or explicit noise levels (then num_steps must be None or their count). dtype: the state's
    precision (float32 by default, as the official generator). options: the solver's own (see SOLVERS)."""
    try:
        entry = get_solver(solver)
    except ValueError as e:
        raise SamplingOptionError("solver", str(e)) from None
    for name in options:
        if name not in entry.options or name in _RUN_OPTIONS:
            allowed = [o for o in entry.options if o not in _RUN_OPTIONS]
            raise SamplingOptionError(
                name, f"solver {solver!r} takes no option {name!r}; its options: {', '.join(allowed) or 'none'}"
            )
    if isinstance(schedule, str):
        if schedule not in schedules.SCHEDULES:
            raise SamplingOptionError(
                "schedule", f"unknown schedule {schedule!r}: expected {', '.join(schedules.SCHEDULES)} or a list"
            )
        schedule = "karras" if schedules.SCHEDULES[schedule] is schedules.karras else schedule
        if not isinstance(num_steps, int) or isinstance(num_steps, bool):
            raise SamplingOptionError("num_steps", f"num_steps must be an integer, got {num_steps!r}")
    else:
        try:
            schedule = tuple(schedules.explicit(list(schedule)).tolist())
        except (TypeError, ValueError) as e:
            raise SamplingOptionError("schedule", str(e)) from None
        if num_steps is not None and num_steps != len(schedule) - 1:
            raise SamplingOptionError(
                "num_steps", f"num_steps {num_steps} does not match the explicit schedule's {len(schedule) - 1} steps"
            )
        num_steps = len(schedule) - 1
    if num_steps < entry.min_steps:
        raise SamplingOptionError("num_steps", f"num_steps must be at least {entry.min_steps} for {solver!r}, "
                                  f"got {num_steps}")
    if num_steps > MAX_STEPS:  # far past any gain; a number beyond int64 once overflowed mid-run
        raise SamplingOptionError("num_steps", f"num_steps must be at most {MAX_STEPS}, got {num_steps}")
    try:
        guidance = check_guidance(guidance)
    except ValueError as e:
        raise SamplingOptionError("guidance", str(e)) from None
    try:
        interval = check_guidance_interval(guidance_interval)
    except ValueError as e:
        raise SamplingOptionError("guidance_interval", str(e)) from None
    bounds = {}
    for name, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max), ("rho", rho)):
        try:
            bounds[name] = float(value)
        except (TypeError, ValueError):
            raise SamplingOptionError(name, f"{name} must be a number, got {value!r}") from None
    try:  # the solver's own checks, once: run() then passes the normalised values unchecked
        options = entry.function.check_options(options)
    except ValueError as e:
        raise SamplingOptionError(_option_of(e, "solver"), str(e)) from None
    settings = dict(solver=solver, schedule=schedule, num_steps=num_steps, **bounds, guidance=guidance,
                    guidance_interval=interval, options=options, dtype=dtype)
    if isinstance(schedule, str):  # explicit levels were checked above
        try:
            schedules.check_schedule(num_steps, settings["sigma_min"], settings["sigma_max"],
                                     settings["rho"] if schedule == "karras" else 1.0)  # log_linear has no rho
        except ValueError as e:
            raise SamplingOptionError(_option_of(e, "schedule"), str(e)) from None
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise SamplingOptionError("dtype", f"dtype must be a floating-point torch dtype, got {dtype!r}")
    unchecked = SamplingSettings(**settings, evals=SamplerStats())
    try:  # in the state's dtype, explicit levels too close together would merge
        schedules.check_sigmas(unchecked.sigmas("cpu"))
    except ValueError as e:
        raise SamplingOptionError("schedule", str(e)) from None
    # Every value is checked now: a dry run on one pixel counts what the solver evaluates.
    return SamplingSettings(**settings, evals=_trace(unchecked)[0])


def _trace(settings: SamplingSettings) -> tuple[SamplerStats, list[float]]:
    """(evaluations per image, noise levels of the main network's evaluations) of a dry run of the settings."""
    seen: list[float] = []

    def main(x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        seen.append(float(sigma))
        return torch.zeros_like(x)

    def guide(x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        return torch.zeros_like(x)

    def no_noise(x: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
        return torch.zeros_like(x)

    den = GuidedDenoiser.of_settings(main, guide if settings.needs_guide else None, settings)
    settings.run(den, torch.zeros([1, 1, 1, 1], dtype=settings.dtype), settings.sigmas("cpu"), noise=no_noise)
    return den.stats, seen
