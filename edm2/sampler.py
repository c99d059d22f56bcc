"""The EDM Heun sampler with classifier-free guidance / autoguidance and a guidance interval (docs/design.md §7): a
thin layer over edm2.sampling's checked settings, edm2.guidance and edm2.solvers.

    x = edm2.edm_sampler(net, noise, labels, gnet, edm2.sampling_settings(guidance=1.7, num_steps=32))
    x = edm2.edm_sampler(net, noise, labels, gnet=gnet, guidance=1.7, num_steps=32)   # the same, as keywords

Guidance (classifier-free: gnet is unconditional; autoguidance, arXiv 2406.02507: gnet is a smaller or
less-trained model of the same task):

    D(x; sigma) = D_g(x; sigma) + w (D_main(x; sigma) - D_g(x; sigma))

Optionally only inside an interval of noise levels (Kynkaanniemi et al. 2024, arXiv 2404.07724): an
evaluation at sigma is guided when sigma_lo < sigma <= sigma_hi and plain (D_main alone) otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .guidance import GuidedDenoiser, SamplerStats, check_guidance_interval, check_guiding_network, is_guided
from .sampling import SamplingSettings, sampling_settings
from .schedules import check_schedule
from .solvers import churn_gamma

__all__ = [
    "SamplerStats", "check_guidance_interval", "check_guiding_network", "check_schedule", "churn_gamma",
    "count_evaluations", "edm_sampler", "edm_settings", "evaluation_sigmas", "is_guided", "step_sigmas",
]


def edm_settings(**kwargs: Any) -> SamplingSettings:
    """sampling_settings with edm_sampler's defaults: the Heun solver and a float64 state."""
    return sampling_settings(**{"solver": "heun", "dtype": torch.float64, **kwargs})


def step_sigmas(settings: SamplingSettings, device: torch.device | str = "cpu") -> torch.Tensor:
    """Noise levels sigma_0 > ... > sigma_{N-1} of the settings' schedule, followed by sigma_N = 0 (N + 1 values),
    in the state's dtype. The EDM schedule: sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho
    (EDM Eq. 5, docs/design.md §7)."""
    return settings.sigmas(device)


def evaluation_sigmas(settings: SamplingSettings) -> list[float]:
    """The noise levels at which the sampler evaluates the main network, in order (Heun: 2N - 1 values)."""
    return settings.evaluation_sigmas()


def count_evaluations(settings: SamplingSettings) -> SamplerStats:
    """Network evaluations per image that sampling with these settings makes (a copy of settings.evals)."""
    return SamplerStats(settings.evals.net_evals, settings.evals.gnet_evals)


def edm_sampler(
    net: torch.nn.Module,
    noise: torch.Tensor,
    labels: torch.Tensor | None = None,
    gnet: torch.nn.Module | None = None,
    settings: SamplingSettings | None = None,
    *,
    randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
    stats: SamplerStats | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    **sampler_kwargs: Any,
) -> torch.Tensor:
    """Sample with the settings' solver (by default the EDM 2nd-order Heun solver, EDM Alg. 2), returning float32
    images in the net's space.

    noise: unit normal [N, C, H, W]; the ODE starts at x = noise * sigma_0. labels: one-hot [N, label_dim]
    or class indices [N] (None for unconditional nets). settings: checked sampler settings (edm2.sampling), or
    instead sampler_kwargs for edm_settings (guidance, num_steps, sigma_min, sigma_max, rho, S_churn, S_min, S_max,
    S_noise, guidance_interval, dtype: the precision of the ODE state, float64 by default; the networks see
    float32). randn_like: source of the churn noise (pass a per-seed generator for reproducibility).
    stats: if given, incremented with the evaluations made. callback(i, x): called after each step.
    """
    if settings is None:
        settings = edm_settings(**sampler_kwargs)
    elif sampler_kwargs:
        raise ValueError(f"give settings or sampler keyword arguments ({', '.join(sampler_kwargs)}), not both")
    elif not isinstance(settings, SamplingSettings):
        raise ValueError(f"settings must be edm2.sampling.SamplingSettings, got {settings!r}")
    if noise.ndim != 4:
        raise ValueError(f"noise must have shape [N, C, H, W], got {list(noise.shape)}")
    den = GuidedDenoiser.from_settings(net, labels, gnet, settings, stats)
    sigmas = settings.sigmas(noise.device)
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be a callable callback(i, x) or None, got {callback!r}")
    x = settings.run(den, noise.to(settings.dtype) * sigmas[0], sigmas,
                     noise=lambda x, sigma, sigma_next: randn_like(x), callback=callback)
    return x.to(torch.float32)
