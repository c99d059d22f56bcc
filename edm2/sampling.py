"""Sampler settings for generation: a solver, a schedule, guidance and the solver's options, validated once
(docs/design.md §7), and the command-line options that set them (generate.py, calculate_metrics.py gen,
sweep_solvers.py).

    settings = sampling_settings('dpmpp_2m_sde', num_steps=20, schedule='log_linear', eta=1.0)
    settings.evals.total_evals      # network evaluations per image, guidance included
    sigmas = settings.sigmas(device)

Every bad value raises SamplingOptionError (a ValueError) whose `option` is the argument's name, so that a
command line can name its own option for it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import click
import torch

from . import schedules
from .guidance import SamplerStats, check_guidance_interval
from .solvers import SOLVERS, count_evaluations, get_solver

__all__ = ["SamplingOptionError", "SamplingSettings", "sampling_settings", "solver_click_options", "settings_from_cli"]

CHURN_SOLVERS = ("euler", "heun")  # the solvers with EDM's churn (S_churn, S_min, S_max, S_noise)
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
        """The schedule in the state's dtype on `device` (karras computed there, as edm_sampler does)."""
        if isinstance(self.schedule, tuple):
            return schedules.explicit(self.schedule, dtype=self.dtype, device=device)
        if self.schedule == "log_linear":
            return schedules.log_linear(self.num_steps, self.sigma_min, self.sigma_max, dtype=self.dtype, device=device)
        return schedules.karras(
            self.num_steps, self.sigma_min, self.sigma_max, self.rho, dtype=self.dtype, device=device
        )

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
    try:
        guidance = float(guidance)
        if not math.isfinite(guidance):
            raise ValueError(f"guidance must be finite, got {guidance!r}")
    except (TypeError, ValueError):
        raise SamplingOptionError("guidance", f"guidance must be a finite number, got {guidance!r}") from None
    try:
        interval = check_guidance_interval(guidance_interval)
    except ValueError as e:
        raise SamplingOptionError("guidance_interval", str(e)) from None
    settings = dict(solver=solver, schedule=schedule, num_steps=num_steps, sigma_min=float(sigma_min),
                    sigma_max=float(sigma_max), rho=float(rho), guidance=guidance, guidance_interval=interval,
                    options=dict(options), dtype=dtype)
    try:
        sigmas = SamplingSettings(**settings, evals=SamplerStats()).sigmas("cpu")
    except ValueError as e:
        raise SamplingOptionError(_option_of(e, "schedule"), str(e)) from None
    try:  # runs the solver on one pixel: checks its options and counts what it evaluates
        evals = count_evaluations(solver, sigmas, guidance, interval, **options)
    except ValueError as e:
        raise SamplingOptionError(_option_of(e, "solver"), str(e)) from None
    return SamplingSettings(**settings, evals=evals)


# ----------------------------------------------------------------------------------------------------------
# Command-line options

CLI_NAMES = {
    "solver": "--sampler", "num_steps": "--steps", "schedule": "--schedule", "sigma_min": "--sigma-min",
    "sigma_max": "--sigma-max", "rho": "--rho", "S_churn": "--s-churn", "S_min": "--s-min", "S_max": "--s-max",
    "S_noise": "--s-noise", "s_noise": "--s-noise", "eta": "--eta", "solver_type": "--solver-type",
    "guidance": "--guidance", "guidance_interval": "--guidance-interval",
}


def _solver_help() -> str:
    return "Solver: " + "; ".join(f"{name} ({entry.summary})" for name, entry in SOLVERS.items())


def solver_click_options(f: Callable) -> Callable:
    """The sampler options of the command-line tools: --sampler, --steps, --schedule, the schedule's noise
    levels, churn (euler, heun), --eta, --s-noise, --solver-type. settings_from_cli turns them into settings."""
    options = [
        click.option("--sampler", "solver", type=click.Choice(list(SOLVERS)), default="heun", show_default=True,
                     help=_solver_help()),
        click.option("--steps", "num_steps", type=int, default=32, show_default=True,
                     help="Sampling steps N (heun: 2N - 1 evaluations, the others N)"),
        click.option("--schedule", default="karras", show_default=True, metavar="karras|log_linear|LIST",
                     help="Noise levels: EDM's (rho), log-linear, or an explicit decreasing list such as 80,10,1,0.1 "
                     "(then --steps is its length)"),
        click.option("--sigma-min", "--sigma_min", "sigma_min", type=float, default=0.002, show_default=True,
                     help="Lowest noise level"),
        click.option("--sigma-max", "--sigma_max", "sigma_max", type=float, default=80.0, show_default=True,
                     help="Highest noise level"),
        click.option("--rho", type=float, default=7.0, show_default=True, help="Time-step exponent (karras)"),
        click.option("--s-churn", "--S_churn", "S_churn", type=float, default=0.0, show_default=True,
                     help="euler, heun: churn amount (0 = deterministic ODE)"),
        click.option("--s-min", "--S_min", "S_min", type=float, default=0.0, show_default=True,
                     help="euler, heun: churn only for sigma >= this"),
        click.option("--s-max", "--S_max", "S_max", type=float, default=math.inf, show_default=True,
                     help="euler, heun: churn only for sigma <= this"),
        click.option("--s-noise", "--S_noise", "S_noise", type=float, default=1.0, show_default=True,
                     help="Scale of the injected noise (churn; euler_ancestral and the SDE solvers)"),
        click.option("--eta", type=float, default=None,
                     help="euler_ancestral, dpmpp_2m_sde, dpmpp_3m_sde: noise amount (0 = ODE)  [default: 1]"),
        click.option("--solver-type", type=click.Choice(["midpoint", "heun"]), default=None,
                     help="dpmpp_2m_sde: 2nd-order term  [default: midpoint]"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


SOLVER_CLI_PARAMS = ("solver", "num_steps", "schedule", "sigma_min", "sigma_max", "rho", "S_churn", "S_min", "S_max",
                     "S_noise", "eta", "solver_type")


def _bad(option: str, message: str) -> click.BadParameter:
    return click.BadParameter(message, param_hint=f"'{CLI_NAMES.get(option, option)}'")


def parse_schedule_option(text: str) -> str | list[float]:
    """--schedule: a schedule's name or comma-separated noise levels (ValueError otherwise)."""
    if text in schedules.SCHEDULES:
        return text
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(
            f"expected {', '.join(schedules.SCHEDULES)} or a comma-separated list of noise levels, got {text!r}"
        ) from None


def settings_from_cli(
    params: dict[str, Any],
    guidance: float = 1,
    guidance_interval: Sequence[float] | None = None,
    steps_given: bool = True,
    dtype: torch.dtype = torch.float32,
) -> SamplingSettings:
    """SamplingSettings from the values of solver_click_options (params holds at least SOLVER_CLI_PARAMS);
    click.BadParameter naming the option otherwise. steps_given: whether --steps was on the command line
    (with an explicit schedule it must then match the list)."""
    solver = params["solver"]
    options: dict[str, Any] = {}
    if solver in CHURN_SOLVERS:
        options.update(S_churn=params["S_churn"], S_min=params["S_min"], S_max=params["S_max"],
                       S_noise=params["S_noise"])
    else:
        for name, default in (("S_churn", 0.0), ("S_min", 0.0), ("S_max", math.inf)):
            if params[name] != default:
                raise _bad(name, f"churn is for {' and '.join(CHURN_SOLVERS)} only, not --sampler {solver}")
    takes = get_solver(solver).options
    for name in ("eta", "solver_type"):
        if params[name] is not None:
            if name not in takes:
                raise _bad(name, f"--sampler {solver} takes no {CLI_NAMES[name]}")
            options[name] = params[name]
    if solver not in CHURN_SOLVERS:
        if "s_noise" in takes:
            options["s_noise"] = params["S_noise"]
        elif params["S_noise"] != 1:
            raise _bad("s_noise", f"--sampler {solver} adds no noise")
    try:
        schedule = parse_schedule_option(params["schedule"])
    except ValueError as e:
        raise _bad("schedule", str(e)) from None
    num_steps = params["num_steps"] if steps_given or isinstance(schedule, str) else None
    try:
        return sampling_settings(solver, num_steps, schedule, params["sigma_min"], params["sigma_max"], params["rho"],
                                 guidance, guidance_interval, dtype=dtype, **options)
    except SamplingOptionError as e:
        raise _bad(e.option, str(e)) from None
