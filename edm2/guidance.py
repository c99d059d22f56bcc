"""Denoisers and guidance as denoiser wrappers (docs/design.md §7).

A denoiser is any callable `denoiser(x, sigma) -> D(x; sigma)`: x is the noisy state [N, C, H, W] (float32 or
float64) and sigma the noise level, a float (what the solvers of edm2.solvers pass: the schedule's value in the
state's dtype) or a 0-dim tensor; it returns a tensor shaped and typed like x.
The solvers of edm2.solvers take nothing else, so networks, labels and guidance are bound here, once:

    den = NetworkDenoiser(net, labels)                                      # a network and its labels
    den = GuidedDenoiser(NetworkDenoiser(net, labels), NetworkDenoiser(gnet, None), weight=1.7)
    den = GuidedDenoiser.from_networks(net, labels, gnet, guidance=1.7, guidance_interval=(0.28, 2.9))
    x = edm2.solvers.sample('heun', den, noise * sigmas[0], sigmas)
    den.stats.total_evals                                                  # network evaluations per image

Guidance (classifier-free when the guide is unconditional; autoguidance, arXiv 2406.02507, when it is a
smaller or less trained model of the same task) combines D = D_g + w (D_main - D_g), optionally only for
sigma_lo < sigma <= sigma_hi (guidance interval, arXiv 2404.07724): the rule and the checks are those of
this module, done once in the constructor. Weight 1 never calls the guide. Every call counts the
evaluations it made in `stats` (SamplerStats): each call evaluates every image of the batch once,
so the counts are per image, and a guided evaluation costs two.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Protocol

import torch

__all__ = [
    "Denoiser", "GuidedDenoiser", "NetworkDenoiser", "SamplerStats", "check_guidance", "check_guidance_interval",
    "check_guide_fits", "check_guiding_network", "is_guided",
]


@dataclasses.dataclass
class SamplerStats:
    """What a sampler run cost: network evaluations per image (a guided evaluation costs two)."""

    net_evals: int = 0  # evaluations of the main network
    gnet_evals: int = 0  # evaluations of the guiding network

    @property
    def total_evals(self) -> int:
        return self.net_evals + self.gnet_evals


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


def check_guidance(guidance: float, name: str = "guidance") -> float:
    """The guidance weight w as a float: a finite number (ValueError naming it otherwise)."""
    try:
        guidance = float(guidance)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {guidance!r}") from None
    if not math.isfinite(guidance):
        raise ValueError(f"guidance must be finite, got {guidance!r}")
    return guidance


def check_guide_fits(net: torch.nn.Module, gnet: torch.nn.Module | None, guidance: float) -> None:
    """ValueError when the guiding network is missing (guidance != 1) or does not fit the main network; the weight
    itself is checked where it enters (check_guidance)."""
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


def check_guiding_network(net: torch.nn.Module, gnet: torch.nn.Module | None, guidance: float) -> None:
    """ValueError when the weight is not finite or the guiding network is missing or does not fit."""
    check_guide_fits(net, gnet, check_guidance(guidance))


class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor: ...


def _sigma32(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """sigma as the 0-dim float32 tensor on x's device that networks take; a float becomes one without a
    host-to-device copy (rounded to float32 as a float64 tensor would be)."""
    if isinstance(sigma, torch.Tensor):
        return sigma.to(device=x.device, dtype=torch.float32)
    return torch.full([], float(sigma), dtype=torch.float32, device=x.device)


class NetworkDenoiser:
    """A network `net(x, sigma, labels)` with its labels bound: the network sees float32 inputs and the
    result comes back in x's dtype (as edm_sampler has always done). Counts its calls in `stats.net_evals`."""

    def __init__(self, net: torch.nn.Module, labels: torch.Tensor | None = None, stats: SamplerStats | None = None):
        self.net, self.labels = net, labels
        self.stats = stats if stats is not None else SamplerStats()

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        out = self.net(x.to(torch.float32), _sigma32(sigma, x), self.labels).to(x.dtype)
        self.stats.net_evals += 1
        return out


class GuidedDenoiser:
    """D_g + w (D_main - D_g) inside the guidance interval, D_main outside it and for w = 1.

    main, guide: denoisers (guide may be None only for weight 1). When they wrap networks (NetworkDenoiser),
    the networks must agree in resolution and channels and the guide must be unconditional or share the main
    network's labels. `stats` counts main evaluations as net_evals and guide evaluations as gnet_evals.
    """

    def __init__(
        self,
        main: Denoiser,
        guide: Denoiser | None,
        weight: float = 1,
        interval: Sequence[float] | None = None,
        stats: SamplerStats | None = None,
    ):
        weight = check_guidance(weight, "guidance weight")
        # The networks' checks when there are networks; otherwise the attributes are absent on both sides.
        check_guide_fits(getattr(main, "net", main), None if guide is None else getattr(guide, "net", guide), weight)
        self._assemble(main, guide, weight, check_guidance_interval(interval), stats)

    def _assemble(
        self,
        main: Denoiser,
        guide: Denoiser | None,
        weight: float,
        interval: tuple[float, float] | None,
        stats: SamplerStats | None,
    ) -> GuidedDenoiser:
        self.main, self.guide, self.weight, self.interval = main, guide, weight, interval
        self.stats = stats if stats is not None else SamplerStats()
        return self

    @classmethod
    def from_networks(
        cls,
        net: torch.nn.Module,
        labels: torch.Tensor | None = None,
        gnet: torch.nn.Module | None = None,
        guidance: float = 1,
        guidance_interval: Sequence[float] | None = None,
        stats: SamplerStats | None = None,
    ) -> GuidedDenoiser:
        """The denoiser of networks and guidance values (checked here): an unconditional gnet gets no labels."""
        main, guide = cls._network_denoisers(net, labels, gnet)
        return cls(main, guide, guidance, guidance_interval, stats)

    @classmethod
    def from_settings(
        cls,
        net: torch.nn.Module,
        labels: torch.Tensor | None,
        gnet: torch.nn.Module | None,
        settings: Any,
        stats: SamplerStats | None = None,
    ) -> GuidedDenoiser:
        """from_networks with the guidance of checked settings (edm2.sampling.SamplingSettings: the weight and the
        interval were checked when they were made), so only the networks' fit is checked here."""
        return cls.of_settings(*cls._network_denoisers(net, labels, gnet), settings, stats)

    @classmethod
    def of_settings(
        cls, main: Denoiser, guide: Denoiser | None, settings: Any, stats: SamplerStats | None = None
    ) -> GuidedDenoiser:
        """Any two denoisers with the weight and interval of checked settings (their `guidance` and
        `guidance_interval`, not checked again); the networks' fit is checked as in the constructor."""
        check_guide_fits(getattr(main, "net", main), None if guide is None else getattr(guide, "net", guide),
                         settings.guidance)
        return cls.__new__(cls)._assemble(main, guide, settings.guidance, settings.guidance_interval, stats)

    @staticmethod
    def _network_denoisers(
        net: torch.nn.Module, labels: torch.Tensor | None, gnet: torch.nn.Module | None
    ) -> tuple[NetworkDenoiser, NetworkDenoiser | None]:
        """An unconditional gnet (label_dim 0) gets no labels."""
        guide = None
        if gnet is not None:
            guide = NetworkDenoiser(gnet, labels if getattr(gnet, "label_dim", 0) != 0 else None)
        return NetworkDenoiser(net, labels), guide

    def with_labels(self, labels: torch.Tensor | None, stats: SamplerStats | None = None) -> GuidedDenoiser:
        """The same networks and guidance for another batch's labels, without checking them again (generation
        builds one GuidedDenoiser per run and one of these per batch). Needs network denoisers."""
        if not isinstance(self.main, NetworkDenoiser) or not isinstance(self.guide, (NetworkDenoiser, type(None))):
            raise ValueError("with_labels needs a GuidedDenoiser of networks (from_networks / from_settings)")
        main, guide = self._network_denoisers(self.main.net, labels, None if self.guide is None else self.guide.net)
        return type(self).__new__(type(self))._assemble(main, guide, self.weight, self.interval, stats)

    def guided(self, sigma: torch.Tensor | float) -> bool:
        """Whether an evaluation at sigma calls the guide (the solvers pass floats: no device sync)."""
        if self.guide is None or self.weight == 1:
            return False
        return self.interval is None or is_guided(float(sigma), self.weight, self.interval)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        D = self.main(x, sigma)
        self.stats.net_evals += 1
        if not self.guided(sigma):
            return D
        D_g = self.guide(x, sigma)
        self.stats.gnet_evals += 1
        return D_g.lerp(D, self.weight)  # D_g + w (D - D_g)
