"""The EDM Heun sampler with classifier-free guidance / autoguidance and a guidance interval (docs/design.md §7): the
compatibility layer over edm2.schedules, edm2.guidance and edm2.solvers (docs/design.md §7).

    x = edm2.edm_sampler(net, noise, labels, gnet=gnet, guidance=1.7, num_steps=32)

Guidance (classifier-free: gnet is unconditional; autoguidance, arXiv 2406.02507: gnet is a smaller or
less-trained model of the same task):

    D(x; sigma) = D_g(x; sigma) + w (D_main(x; sigma) - D_g(x; sigma))

Optionally only inside an interval of noise levels (Kynkaanniemi et al. 2024, arXiv 2404.07724): an
evaluation at sigma is guided when sigma_lo < sigma <= sigma_hi and plain (D_main alone) otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .guidance import GuidedDenoiser, SamplerStats, check_guidance_interval, check_guiding_network, is_guided
from .schedules import check_schedule, karras
from .solvers import churn_gamma, sample_heun

__all__ = [
    "SamplerStats", "check_guidance_interval", "check_guiding_network", "check_schedule", "churn_gamma",
    "count_evaluations", "edm_sampler", "evaluation_sigmas", "is_guided", "step_sigmas",
]


def step_sigmas(
    num_steps: int = 32,
    sigma_min: float = 0.002,
    sigma_max: float = 80,
    rho: float = 7,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Noise levels sigma_0 > ... > sigma_{N-1} of the EDM schedule, followed by sigma_N = 0 (N + 1 values).

    sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho (EDM Eq. 5, docs/design.md §7).
    """
    return karras(num_steps, sigma_min, sigma_max, rho, dtype=dtype, device=device)


def evaluation_sigmas(
    num_steps: int = 32,
    sigma_min: float = 0.002,
    sigma_max: float = 80,
    rho: float = 7,
    S_churn: float = 0,
    S_min: float = 0,
    S_max: float = float("inf"),
) -> list[float]:
    """The noise levels at which the sampler evaluates the denoiser, in order (2N - 1 values)."""
    sigmas = step_sigmas(num_steps, sigma_min, sigma_max, rho).tolist()
    out = []
    for i in range(num_steps):
        sigma_cur, sigma_next = sigmas[i], sigmas[i + 1]
        out.append(sigma_cur * (1 + churn_gamma(sigma_cur, num_steps, S_churn, S_min, S_max)))
        if i < num_steps - 1:
            out.append(sigma_next)
    return out


def count_evaluations(
    num_steps: int = 32,
    sigma_min: float = 0.002,
    sigma_max: float = 80,
    rho: float = 7,
    guidance: float = 1,
    guidance_interval: Sequence[float] | None = None,
    S_churn: float = 0,
    S_min: float = 0,
    S_max: float = float("inf"),
) -> SamplerStats:
    """Network evaluations per image that `edm_sampler` will make with these settings."""
    interval = check_guidance_interval(guidance_interval)
    sigmas = evaluation_sigmas(num_steps, sigma_min, sigma_max, rho, S_churn, S_min, S_max)
    guided = sum(is_guided(s, guidance, interval) for s in sigmas)
    return SamplerStats(net_evals=len(sigmas), gnet_evals=guided)


def edm_sampler(
    net: torch.nn.Module,
    noise: torch.Tensor,
    labels: torch.Tensor | None = None,
    gnet: torch.nn.Module | None = None,
    guidance: float = 1,
    num_steps: int = 32,
    sigma_min: float = 0.002,
    sigma_max: float = 80,
    rho: float = 7,
    S_churn: float = 0,
    S_min: float = 0,
    S_max: float = float("inf"),
    S_noise: float = 1,
    guidance_interval: Sequence[float] | None = None,
    dtype: torch.dtype = torch.float64,
    randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
    stats: SamplerStats | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Sample with the EDM 2nd-order Heun solver (EDM Alg. 2), returning float32 images in the net's space.

    noise: unit normal [N, C, H, W]; the ODE starts at x = noise * sigma_0. labels: one-hot [N, label_dim]
    or class indices [N] (None for unconditional nets). dtype: precision of the ODE state (the networks
    see float32). randn_like: source of the churn noise (pass a per-seed generator for reproducibility).
    stats: if given, incremented with the evaluations made. callback(i, x): called after each step.
    """
    check_schedule(num_steps, sigma_min, sigma_max, rho)
    if noise.ndim != 4:
        raise ValueError(f"noise must have shape [N, C, H, W], got {list(noise.shape)}")
    den = GuidedDenoiser.from_networks(net, labels, gnet, guidance, guidance_interval, stats)
    sigmas = karras(num_steps, sigma_min, sigma_max, rho, dtype=dtype, device=noise.device)
    x = sample_heun(
        den, noise.to(dtype) * sigmas[0], sigmas, noise=lambda x, sigma, sigma_next: randn_like(x),
        S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise, dtype=dtype, callback=callback,
    )
    return x.to(torch.float32)
