"""Solvers: plain functions that take a denoiser and a schedule and return the sample (docs/design.md §7).

    sigmas = edm2.schedules.karras(32)
    den = edm2.GuidedDenoiser.from_networks(net, labels, gnet, guidance=1.7)
    gens = edm2.SeedGenerators(seeds)
    x = edm2.solvers.sample('dpmpp_2m_sde', den, gens.randn(shape).double() * sigmas[0], sigmas,
                            noise=edm2.solvers.seed_noise(gens), eta=1.0)

Every solver is `solver(denoiser, x, sigmas, *, noise=None, dtype=torch.float64, callback=None, ...) -> x`:
x is the state at sigmas[0] ([N, C, H, W]; the solver works in `dtype`, float64 by default, and returns the
final state in it), sigmas a schedule of edm2.schedules (strictly decreasing, positive, usually ending in 0),
denoiser any `D(x, sigma)` of edm2.guidance (guidance lives there, so every solver can be guided), and
callback(i, x) is called after step i. The state's arithmetic uses the schedule as 0-dim tensors on x's device;
the denoiser and the noise source get sigma as a Python float of the same value, and every decision (churn, the
last step, the guidance interval) reads host values, so no step waits for the device. The step formulas are
the papers' update rules in the form that k-diffusion's sampling.py (Crowson, MIT) made standard;
tests/test_solvers.py checks each solver against numbers computed with that code (tests/data/NOTES.md).

- euler, heun: EDM Alg. 2 with Euler steps, resp. with Heun's 2nd-order correction (none on a step to
  sigma = 0). Optional churn (S_churn, S_min, S_max, S_noise) first raises sigma_i to
  sigma_hat = (1 + gamma) sigma_i with fresh noise, gamma = min(S_churn / N, sqrt(2) - 1) for
  S_min <= sigma_i <= S_max. `heun` computes exactly what edm2.sampler.edm_sampler computes, operation
  for operation, so its outputs are identical.
- euler_ancestral: an Euler step to sigma_down, then noise up to sigma_next, with
  sigma_up = min(sigma_next, eta sqrt(sigma_next^2 (sigma_i^2 - sigma_next^2) / sigma_i^2)) and
  sigma_down = sqrt(sigma_next^2 - sigma_up^2); eta 0 is the Euler (DDIM) ODE step.
- dpmpp_2m: DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Alg. 2) in t = -log sigma, first order on
  the first and last steps.
- dpmpp_2m_sde: its SDE variant (SDE-DPM-Solver++(2M) of the same paper), with eta scaling the injected noise
  (eta 0 gives the ODE solver) and solver_type 'midpoint' or 'heun' for the 2nd-order term.
- dpmpp_3m_sde: the third-order multistep SDE variant (k-diffusion's), eta as above.
The last step of the multistep solvers (to sigma = 0) returns the denoised estimate.

Noise: the stochastic solvers draw `noise(x, sigma, sigma_next)` (sigmas as floats), a tensor like x with unit
normal entries for the move from sigma to sigma_next (churn: from sigma_i to sigma_hat). A solver draws only
when it uses the draw (churn only where gamma > 0; ancestral and SDE steps only for eta > 0 and sigma_next > 0),
one draw per such step, in step order. `seed_noise(generators)` draws image k's noise from image k's own
generator, so images depend only on their seeds, not on the batch (what generation has always done for churn);
the default, noise=None, is torch.randn_like. Options are validated where they enter, with a ValueError that
names the option; `sample(name, ...)` also checks the solver's name, its options and its minimum step count.
Each solver function checks its arguments and then runs its steps, `solver.core`, which checks nothing: settings
checked once when made (edm2.sampling.SamplingSettings.run) run the steps of every batch through `.core`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable
from typing import Any, Protocol

import torch

from .guidance import Denoiser, GuidedDenoiser, SamplerStats
from .schedules import check_sigmas
from .seeds import SeedGenerators

__all__ = [
    "SOLVERS",
    "NoiseSource",
    "churn_gamma",
    "Solver",
    "count_evaluations",
    "dry_run",
    "sample",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_3m_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "seed_noise",
]


class NoiseSource(Protocol):
    def __call__(self, x: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor: ...


Callback = Callable[[int, torch.Tensor], None]


def churn_gamma(sigma: float, num_steps: int, S_churn: float, S_min: float, S_max: float) -> float:
    """Fraction by which a step raises the noise level before it (EDM Alg. 2); 0 when churn is off."""
    if S_churn > 0 and S_min <= sigma <= S_max:
        return min(S_churn / num_steps, math.sqrt(2) - 1)
    return 0.0


def seed_noise(generators: SeedGenerators) -> NoiseSource:
    """A noise source whose draw for image k comes from generators' k-th generator (seeded with image k's
    seed): per-seed noise, independent of the batch composition. x's first dimension must match."""
    if not isinstance(generators, SeedGenerators):
        raise ValueError(f"seed_noise needs an edm2.SeedGenerators (one generator per image), got {generators!r}")
    return lambda x, sigma, sigma_next: generators.randn_like(x)


def _default_noise(x: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    return torch.randn_like(x)


def _check_nonnegative(name: str, value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be finite and non-negative, got {value!r}")
    return value


CHURN_NAMES = ("S_churn", "S_min", "S_max", "S_noise")
CHURN_DEFAULTS = (0.0, 0.0, math.inf, 1.0)


def _check_churn(S_churn: float, S_min: float, S_max: float, S_noise: float) -> tuple[float, float, float, float]:
    S_churn, S_min = _check_nonnegative("S_churn", S_churn), _check_nonnegative("S_min", S_min)
    S_noise = _check_nonnegative("S_noise", S_noise)
    try:
        S_max = float(S_max)
    except (TypeError, ValueError):
        raise ValueError(f"S_max must be a number, got {S_max!r}") from None
    if not S_max >= S_min:  # inf allowed: churn up to any noise level
        raise ValueError(f"S_max must be at least S_min ({S_min}), got {S_max!r}")
    return S_churn, S_min, S_max, S_noise


def _check_run(
    x: torch.Tensor, sigmas: torch.Tensor, dtype: torch.dtype, noise: NoiseSource | None, callback: Callback | None
) -> None:
    """ValueError naming the argument when the state, the schedule (in `dtype` on x's device), the dtype, the noise
    source or the callback is not usable."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f"x must be a tensor of shape [N, C, H, W], got {getattr(x, 'shape', x)!r}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch dtype, got {dtype!r}")
    if noise is not None and not callable(noise):
        raise ValueError(f"noise must be a callable noise(x, sigma, sigma_next) or None, got {noise!r}")
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be a callable callback(i, x) or None, got {callback!r}")
    if not isinstance(sigmas, torch.Tensor):
        raise ValueError(f"sigmas must be a tensor (see edm2.schedules), got {sigmas!r}")
    check_sigmas(sigmas.to(dtype=dtype, device=x.device))


def _prepare(
    x: torch.Tensor, sigmas: torch.Tensor, dtype: torch.dtype, noise: NoiseSource | None
) -> tuple[torch.Tensor, torch.Tensor, list[float], NoiseSource]:
    """The state and the schedule in `dtype` on x's device, the schedule's values on the host (the sigmas
    given to the denoiser and to the noise source, and every decision, without device syncs) and the noise
    source (checked by _check_run)."""
    sigmas = sigmas.to(dtype=dtype, device=x.device)
    return x.to(dtype), sigmas, sigmas.tolist(), noise if noise is not None else _default_noise


def _only_given(options: dict[str, Any], checked: dict[str, Any]) -> dict[str, Any]:
    return {k: checked[k] if k in checked else v for k, v in options.items()}


def _churn_options(options: dict[str, Any]) -> dict[str, Any]:
    values = _check_churn(*(options.get(k, d) for k, d in zip(CHURN_NAMES, CHURN_DEFAULTS)))
    return _only_given(options, dict(zip(CHURN_NAMES, values)))


def _eta_options(options: dict[str, Any]) -> dict[str, Any]:
    checked = {k: _check_nonnegative(k, options[k]) for k in ("eta", "s_noise") if k in options}
    if options.get("solver_type", "midpoint") not in SOLVER_TYPES:
        raise ValueError(f"solver_type must be one of {', '.join(SOLVER_TYPES)}, got {options['solver_type']!r}")
    return _only_given(options, checked)


def _no_options(options: dict[str, Any]) -> dict[str, Any]:
    return dict(options)


def _solver(check_options: Callable[[dict[str, Any]], dict[str, Any]]) -> Callable[[Callable], Callable]:
    """A solver from its steps: the public function checks its arguments (the options with check_options: the
    values normalised, ValueError naming a bad one) and runs the steps; `.core` runs them unchecked, for
    arguments checked before (edm2.sampling.SamplingSettings.run), and `.check_options` is check_options."""

    def wrap(core: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        @functools.wraps(core)
        def solver(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, **options: Any) -> torch.Tensor:
            checked = check_options(options)
            _check_run(x, sigmas, options.get("dtype", torch.float64), options.get("noise"), options.get("callback"))
            return core(denoiser, x, sigmas, **checked)

        solver.core, solver.check_options = core, check_options
        return solver

    return wrap


def _host_sigma_hat(sigma: float, gamma: float, dtype: torch.dtype) -> float:
    """sigma_hat = sigma + gamma sigma as the solver computes it on the device (a 0-dim tensor in `dtype`), here
    computed on the host: the same correctly rounded operations, so the same value, without a device sync."""
    if gamma == 0:
        return sigma
    s = torch.tensor(sigma, dtype=dtype)
    return (s + gamma * s).item()


@_solver(_churn_options)
@torch.no_grad()
def sample_euler(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseSource | None = None,
    S_churn: float = 0,
    S_min: float = 0,
    S_max: float = float("inf"),
    S_noise: float = 1,
    dtype: torch.dtype = torch.float64,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Euler steps along d = (x - D(x; sigma)) / sigma (EDM Alg. 2 without the correction), optional churn."""
    x, sigmas, values, noise = _prepare(x, sigmas, dtype, noise)
    num_steps = len(values) - 1
    for i in range(num_steps):
        sigma_cur, sigma_next = sigmas[i], sigmas[i + 1]
        gamma = churn_gamma(values[i], num_steps, S_churn, S_min, S_max)
        sigma_hat, sigma_hat_value = sigma_cur + gamma * sigma_cur, _host_sigma_hat(values[i], gamma, dtype)
        if gamma > 0:
            x = x + (sigma_hat**2 - sigma_cur**2).sqrt() * S_noise * noise(x, values[i], sigma_hat_value)
        d_cur = (x - denoiser(x, sigma_hat_value)) / sigma_hat
        x = x + (sigma_next - sigma_hat) * d_cur
        if callback is not None:
            callback(i, x)
    return x


@_solver(_churn_options)
@torch.no_grad()
def sample_heun(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseSource | None = None,
    S_churn: float = 0,
    S_min: float = 0,
    S_max: float = float("inf"),
    S_noise: float = 1,
    dtype: torch.dtype = torch.float64,
    callback: Callback | None = None,
) -> torch.Tensor:
    """EDM's Heun sampler (EDM Alg. 2), with optional churn: the operations of edm_sampler in its order."""
    x_next, sigmas, values, noise = _prepare(x, sigmas, dtype, noise)
    num_steps = len(values) - 1
    for i in range(num_steps):
        sigma_cur, sigma_next = sigmas[i], sigmas[i + 1]
        x_cur = x_next
        gamma = churn_gamma(values[i], num_steps, S_churn, S_min, S_max)
        sigma_hat, sigma_hat_value = sigma_cur + gamma * sigma_cur, _host_sigma_hat(values[i], gamma, dtype)
        x_hat = x_cur
        if gamma > 0:
            x_hat = x_cur + (sigma_hat**2 - sigma_cur**2).sqrt() * S_noise * noise(x_cur, values[i], sigma_hat_value)
        d_cur = (x_hat - denoiser(x_hat, sigma_hat_value)) / sigma_hat
        x_next = x_hat + (sigma_next - sigma_hat) * d_cur
        if values[i + 1] > 0:  # the 2nd-order correction needs the slope at sigma_next
            d_prime = (x_next - denoiser(x_next, values[i + 1])) / sigma_next
            x_next = x_hat + (sigma_next - sigma_hat) * (0.5 * d_cur + 0.5 * d_prime)
        if callback is not None:
            callback(i, x_next)
    return x_next


@_solver(_eta_options)
@torch.no_grad()
def sample_euler_ancestral(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseSource | None = None,
    eta: float = 1,
    s_noise: float = 1,
    dtype: torch.dtype = torch.float64,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Ancestral sampling with Euler steps: step to sigma_down, add noise of std sigma_up (eta 0: no noise)."""
    x, sigmas, values, noise = _prepare(x, sigmas, dtype, noise)
    for i in range(len(values) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        d = (x - denoiser(x, values[i])) / sigma
        if eta > 0 and values[i + 1] > 0:
            sigma_up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).sqrt())
            sigma_down = (sigma_next**2 - sigma_up**2).sqrt()
            x = x + d * (sigma_down - sigma)
            x = x + noise(x, values[i], values[i + 1]) * s_noise * sigma_up
        else:
            x = x + d * (sigma_next - sigma)
        if callback is not None:
            callback(i, x)
    return x


def _phi(H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exponential integrator's weights over a step of length H in lambda = -log sigma:
    phi1 = 1 - e^-H, phi2 = 1 - phi1 / H, phi3 = phi2 / H - 1/2 (the weights of the denoised value and of its
    first and second divided differences, each scaled by the step)."""
    phi1 = (-H).expm1().neg()
    phi2 = 1 - phi1 / H
    return phi1, phi2, phi2 / H - 0.5


@_solver(_no_options)
@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseSource | None = None,
    dtype: torch.dtype = torch.float64,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (arXiv 2211.01095, Alg. 2): x <- (sigma_next / sigma) x + (1 - e^-h) D~ with
    h = log(sigma / sigma_next) and D~ = D + (D - D_prev) / (2 r), r = h_prev / h (first order on the first
    step); one evaluation per step. `noise` is accepted (and unused) so that every solver takes the same
    arguments."""
    x, sigmas, values, _ = _prepare(x, sigmas, dtype, noise)
    prev = None  # (denoised, h) of the previous step
    for i in range(len(values) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, values[i])
        if values[i + 1] == 0:
            x = denoised
        else:
            h = sigma.log() - sigma_next.log()
            target = denoised
            if prev is not None:
                half_over_r = 0.5 * h / prev[1]
                target = (1 + half_over_r) * denoised - half_over_r * prev[0]
            x = (sigma_next / sigma) * x + (-h).expm1().neg() * target
            prev = (denoised, h)
        if callback is not None:
            callback(i, x)
    return x


SOLVER_TYPES = ("midpoint", "heun")


def _sde_noise_scale(sigma_next: torch.Tensor, eta_h: torch.Tensor) -> torch.Tensor:
    """The std of the noise an SDE step adds: sigma_next sqrt(1 - e^(-2 eta h))."""
    return sigma_next * (-2 * eta_h).expm1().neg().sqrt()


@_solver(_eta_options)
@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseSource | None = None,
    eta: float = 1,
    s_noise: float = 1,
    solver_type: str = "midpoint",
    dtype: torch.dtype = torch.float64,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (arXiv 2211.01095, SDE-DPM-Solver++(2M), eta scaling the noise): with
    H = (1 + eta) h, x <- e^-H x + phi1 D (e^-H = (sigma_next / sigma) e^(-eta h)), plus the 2nd-order term
    (D - D_prev) / r weighted phi1 / 2 ('midpoint') or phi2 ('heun'), plus noise of std
    s_noise sigma_next sqrt(1 - e^(-2 eta h)). eta 0 is the ODE solver DPM-Solver++(2M)."""
    x, sigmas, values, noise = _prepare(x, sigmas, dtype, noise)
    prev = None  # (denoised, h) of the previous step
    for i in range(len(values) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, values[i])
        if values[i + 1] == 0:
            x = denoised
        else:
            h = sigma.log() - sigma_next.log()
            eta_h = eta * h
            phi1, phi2, _ = _phi(h + eta_h)
            x = (sigma_next / sigma) * (-eta_h).exp() * x + phi1 * denoised
            if prev is not None:
                slope = (denoised - prev[0]) * (h / prev[1])  # (D - D_prev) / r
                x = x + (phi2 if solver_type == "heun" else 0.5 * phi1) * slope
            if eta > 0:
                x = x + noise(x, values[i], values[i + 1]) * _sde_noise_scale(sigma_next, eta_h) * s_noise
            prev = (denoised, h)
        if callback is not None:
            callback(i, x)
    return x


@_solver(_eta_options)
@torch.no_grad()
def sample_dpmpp_3m_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseSource | None = None,
    eta: float = 1,
    s_noise: float = 1,
    dtype: torch.dtype = torch.float64,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(3M) SDE: the step of dpmpp_2m_sde with a third-order multistep term. From the last three
    denoised values, estimates of h D' (at the current point, extrapolated) and of h^2 D'' / 2 (derivatives in
    lambda = -log sigma) enter with weights phi2 and -phi3 of H = (1 + eta) h; 2nd order on the second step,
    1st on the first. Noise as in dpmpp_2m_sde."""
    x, sigmas, values, noise = _prepare(x, sigmas, dtype, noise)
    history: list[tuple[torch.Tensor, torch.Tensor]] = []  # (denoised, h) of the previous steps, newest first
    for i in range(len(values) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, values[i])
        if values[i + 1] == 0:
            x = denoised
        else:
            h = sigma.log() - sigma_next.log()
            H = h * (eta + 1)
            phi1, phi2, phi3 = _phi(H)
            x = (-H).exp() * x + phi1 * denoised
            if history:
                r0 = history[0][1] / h
                first = (denoised - history[0][0]) / r0  # ~ h D' half a step back
                if len(history) >= 2:
                    r1 = history[1][1] / h
                    first_prev = (history[0][0] - history[1][0]) / r1
                    second = (first - first_prev) / (r0 + r1)  # ~ h^2 D'' / 2
                    x = x + phi2 * (first + second * r0) - phi3 * second  # first + second r0 ~ h D' here
                else:
                    x = x + phi2 * first
            if eta > 0:
                x = x + noise(x, values[i], values[i + 1]) * _sde_noise_scale(sigma_next, h * eta) * s_noise
            history = [(denoised, h)] + history[:1]
        if callback is not None:
            callback(i, x)
    return x


@dataclasses.dataclass(frozen=True)
class Solver:
    """A registered solver: its function, the fewest steps it accepts and the options it takes."""

    function: Callable[..., torch.Tensor]
    min_steps: int
    summary: str

    @property
    def options(self) -> tuple[str, ...]:
        params = inspect.signature(self.function).parameters.values()
        return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


SOLVERS: dict[str, Solver] = {
    "euler": Solver(sample_euler, 1, "Euler, 1 evaluation per step (EDM Alg. 2 without correction), churn"),
    "heun": Solver(sample_heun, 1, "EDM Heun, 2 evaluations per step but the last (EDM Alg. 2), churn"),
    "euler_ancestral": Solver(sample_euler_ancestral, 1, "Euler ancestral, 1 evaluation per step, eta"),
    "dpmpp_2m": Solver(sample_dpmpp_2m, 1, "DPM-Solver++(2M), 1 evaluation per step"),
    "dpmpp_2m_sde": Solver(sample_dpmpp_2m_sde, 1, "DPM-Solver++(2M) SDE, 1 evaluation per step, eta"),
    "dpmpp_3m_sde": Solver(sample_dpmpp_3m_sde, 1, "DPM-Solver++(3M) SDE, 1 evaluation per step, eta"),
}


def get_solver(name: str) -> Solver:
    """The registered solver called `name` (ValueError naming the solver and the choices otherwise)."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}: expected one of {', '.join(SOLVERS)}")
    return SOLVERS[name]


def sample(name: str, denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, **options: Any) -> torch.Tensor:
    """Run the solver called `name` (see SOLVERS) from x at sigmas[0] along sigmas; options go to it."""
    solver = get_solver(name)
    for option in options:
        if option not in solver.options:
            raise ValueError(f"solver {name!r} has no option {option!r}: its options are {', '.join(solver.options)}")
    steps = len(sigmas) - 1 if isinstance(sigmas, torch.Tensor) and sigmas.ndim == 1 else None
    if steps is not None and steps < solver.min_steps:
        raise ValueError(f"steps must be at least {solver.min_steps} for solver {name!r}, got {steps}")
    return solver.function(denoiser, x, sigmas, **options)


def _zero_noise(x: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    return torch.zeros_like(x)


def dry_run(name: str, denoiser: Denoiser, sigmas: torch.Tensor, **options: Any) -> None:
    """Run the solver called `name` along sigmas on one zero pixel with zero noise: what it asks of `denoiser`
    (how often, at which noise levels) without any cost, so counts taken this way cannot drift from the code."""
    options = {k: v for k, v in options.items() if k not in ("noise", "callback")}
    sample(name, denoiser, torch.zeros([1, 1, 1, 1], dtype=sigmas.dtype), sigmas.cpu(), noise=_zero_noise, **options)


def _free(x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    return torch.zeros_like(x)


def count_evaluations(
    name: str,
    sigmas: torch.Tensor,
    guidance: float = 1,
    guidance_interval: tuple[float, float] | None = None,
    **options: Any,
) -> SamplerStats:
    """Network evaluations per image that `sample(name, ...)` makes along sigmas with this guidance (a dry_run
    with a free stand-in denoiser)."""
    den = GuidedDenoiser(_free, _free if guidance != 1 else None, guidance, guidance_interval)
    dry_run(name, den, sigmas, **options)
    return den.stats
