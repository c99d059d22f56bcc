"""The EDM Heun sampler with classifier-free guidance / autoguidance and a guidance interval (SPEC 7).

    x = edm2.edm_sampler(net, noise, labels, gnet=gnet, guidance=1.7, num_steps=32)

Guidance (classifier-free: gnet is unconditional; autoguidance, arXiv 2406.02507: gnet is a smaller or
less-trained model of the same task):

    D(x; sigma) = D_g(x; sigma) + w (D_main(x; sigma) - D_g(x; sigma))

Optionally only inside an interval of noise levels (Kynkaanniemi et al. 2024, arXiv 2404.07724): an
evaluation at sigma is guided when sigma_lo < sigma <= sigma_hi and plain (D_main alone) otherwise.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch


@dataclasses.dataclass
class SamplerStats:
    """What a sampler run cost: network evaluations per image (a guided evaluation costs two)."""

    net_evals: int = 0  # evaluations of the main network
    gnet_evals: int = 0  # evaluations of the guiding network

    @property
    def total_evals(self) -> int:
        return self.net_evals + self.gnet_evals


def step_sigmas(
    num_steps: int = 32,
    sigma_min: float = 0.002,
    sigma_max: float = 80,
    rho: float = 7,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Noise levels sigma_0 > ... > sigma_{N-1} of the EDM schedule, followed by sigma_N = 0 (N + 1 values).

    sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho (EDM Eq. 5, SPEC 7).
    """
    check_schedule(num_steps, sigma_min, sigma_max, rho)
    i = torch.arange(num_steps, dtype=dtype, device=device)
    frac = i / (num_steps - 1) if num_steps > 1 else i  # one step: sigma_max only
    sigmas = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, torch.zeros_like(sigmas[:1])])


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


def check_guidance_interval(guidance_interval: Sequence[float] | None) -> tuple[float, float] | None:
    """(sigma_lo, sigma_hi) with 0 <= sigma_lo < sigma_hi, or None (guidance everywhere)."""
    if guidance_interval is None:
        return None
    try:
        lo, hi = (float(v) for v in guidance_interval)
    except (TypeError, ValueError):
        raise ValueError(f"guidance_interval must be a pair (sigma_lo, sigma_hi), got {guidance_interval!r}") from None
    if not (lo >= 0 and hi > lo) or math.isnan(hi):
        raise ValueError(f"guidance_interval must satisfy 0 <= sigma_lo < sigma_hi, got ({lo}, {hi})")
    return lo, hi


def is_guided(sigma: float, guidance: float, guidance_interval: tuple[float, float] | None) -> bool:
    """Whether an evaluation at noise level sigma uses the guiding network."""
    if guidance == 1:  # D_g + 1 (D - D_g) = D: the guiding network would not change anything
        return False
    if guidance_interval is None:
        return True
    lo, hi = guidance_interval
    return lo < sigma <= hi


def churn_gamma(sigma: float, num_steps: int, S_churn: float, S_min: float, S_max: float) -> float:
    """Fraction by which a step raises the noise level before it (EDM Alg. 2); 0 when churn is off."""
    if S_churn > 0 and S_min <= sigma <= S_max:
        return min(S_churn / num_steps, math.sqrt(2) - 1)
    return 0.0


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


def check_guiding_network(net: torch.nn.Module, gnet: torch.nn.Module | None, guidance: float) -> None:
    """ValueError when the guiding network is missing or does not fit the main network."""
    if not math.isfinite(guidance):
        raise ValueError(f"guidance must be finite, got {guidance!r}")
    if gnet is None:
        if guidance != 1:
            raise ValueError(f"guidance {guidance} needs a guiding network (gnet); guidance 1 means none")
        return
    for name in ("img_resolution", "img_channels"):
        a, b = getattr(net, name, None), getattr(gnet, name, None)
        if a != b:
            raise ValueError(f"gnet {name} ({b}) differs from the main network's ({a})")
    a, b = getattr(net, "label_dim", 0), getattr(gnet, "label_dim", 0)
    if b not in (0, a):  # 0: unconditional guiding network (classifier-free guidance)
        raise ValueError(f"gnet label_dim ({b}) must be 0 (unconditional) or the main network's ({a})")


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
    check_guiding_network(net, gnet, guidance)
    interval = check_guidance_interval(guidance_interval)
    if noise.ndim != 4:
        raise ValueError(f"noise must have shape [N, C, H, W], got {list(noise.shape)}")
    gnet_labels = labels if gnet is not None and getattr(gnet, "label_dim", 0) != 0 else None
    stats = stats if stats is not None else SamplerStats()

    def denoise(x: torch.Tensor, sigma: torch.Tensor, sigma_value: float) -> torch.Tensor:
        x32 = x.to(torch.float32)
        D = net(x32, sigma.to(torch.float32), labels).to(dtype)
        stats.net_evals += 1
        if not is_guided(sigma_value, guidance, interval):
            return D
        D_g = gnet(x32, sigma.to(torch.float32), gnet_labels).to(dtype)
        stats.gnet_evals += 1
        return D_g.lerp(D, guidance)  # D_g + w (D - D_g)

    sigmas = step_sigmas(num_steps, sigma_min, sigma_max, rho, dtype=dtype, device=noise.device)
    sigma_values = sigmas.tolist()  # host copies, for decisions without device syncs
    x_next = noise.to(dtype) * sigmas[0]
    for i in range(num_steps):
        sigma_cur, sigma_next = sigmas[i], sigmas[i + 1]
        x_cur = x_next
        # Churn: raise the noise level to sigma_hat by adding fresh noise.
        gamma = churn_gamma(sigma_values[i], num_steps, S_churn, S_min, S_max)
        sigma_hat = sigma_cur + gamma * sigma_cur
        sigma_hat_value = sigma_values[i] * (1 + gamma)
        x_hat = x_cur
        if gamma > 0:
            x_hat = x_cur + (sigma_hat**2 - sigma_cur**2).sqrt() * S_noise * randn_like(x_cur)
        # Euler step from sigma_hat to sigma_next.
        d_cur = (x_hat - denoise(x_hat, sigma_hat, sigma_hat_value)) / sigma_hat
        x_next = x_hat + (sigma_next - sigma_hat) * d_cur
        # Second-order correction, except at the last step (sigma_N = 0).
        if i < num_steps - 1:
            d_prime = (x_next - denoise(x_next, sigma_next, sigma_values[i + 1])) / sigma_next
            x_next = x_hat + (sigma_next - sigma_hat) * (0.5 * d_cur + 0.5 * d_prime)
        if callback is not None:
            callback(i, x_next)
    return x_next.to(torch.float32)
