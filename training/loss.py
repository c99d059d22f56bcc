"""The EDM2 training loss with learned per-noise-level weighting (docs/design.md §2; Eq. 14-16, 21)."""

from __future__ import annotations

import torch


class EDM2Loss:
    """Per-element loss lambda(sigma) / exp(u(sigma)) * (D(x + n; sigma) - x)^2 + u(sigma).

    ln(sigma) ~ N(P_mean, P_std^2) and n ~ N(0, sigma^2 I) unless `sigma` / `noise` are given (unit-normal
    `noise` is scaled by sigma here). Returns the per-element loss; `reduce_batch_loss` turns it into the
    scalar to back-propagate.
    """

    def __init__(
        self,
        P_mean: float = -0.4,  # mean of ln(sigma) during training
        P_std: float = 1.0,  # std of ln(sigma) during training
        sigma_data: float = 0.5,  # expected std of the training data
        learned_weighting: bool = True,  # False: lambda(sigma) only, no u(sigma) (the EDM loss, ablation config A)
    ):
        if not P_std > 0:
            raise ValueError(f"EDM2Loss: P_std must be positive, got {P_std!r}")
        if not sigma_data > 0:
            raise ValueError(f"EDM2Loss: sigma_data must be positive, got {sigma_data!r}")
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data
        self.learned_weighting = learned_weighting

    def sample_sigma(
        self, n: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        rnd = torch.randn([n, 1, 1, 1], device=device, generator=generator)
        return (rnd * self.P_std + self.P_mean).exp()

    def __call__(
        self,
        net: torch.nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        sigma: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if images.ndim != 4:
            raise ValueError(f"EDM2Loss: images must have shape [N, C, H, W], got {list(images.shape)}")
        n = images.shape[0]
        if sigma is None:
            sigma = self.sample_sigma(n, images.device)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=images.device).reshape(-1, 1, 1, 1)
        if noise is None:
            noise = torch.randn_like(images)
        elif noise.shape != images.shape:
            raise ValueError(
                f"EDM2Loss: noise must have the shape of images {list(images.shape)}, got {list(noise.shape)}"
            )
        sd = self.sigma_data
        weight = (sigma**2 + sd**2) / (sigma * sd) ** 2  # lambda(sigma): unit loss at init (Eq. 21)
        if not self.learned_weighting:
            return weight * (net(images + noise * sigma, sigma, labels) - images) ** 2
        denoised, logvar = net(images + noise * sigma, sigma, labels, return_logvar=True)
        return (weight / logvar.exp()) * (denoised - images) ** 2 + logvar


def reduce_batch_loss(loss: torch.Tensor, batch_gpu_total: int) -> torch.Tensor:
    """Sum over all elements divided by the per-GPU batch total, so that the gradient does not depend on
    how the batch is split into accumulation rounds (docs/design.md §2)."""
    return loss.sum() / batch_gpu_total
