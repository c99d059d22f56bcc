"""The command-line options that several scripts share (generate.py, calculate_metrics.py, sweep_solvers.py,
reconstruct_phema.py, phema_sweep.py): scripts import them from here, never from each other.

The options only parse text into values; the library checks the values where they enter it (edm2.sampling's
settings, GuidedDenoiser, edm2.phema.parse_std_list), and `bad_option` turns its ValueError into a click error
that names the option:

    @click.command()
    @model_click_options
    @solver_click_options
    def main(preset, net_path, gnet_path, guidance, guidance_interval, **solver_params):
        net_path, gnet_path, guidance = resolve_model_options(preset, net_path, gnet_path, guidance)
        settings = sampling_settings_from_cli(solver_params, guidance, guidance_interval, gnet_path)
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import click
import torch

from accel import check_fp8_device
from torch_utils import distributed as dist

from . import official  # official.resolve_official_preset looked up at call time: tests stand in for it
from .generation import COMPILE_MIN_IMAGES, images_per_process, load_for_sampling, prepare_for_sampling, sampling_plan
from .model_files import NetworkFile
from .phema_reconstruct import StdList, parse_std_list
from .sampling import CHURN_SOLVERS, SamplingOptionError, SamplingSettings, sampling_settings
from .schedules import SCHEDULES
from .seeds import parse_seeds
from .solvers import SOLVERS, get_solver

__all__ = [
    "CLI_NAMES", "NumberRange", "bad_option", "check_device_option", "check_fp8_option", "check_output_path",
    "check_speed_options", "guidance_interval_option", "load_option", "make_output_dir", "model_click_options",
    "out_of_memory_names", "prepare_option", "resolve_model_options", "sampling_settings_from_cli", "seeds_option",
    "settings_from_cli", "solver_click_options", "speed_click_options", "std_list_option", "writing_names",
]

# Library argument -> the option that sets it, for error messages.
CLI_NAMES = {
    "solver": "--sampler", "num_steps": "--steps", "schedule": "--schedule", "sigma_min": "--sigma-min",
    "sigma_max": "--sigma-max", "rho": "--rho", "S_churn": "--s-churn", "S_min": "--s-min", "S_max": "--s-max",
    "S_noise": "--s-noise", "s_noise": "--s-noise", "eta": "--eta", "solver_type": "--solver-type",
    "guidance": "--guidance", "guidance_interval": "--guidance-interval", "gnet": "--gnet", "net": "--net",
    "class_idx": "--class",
}


def bad_option(option: str, message: str, names: dict[str, str] | None = None) -> click.BadParameter:
    """A click error naming the option that sets the library argument `option` (or `option` itself)."""
    names = CLI_NAMES if names is None else {**CLI_NAMES, **names}
    return click.BadParameter(message, param_hint=f"'{names.get(option, option)}'")


# ----------------------------------------------------------------------------------------------------------
# Parsing callbacks


class NumberRange(click.FloatRange):
    """click.FloatRange that also refuses nan, which passes every range check (each comparison is false), and with
    `finite` also an infinity."""

    def __init__(self, *args: Any, finite: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.finite = finite

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        number = super().convert(value, param, ctx)
        if math.isnan(number) or (self.finite and math.isinf(number)):
            self.fail(f"expected a {'finite ' if self.finite else ''}number, got {number}", param, ctx)
        return number


def seeds_option(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    """--seeds: 0-63,100,200-299 as a list of seeds."""
    try:
        return parse_seeds(value)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from None


def guidance_interval_option(ctx: click.Context, param: click.Parameter, value: str | None) -> list[float] | None:
    """--guidance-interval: LO,HI as numbers (the sampler's settings check them)."""
    if value is None:
        return None
    try:
        return [float(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter(
            f"expected SIGMA_LO,SIGMA_HI with 0 <= SIGMA_LO < SIGMA_HI (e.g. 0.28,5.42), got {value!r}",
            ctx=ctx, param=param,
        ) from None


def std_list_option(ctx: click.Context, param: click.Parameter, value: str | None) -> StdList | None:
    """A list of EMA stds (ranges like 0.010,0.015,...,0.250), parsed and checked once (edm2.phema.parse_std_list):
    the library takes the StdList as it is."""
    if value is None:
        return None
    try:
        return parse_std_list(value)
    except ValueError as error:
        raise click.BadParameter(str(error), ctx=ctx, param=param) from None


# ----------------------------------------------------------------------------------------------------------
# The networks: --preset, --net, --gnet, --guidance, --guidance-interval


def model_click_options(f: Callable) -> Callable:
    """--preset, --net, --gnet, --guidance, --guidance-interval (resolve_model_options combines them)."""
    options = [
        click.option("--preset", metavar="NAME",
                     help="Official model preset (sets --net, --gnet, --guidance; explicit options win)"),
        click.option("--net", "net_path", metavar="PATH|URL",
                     help="Main network: model file or official .pkl, path or http(s) URL"),
        click.option("--gnet", "gnet_path", metavar="PATH|URL",
                     help="Guiding network (unconditional, or smaller / less trained); used when --guidance is not 1"),
        click.option("--guidance", type=float, default=None,
                     help="Guidance weight w in D_g + w (D - D_g)  [default: preset's, else 1]"),
        click.option("--guidance-interval", metavar="LO,HI", callback=guidance_interval_option,
                     help="Guide only for sigma in (LO, HI]"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def resolve_model_options(
    preset: str | None, net_path: str | None, gnet_path: str | None, guidance: float | None
) -> tuple[str, str | None, float]:
    """--preset fills in --net, --gnet and --guidance; explicit options win. Guidance defaults to 1."""
    if preset is not None:
        try:
            settings = official.resolve_official_preset(preset)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="'--preset'") from None
        net_path, gnet_path = net_path or settings["net"], gnet_path or settings["gnet"]
        guidance = settings["guidance"] if guidance is None else guidance
    if net_path is None:
        raise click.UsageError("give the network: --net PATH|URL or --preset NAME")
    return net_path, gnet_path, 1.0 if guidance is None else guidance


def load_option(option: str, path_or_url: str, device: torch.device, precision: str | None = None) -> NetworkFile:
    """edm2.generation.load_for_sampling with errors that name the option (--precision fp8 is checked against the
    device first); under torchrun rank 0 downloads first, the others then read the cache."""
    check_fp8_option(precision, device)
    if not dist.is_main():
        dist.barrier()
    try:
        return load_for_sampling(path_or_url, device, precision)
    except (OSError, ValueError, RuntimeError) as e:
        raise click.BadParameter(f"cannot load {path_or_url!r}: {e}", param_hint=f"'{option}'") from None
    finally:
        if dist.is_main():
            dist.barrier()


# ----------------------------------------------------------------------------------------------------------
# How the networks run: --kernels, --compile


def speed_click_options(f: Callable) -> Callable:
    """--kernels and --compile/--no-compile of the sampling tools (check_speed_options, then prepare_option)."""
    options = [
        click.option(
            "--kernels", type=click.Choice(["fast", "reference"]), default="fast",
            help="CUDA only: fast (fused attention, channels-last, cuDNN autotuning) or reference (the official "
            "code's operations in its order: its images per seed to the last level as far as the GPU allows; "
            "slower, never compiled). The CPU always computes in the reference order",
        ),
        click.option(
            "--compile/--no-compile", "compile_net", default=None,
            help="torch.compile the network(s) for the sampler: faster sampling on a GPU after a minute of "
            "compiling, seconds when this machine compiled the same network before  [default: on with CUDA "
            f"and fast kernels when a process samples {COMPILE_MIN_IMAGES} images or more]",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def check_speed_options(kernels: str, compile_net: bool | None, precision: str | None = None) -> None:
    """Before anything is loaded: --compile or --precision fp8 with --kernels reference is refused."""
    if kernels == "reference" and compile_net:
        raise click.BadParameter("reference kernels run the network uncompiled; drop --compile",
                                 param_hint="'--kernels'")
    if kernels == "reference" and precision == "fp8":
        raise click.BadParameter("fp8: the reference kernels never use FP8; use --kernels fast or another precision",
                                 param_hint="'--precision'")


def check_fp8_option(precision: str | None, device: torch.device) -> None:
    """--precision fp8 on a device without FP8 matrix units: click error naming the option (before loading)."""
    if precision != "fp8":
        return
    try:
        check_fp8_device(device)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--precision'") from None


def prepare_option(
    net: torch.nn.Module, kernels: str, compile_net: bool | None, seeds: list[int], batch_size: int,
    precision: str | None = None, announce: bool = False,
) -> torch.nn.Module:
    """edm2.generation.prepare_for_sampling for these options and this process's share of the seeds (with the FP8
    convolutions for --precision fp8, whose device load_option checked and kernels check_speed_options).
    `announce`: print what runs (rank 0), e.g. that the first batch waits for the compiler."""
    speed = dict(compile=compile_net, reference=kernels == "reference",
                 num_images=images_per_process(seeds, batch_size), fp8=precision == "fp8")  # fmt: skip
    if announce:
        plan = sampling_plan(next(net.parameters()).device, **speed)
        dist.print0(f"Speed: {plan.describe('the first batch waits for the compiler')}.")
    return prepare_for_sampling(net, **speed)


@contextlib.contextmanager
def out_of_memory_names(option: str, hint: str) -> Iterator[None]:
    """A GPU out of memory inside the block becomes one line that names the option to lower (and `hint`, what it
    means) instead of a traceback."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise click.ClickException(f"out of GPU memory; give a smaller {option} ({hint})") from None


# ----------------------------------------------------------------------------------------------------------
# Devices


def check_device_option(device: str, option: str = "--device") -> torch.device:
    """--device: cpu, cuda or cuda:N that this machine has; click error naming the option otherwise."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise click.BadParameter(f"expected cpu, cuda or cuda:N, got {device!r}", param_hint=f"'{option}'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter(f"{device}: no CUDA device on this machine; use {option} cpu",
                                 param_hint=f"'{option}'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise click.BadParameter(f"{device}: this machine has {torch.cuda.device_count()} CUDA device(s)",
                                 param_hint=f"'{option}'")
    return dev


# ----------------------------------------------------------------------------------------------------------
# Outputs: a file or folder that cannot be written is one line naming the option, not an OSError traceback


def check_output_path(option: str, path: str | os.PathLike) -> None:
    """Before the work: the folder that would hold `path` (a file) must be creatable and writable, judged by its
    nearest existing ancestor, so that a long run does not end in a failed write. Creates nothing."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise click.BadParameter(f"cannot write {os.fspath(path)!r}: {folder!r} is a file, not a folder",
                                 param_hint=f"'{option}'")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise click.BadParameter(f"cannot write {os.fspath(path)!r}: no permission to write in {folder!r}",
                                 param_hint=f"'{option}'")


def make_output_dir(option: str, folder: str | os.PathLike) -> None:
    """os.makedirs(folder, exist_ok=True), its failure a click error naming the option."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise click.BadParameter(f"cannot create the folder {os.fspath(folder)!r} ({e.strerror or e})",
                                 param_hint=f"'{option}'") from None


@contextlib.contextmanager
def writing_names(option: str, path: str | os.PathLike) -> Iterator[None]:
    """A failed write inside the block (a folder that cannot be made, no permission, a full disk) becomes one line
    naming the option and the path."""
    try:
        yield
    except OSError as e:
        raise click.ClickException(f"cannot write {option} {os.fspath(path)!r} ({e.strerror or e})") from None


# ----------------------------------------------------------------------------------------------------------
# The sampler: --sampler, --steps, --schedule, ...


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


def parse_schedule_option(text: str) -> str | list[float]:
    """--schedule: a schedule's name or comma-separated noise levels (ValueError otherwise)."""
    if text in SCHEDULES:
        return text
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(
            f"expected {', '.join(SCHEDULES)} or a comma-separated list of noise levels, got {text!r}"
        ) from None


def settings_from_cli(
    params: dict[str, Any],
    guidance: float = 1,
    guidance_interval: Any = None,
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
                raise bad_option(name, f"churn is for {' and '.join(CHURN_SOLVERS)} only, not --sampler {solver}")
    takes = get_solver(solver).options
    for name in ("eta", "solver_type"):
        if params[name] is not None:
            if name not in takes:
                raise bad_option(name, f"--sampler {solver} takes no {CLI_NAMES[name]}")
            options[name] = params[name]
    if solver not in CHURN_SOLVERS:
        if "s_noise" in takes:
            options["s_noise"] = params["S_noise"]
        elif params["S_noise"] != 1:
            raise bad_option("s_noise", f"--sampler {solver} adds no noise")
    try:
        schedule = parse_schedule_option(params["schedule"])
    except ValueError as e:
        raise bad_option("schedule", str(e)) from None
    num_steps = params["num_steps"] if steps_given or isinstance(schedule, str) else None
    try:
        return sampling_settings(solver, num_steps, schedule, params["sigma_min"], params["sigma_max"], params["rho"],
                                 guidance, guidance_interval, dtype=dtype, **options)
    except SamplingOptionError as e:
        raise bad_option(e.option, str(e)) from None


def sampling_settings_from_cli(
    params: dict[str, Any], guidance: float, guidance_interval: Any, gnet_path: str | None
) -> SamplingSettings:
    """settings_from_cli for the current click command (whether --steps was given is read from its context),
    and a guiding network must be given when the settings need one."""
    ctx = click.get_current_context()
    steps_given = ctx.get_parameter_source("num_steps") != click.core.ParameterSource.DEFAULT
    settings = settings_from_cli(params, guidance, guidance_interval, steps_given)
    # Options the schedule would ignore: an explicit list sets every noise level, log-linear spacing has no rho.
    explicit = not isinstance(settings.schedule, str)
    uses = dict(sigma_min=not explicit, sigma_max=not explicit, rho=settings.schedule == "karras")
    for name, used in uses.items():
        if not used and ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT:
            kind = "an explicit list" if explicit else f"--schedule {settings.schedule}"
            raise bad_option(name, f"{CLI_NAMES[name]} does not apply to {kind}")
    if settings.needs_guide and gnet_path is None:
        raise bad_option("guidance", f"guidance {settings.guidance} needs a guiding network: give --gnet (or use "
                         "--guidance 1)")
    return settings
