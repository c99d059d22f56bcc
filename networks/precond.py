"""EDM preconditioning around the EDM2 U-Net, with the learned log-variance head (docs/design.md §2)."""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch

from .ablation import AblationUNet
from .mp import MPConv, MPFourier
from .skip_scaling import SkipScalingSettings
from .unet import UNet
from .uvit import UViT

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ARCHS = ("edm2-unet", "uvit", "ablation")  # backbones F that Precond can wrap; ablation: networks/ablation.py
# Arguments that only the EDM2 U-Net reads (a U-ViT must leave them at their defaults) and the U-ViT's own
# (None = the U-ViT default; an EDM2 U-Net must leave them None).
UNET_ONLY = (
    "channel_mult", "channel_mult_noise", "channel_mult_emb", "num_blocks", "attn_resolutions", "label_balance"
)
UVIT_ONLY = ("patch_size", "depth", "mlp_ratio")


def _check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    return precision


def _check_backbone_arguments(args: dict[str, Any]) -> None:
    """Clear errors for an unknown arch and for arguments that the chosen backbone would silently ignore."""
    arch = args["arch"]
    if arch not in ARCHS:
        raise ValueError(f"Precond: arch must be one of {list(ARCHS)}, got {arch!r}")
    if (args["config"] is not None) != (arch == "ablation"):
        raise ValueError(f"Precond: config (an ablation ladder letter) goes with arch 'ablation' only, not {arch!r}")
    if arch == "ablation" and args["skip_scaling"] != "none":
        raise ValueError("Precond: skip_scaling applies to arch 'edm2-unet' and 'uvit' only")
    if arch == "uvit":
        defaults = inspect.signature(Precond.__init__).parameters
        changed = [k for k in UNET_ONLY if _plain(args[k]) != _plain(defaults[k].default)]
        if changed:
            raise ValueError(f"Precond: {changed} apply to arch 'edm2-unet' only; the U-ViT takes {list(UVIT_ONLY)}")
    else:
        given = [k for k in UVIT_ONLY if args[k] is not None]
        if given:
            raise ValueError(f"Precond: {given} apply to arch 'uvit' only (arch is {arch!r})")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, list)) else value


class Precond(torch.nn.Module):
    """The denoiser D(x; sigma, y) = c_skip x + c_out F(c_in x; c_noise, y), plus u(sigma) for the loss.

    Training code must call `normalize_weights_()` after construction / loading and after every optimizer
    step (forced weight normalization, Eq. 66); forward itself never modifies the parameters.
    """

    def __init__(
        self,
        img_resolution: int,  # input/output resolution (square)
        img_channels: int,  # input/output channels
        label_dim: int = 0,  # class-label width; 0 = unconditional
        sigma_data: float = 0.5,  # expected std of the training data
        logvar_channels: int = 128,  # Fourier features of the log-variance head
        precision: str = "fp32",  # activation dtype of the U-Net: 'fp32', 'fp16' or 'bf16'
        model_channels: int = 192,  # base width
        channel_mult: Sequence[int] = (1, 2, 3, 4),  # width multiplier per level
        channel_mult_noise: int | None = None,  # noise-embedding width multiplier; None = channel_mult[0]
        channel_mult_emb: int | None = None,  # embedding width multiplier; None = max(channel_mult)
        num_blocks: int = 3,  # blocks per level
        attn_resolutions: Sequence[int] = (16, 8),  # resolutions with self-attention
        label_balance: float = 0.5,  # mp_sum weight of the label embedding
        concat_balance: float = 0.5,  # mp_cat weight of the skips
        channels_per_head: int = 64,  # attention head width
        dropout: float = 0,  # dropout probability in the residual branches
        res_balance: float = 0.3,  # mp_sum weight of residual branches
        attn_balance: float = 0.3,  # mp_sum weight of attention branches
        clip_act: float | None = 256,  # activation clipping
        resample_filter: Sequence[int] = (1, 1),  # the reference's resampling filter; only [1, 1] exists here
        arch: str = "edm2-unet",  # backbone: 'edm2-unet' (the paper's) or 'uvit' (networks/uvit.py)
        skip_scaling: str = "none",  # ScaleLong long-skip scaling: networks/skip_scaling.SKIP_SCALING_MODES
        kappa: float = 0.7,  # CS base: skip i (1 = outermost) is multiplied by kappa^(i-1); in (0, 1]
        ls_reduction: int = 16,  # reduction r of the LS gates (networks/skip_scaling.py)
        patch_size: int | None = None,  # U-ViT only: patch side (None: 2)
        depth: int | None = None,  # U-ViT only: transformer blocks, odd (None: 7)
        mlp_ratio: int | None = None,  # U-ViT only: MLP width / model_channels (None: 4)
        config: str | None = None,  # arch 'ablation' only: configuration 'a'..'f' of the paper's Table 1
        **unknown: Any,  # rejected with a ValueError that names them
    ):
        super().__init__()
        if unknown:
            known = [k for k in inspect.signature(Precond.__init__).parameters if k not in ("self", "unknown")]
            raise ValueError(f"Precond: unknown constructor argument(s) {sorted(unknown)}; expected some of {known}")
        _check_backbone_arguments(locals())
        kwargs = {
            k: v for k, v in locals().items()
            if k not in ("self", "__class__", "resample_filter", "unknown")
        }
        if list(resample_filter) != [1, 1]:
            raise ValueError(f"Precond: resample_filter must be [1, 1] (box / nearest), got {list(resample_filter)}")
        for name, value in dict(img_resolution=img_resolution, img_channels=img_channels).items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"Precond: {name} must be a positive integer, got {value!r}")
        widths = dict(model_channels=model_channels, channels_per_head=channels_per_head,
                      logvar_channels=logvar_channels, num_blocks=num_blocks)
        optional = dict(channel_mult_noise=channel_mult_noise, channel_mult_emb=channel_mult_emb,
                        patch_size=patch_size, depth=depth, mlp_ratio=mlp_ratio)
        widths.update({k: v for k, v in optional.items() if v is not None})
        for name, value in widths.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Precond: {name} must be a positive integer, got {value!r}")
        if (not isinstance(channel_mult, (list, tuple)) or not channel_mult
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in channel_mult)):
            raise ValueError(
                f"Precond: channel_mult must be a non-empty list of positive integers, got {channel_mult!r}"
            )
        if not isinstance(attn_resolutions, (list, tuple)) or not all(isinstance(v, int) for v in attn_resolutions):
            raise ValueError(f"Precond: attn_resolutions must be a list of integers, got {attn_resolutions!r}")
        if not isinstance(label_dim, int) or label_dim < 0:
            raise ValueError(f"Precond: label_dim must be a non-negative integer, got {label_dim!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"Precond: dropout must be in [0, 1), got {dropout!r}")
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.sigma_data = sigma_data
        self.precision = _check_precision(precision)
        # Constructor arguments as plain JSON values, for model files.
        self.init_kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
        backbone = dict(skip_scaling=SkipScalingSettings(skip_scaling, kappa, ls_reduction))
        if arch == "ablation":
            self.ablation = AblationUNet(
                config, img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                model_channels=model_channels, channel_mult=channel_mult, channel_mult_noise=channel_mult_noise,
                channel_mult_emb=channel_mult_emb, num_blocks=num_blocks, attn_resolutions=attn_resolutions,
                channels_per_head=channels_per_head, dropout=dropout,
            )  # fmt: skip
        elif arch == "uvit":
            uvit = {
                k: v for k, v in dict(patch_size=patch_size, depth=depth, mlp_ratio=mlp_ratio).items() if v is not None
            }
            self.uvit = UViT(
                img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                model_channels=model_channels, channels_per_head=channels_per_head, concat_balance=concat_balance,
                dropout=dropout, res_balance=res_balance, attn_balance=attn_balance, clip_act=clip_act,
                **uvit, **backbone,
            )  # fmt: skip
        else:
            self.unet = UNet(
                img_resolution=img_resolution,
                img_channels=img_channels,
                label_dim=label_dim,
                model_channels=model_channels,
                channel_mult=channel_mult,
                channel_mult_noise=channel_mult_noise,
                channel_mult_emb=channel_mult_emb,
                num_blocks=num_blocks,
                attn_resolutions=attn_resolutions,
                label_balance=label_balance,
                concat_balance=concat_balance,
                channels_per_head=channels_per_head,
                dropout=dropout,
                res_balance=res_balance,
                attn_balance=attn_balance,
                clip_act=clip_act,
                **backbone,
            )
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])
        self.normalize_weights_()

    @property
    def backbone(self) -> torch.nn.Module:
        """F: the EDM2 U-Net (`self.unet`, the reference's state-dict names) or the U-ViT (`self.uvit`)."""
        arch = self.init_kwargs.get("arch")
        return self.uvit if arch == "uvit" else self.ablation if arch == "ablation" else self.unet

    @torch.no_grad()
    def normalize_weights_(self) -> None:
        """Forced weight normalization of every MPConv weight (Eq. 66)."""
        for m in self.modules():
            if isinstance(m, MPConv) and m.weight.device.type != "meta":
                m.normalize_weight_()

    def _labels(self, class_labels: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor | None:
        if self.label_dim == 0:
            if class_labels is not None and class_labels.numel() != 0:
                raise ValueError("Precond: class_labels given to an unconditional network (label_dim 0)")
            return None
        if class_labels is None:
            return torch.zeros([n, self.label_dim], device=device)
        if not class_labels.is_floating_point():
            if class_labels.ndim != 1 or class_labels.shape[0] != n:
                raise ValueError(f"Precond: integer class_labels must have shape [{n}], got {list(class_labels.shape)}")
            return torch.nn.functional.one_hot(class_labels, self.label_dim).to(torch.float32)
        if class_labels.ndim != 2 or class_labels.shape[1] != self.label_dim or class_labels.shape[0] not in (1, n):
            raise ValueError(
                f"Precond: class_labels must have shape [{n}, {self.label_dim}] (label_dim {self.label_dim}), "
                f"got {list(class_labels.shape)}"
            )
        return class_labels.to(torch.float32).expand(n, -1)

    def _sigma(self, sigma: torch.Tensor | float, n: int, device: torch.device) -> torch.Tensor:
        on_host = not isinstance(sigma, torch.Tensor) or sigma.device.type == "cpu"
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        if sigma.numel() not in (1, n):
            raise ValueError(
                f"Precond: sigma must have 1 or {n} elements (one per image), got shape {list(sigma.shape)}"
            )
        # Checked where it is free, on the host. Reading a GPU tensor's values would stall the GPU on every call;
        # device-side sigmas come from the sampler's schedule or the loss's distribution, checked upstream.
        if on_host and not torch.compiler.is_compiling() and not bool(torch.all(torch.isfinite(sigma) & (sigma > 0))):
            raise ValueError(f"Precond: sigma must be positive and finite, got {sigma.flatten().tolist()}")
        return sigma.to(device).reshape(-1, 1, 1, 1)  # [1 or n, 1, 1, 1]: one sigma stays one (see forward)

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        return_logvar: bool = False,
        force_fp32: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        expected = [self.img_channels, self.img_resolution, self.img_resolution]
        if x.ndim != 4 or list(x.shape[1:]) != expected:
            raise ValueError(f"Precond: x must have shape [N, {', '.join(map(str, expected))}], got {list(x.shape)}")
        n = x.shape[0]
        x = x.to(torch.float32)
        sigma = self._sigma(sigma, n, x.device)
        class_labels = self._labels(class_labels, n, x.device)
        dtype = torch.float32 if force_fp32 else PRECISIONS[self.precision]

        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        # One sigma for the batch (the sampler's case) gives one noise embedding, broadcast over the batch in the
        # U-Net, as in the reference: a one-row product rounds differently from the same row inside an n-row one.
        c_noise = sigma.flatten().log() / 4
        if self.init_kwargs.get("arch") == "uvit":  # its embedding is a token per image
            c_noise = c_noise.expand(n)

        F_x = self.backbone((c_in * x).to(dtype), c_noise, class_labels)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        if not return_logvar:
            return D_x
        logvar = self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1).expand(n, 1, 1, 1)
        return D_x, logvar
