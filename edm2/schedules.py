"""Noise schedules: functions that return the noise levels a solver steps through (docs/design.md §7).

    sigmas = edm2.schedules.karras(32)                      # the EDM2 default: sigma 80 -> 0.002, rho 7
    sigmas = edm2.schedules.log_linear(20, 0.002, 80)       # geometric spacing
    sigmas = edm2.schedules.explicit([80, 10, 1, 0.1])      # any strictly decreasing list; 0 is appended

Every schedule returns a 1-D tensor of N + 1 noise levels sigma_0 > ... > sigma_{N-1} > sigma_N = 0 (float64
unless asked otherwise), which any solver of edm2.solvers accepts: a schedule and a solver are chosen
independently. Arguments are validated here, once, with a ValueError naming the argument.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

__all__ = ["SCHEDULES", "check_schedule", "check_sigmas", "explicit", "karras", "log_linear"]


def check_schedule(num_steps: int, sigma_min: float, sigma_max: float, rho: float) -> None:
    """ValueError naming the argument when the step schedule is not usable."""
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if not (math.isfinite(sigma_min) and sigma_min > 0):
        raise ValueError(f"sigma_min must be positive and finite, got {sigma_min!r}")
    if not (math.isfinite(sigma_max) and sigma_max > sigma_min):
        raise ValueError(f"sigma_max must be finite and larger than sigma_min ({sigma_min}), got {sigma_max!r}")
    if not (math.isfinite(rho) and rho > 0):
        raise ValueError(f"rho must be positive and finite, got {rho!r}")


def karras(
    num_steps: int = 32,
    sigma_min: float = 0.002,
    sigma_max: float = 80,
    rho: float = 7,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The EDM schedule (EDM Eq. 5): sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho for
    i < N, then sigma_N = 0. The defaults are EDM2's sampling schedule. One step: sigma_max only."""
    check_schedule(num_steps, sigma_min, sigma_max, rho)
    return karras_unchecked(num_steps, sigma_min, sigma_max, rho, dtype, device)


def karras_unchecked(
    num_steps: int, sigma_min: float, sigma_max: float, rho: float, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """karras for arguments already checked (edm2.sampling.SamplingSettings checks them once, when made)."""
    i = torch.arange(num_steps, dtype=dtype, device=device)
    frac = i / (num_steps - 1) if num_steps > 1 else i
    sigmas = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, torch.zeros_like(sigmas[:1])])


def log_linear(
    num_steps: int = 32,
    sigma_min: float = 0.002,
    sigma_max: float = 80,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Noise levels evenly spaced in log sigma from sigma_max to sigma_min (the limit rho -> infinity of the
    EDM schedule), then 0; the ends are exactly sigma_max and sigma_min. One step: sigma_max only."""
    check_schedule(num_steps, sigma_min, sigma_max, 1.0)  # rho plays no part here: 1 always passes
    return log_linear_unchecked(num_steps, sigma_min, sigma_max, dtype, device)


def log_linear_unchecked(
    num_steps: int, sigma_min: float, sigma_max: float, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """log_linear for arguments already checked (edm2.sampling.SamplingSettings checks them once, when made)."""
    i = torch.arange(num_steps, dtype=torch.float64)
    frac = i / (num_steps - 1) if num_steps > 1 else i
    sigmas = (math.log(sigma_max) + frac * (math.log(sigma_min) - math.log(sigma_max))).exp()
    sigmas[0], sigmas[-1] = sigma_max, (sigma_min if num_steps > 1 else sigma_max)  # exact ends, not exp(log())
    return torch.cat([sigmas, torch.zeros_like(sigmas[:1])]).to(dtype=dtype, device=device)


def explicit(
    sigmas: Sequence[float] | torch.Tensor,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """A given list of noise levels: positive, finite, strictly decreasing; a final 0 is appended unless
    present. ValueError naming `sigmas` otherwise."""
    values = sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"sigmas must be a list of numbers, got {sigmas!r}") from None
    if values and values[-1] != 0:
        values.append(0.0)
    return check_sigmas(torch.tensor(values, dtype=torch.float64)).to(dtype=dtype, device=device)


def check_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """The schedule itself if a solver can step through it: 1-D, at least two values, finite, strictly
    decreasing, positive except possibly the last, which may be 0. ValueError naming `sigmas` otherwise."""
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or not sigmas.is_floating_point():
        raise ValueError(f"sigmas must be a 1-D floating-point tensor, got {sigmas!r}")
    if len(sigmas) < 2:
        raise ValueError(f"sigmas must hold at least one step (two noise levels), got {sigmas.tolist()}")
    values = sigmas.tolist()
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"sigmas must be finite, got {values}")
    if not (all(v > 0 for v in values[:-1]) and values[-1] >= 0):
        raise ValueError(f"sigmas must be positive, except a final 0, got {values}")
    if not all(a > b for a, b in zip(values, values[1:])):
        raise ValueError(f"sigmas must be strictly decreasing, got {values}")
    return sigmas


SCHEDULES: dict[str, Callable[..., torch.Tensor]] = {"karras": karras, "edm": karras, "log_linear": log_linear}
