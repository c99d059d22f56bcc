"""Pixel and latent encoders: between uint8 RGB images and the network's input space (docs/design.md §8).

An encoder is described by a JSON-able settings dict (stored in model files and datasets):

    {"class": "standard_rgb"}
    {"class": "stability_vae", "vae_name": "stabilityai/sd-vae-ft-mse", "raw_mean": [...], "raw_std": [...],
     "final_mean": 0.0, "final_std": 0.5, "batch_size": 8}

Each encoder has three steps:
    encode_pixels(uint8 [N, 3, H, W]) -> raw       (dataset preparation; for the VAE: posterior mean and std)
    encode_latents(raw, generator)    -> float32   (per training sample: what the network sees)
    decode(float32)                   -> uint8 [N, 3, H, W]
The VAE (diffusers AutoencoderKL) is loaded lazily on first use; its weights never enter a model file.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch

STABILITY_VAE_DEFAULTS: dict[str, Any] = {
    "vae_name": "stabilityai/sd-vae-ft-mse",
    "raw_mean": [5.81, 3.25, 0.12, -2.15],
    "raw_std": [4.17, 4.62, 3.71, 3.28],
    "final_mean": 0.0,
    "final_std": 0.5,
    "batch_size": 8,
    "pixel_range": "0,1",
}
# The VAE's pixel convention: "0,1" (uint8 / 255 in, clamp(0, 1) * 255 truncated out) is the official code's and
# the default; "-1,1" (uint8 / 127.5 - 1 in, (x + 1) * 127.5 rounded out) is what this project used before the
# setting existed. Settings written before it (model files, run configurations) have no key and mean "-1,1", so
# they decode as they always did; their latent datasets were encoded that way by this project's dataset_tool.
VAE_PIXEL_RANGES = ("0,1", "-1,1")
LEGACY_VAE_PIXEL_RANGE = "-1,1"


class VAELoadError(RuntimeError):
    """The VAE cannot be loaded (no network, not in the cache, a bad local folder); the message says what was tried
    and how to get it, in a few lines."""


_VAES: dict[str, torch.nn.Module] = {}  # name -> loaded AutoencoderKL, shared by all encoders of a process


def _looks_like_path(name: str) -> bool:
    """A hub name is OWNER/NAME; anything else with a path's shape is meant as a local folder."""
    if os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1:
        return True
    return os.sep != "/" and os.sep in name


def _hub_unreachable(endpoint: str, timeout_s: float = 5.0) -> str | None:
    """Why the hub cannot be reached (one TCP connect, no retries), or None if it answers."""
    import socket
    import urllib.parse

    url = urllib.parse.urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
    except OSError as e:
        return f"{url.hostname}:{port}: {e.strerror or e}"
    return None


def _vae_help(name: str) -> str:
    from huggingface_hub import constants

    return (
        f"Give a local copy with --vae DIR (a folder with config.json and the weights, as "
        f"AutoencoderKL.save_pretrained writes it), or fill the Hugging Face cache ({constants.HF_HUB_CACHE}; "
        f"moved by HF_HOME or HF_HUB_CACHE) on a "
        f"machine with network access:\n  python -c \"from diffusers import AutoencoderKL; "
        f"AutoencoderKL.from_pretrained('{name}')\"\nand copy that cache folder here."
    )


def load_vae(name: str) -> torch.nn.Module:
    """The diffusers AutoencoderKL `name` (a hub name or a local folder), in eval mode without gradients.

    A hub name is looked up in the local cache first; only when it is missing is the hub asked, after one quick
    connection check (the hub client's own retries take tens of seconds to fail without a network). Raises
    VAELoadError with a few lines: what was tried, the local-folder option, the cache variables."""
    if name not in _VAES:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")  # diffusers' own, not ours to fix
            _VAES[name] = _from_pretrained(name).eval().requires_grad_(False)
    return _VAES[name]


def _from_pretrained(name: str) -> torch.nn.Module:
    import importlib.util

    from diffusers import AutoencoderKL
    from huggingface_hub import constants

    # Without accelerate, diffusers warns and falls back to this anyway; say it to keep logs quiet.
    kwargs = {} if importlib.util.find_spec("accelerate") else {"low_cpu_mem_usage": False}
    if _looks_like_path(name):
        folder = os.path.expanduser(name)
        if not os.path.isdir(folder):
            raise VAELoadError(
                f"--vae {name}: no such folder (expected a saved AutoencoderKL: config.json and weights)"
            )
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise VAELoadError(
                f"--vae {name}: no config.json in this folder (expected AutoencoderKL.save_pretrained's output)"
            )
        try:
            vae = AutoencoderKL.from_pretrained(folder, local_files_only=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - diffusers and safetensors raise many kinds
            raise VAELoadError(
                f"--vae {name}: cannot load the AutoencoderKL in this folder: {type(e).__name__}: {e}"
            ) from None
    else:
        try:
            vae = AutoencoderKL.from_pretrained(name, local_files_only=True, **kwargs)
        except Exception:  # noqa: BLE001 - not cached (or a damaged cache): ask the hub
            tried = f"the VAE {name!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
            if constants.HF_HUB_OFFLINE:
                raise VAELoadError(
                    f"cannot load the VAE: {tried}, and HF_HUB_OFFLINE is set.\n{_vae_help(name)}"
                ) from None
            reason = _hub_unreachable(constants.ENDPOINT)
            if reason is not None:
                raise VAELoadError(
                    f"cannot load the VAE: {tried}, and the hub {constants.ENDPOINT} cannot be reached ({reason}).\n"
                    f"{_vae_help(name)}"
                ) from None
            try:
                vae = AutoencoderKL.from_pretrained(name, **kwargs)
            except Exception as e:  # noqa: BLE001
                raise VAELoadError(
                    f"cannot load the VAE {name!r} from the hub {constants.ENDPOINT}: {type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}\n{_vae_help(name)}"
                ) from None
    return vae


def _check_pixels(x: torch.Tensor, who: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
        got = f"{x.dtype} {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{who}.encode_pixels: expected a uint8 tensor [N, 3, H, W], got {got}")


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 [0, 255]: x * 127.5 + 128, clamped and truncated, i.e. rounded half up, in the official
    code's floating-point operations (so that its images per seed are matched to the last level)."""
    return (x.to(torch.float32) * 127.5 + 128).clamp(0, 255).to(torch.uint8)


class StandardRGBEncoder:
    """Pixels as they are: uint8 RGB <-> [-1, 1]."""

    def config(self) -> dict[str, Any]:
        return {"class": "standard_rgb"}

    def encode_pixels(self, x: torch.Tensor) -> torch.Tensor:
        _check_pixels(x, "StandardRGBEncoder")
        return x

    def encode_latents(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return x.to(torch.float32) / 127.5 - 1

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return _to_uint8(x)


class StabilityVAEEncoder:
    """Stable Diffusion VAE latents (8x down, 4 channels), scaled per channel to the network's range.

    By default (pixel_range "0,1") the VAE sees and gives pixels in [0, 1] (uint8 / 255; decoded: clamped to
    [0, 1], times 255, truncated), as in the official EDM2 code, whose raw_mean / raw_std (the defaults) were
    measured so and whose latent models were trained so: the [-1, 1] range the VAE was trained with gives other
    latents, and decoding an official model's latents with it gives other images. "-1,1" is the convention this
    project used before; settings without the key are read so (`encoder_from_config`).
    """

    def __init__(
        self,
        vae_name: str = STABILITY_VAE_DEFAULTS["vae_name"],  # hub name or local directory of an AutoencoderKL
        raw_mean: Sequence[float] = STABILITY_VAE_DEFAULTS["raw_mean"],  # per-channel mean of raw latents
        raw_std: Sequence[float] = STABILITY_VAE_DEFAULTS["raw_std"],  # per-channel std of raw latents
        final_mean: float = STABILITY_VAE_DEFAULTS["final_mean"],  # wanted mean of the scaled latents
        final_std: float = STABILITY_VAE_DEFAULTS["final_std"],  # wanted std of the scaled latents (sigma_data)
        batch_size: int = STABILITY_VAE_DEFAULTS["batch_size"],  # images per VAE call
        pixel_range: str = STABILITY_VAE_DEFAULTS["pixel_range"],  # the VAE's pixel convention (VAE_PIXEL_RANGES)
    ):
        if not isinstance(vae_name, str) or not vae_name:
            raise ValueError(f"StabilityVAEEncoder: vae_name must be a non-empty string, got {vae_name!r}")
        raw_mean, raw_std = [float(v) for v in raw_mean], [float(v) for v in raw_std]
        if len(raw_mean) != len(raw_std):
            raise ValueError(
                f"StabilityVAEEncoder: raw_mean ({len(raw_mean)}) and raw_std ({len(raw_std)}) differ in length"
            )
        if not all(s > 0 for s in raw_std) or not final_std > 0:
            raise ValueError(f"StabilityVAEEncoder: raw_std and final_std must be positive, got {raw_std}, {final_std}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"StabilityVAEEncoder: batch_size must be a positive integer, got {batch_size!r}")
        if pixel_range not in VAE_PIXEL_RANGES:
            raise ValueError(f"StabilityVAEEncoder: pixel_range must be one of {VAE_PIXEL_RANGES}, got {pixel_range!r}")
        self.vae_name = vae_name
        self.pixel_range = pixel_range
        self.raw_mean = raw_mean
        self.raw_std = raw_std
        self.final_mean = float(final_mean)
        self.final_std = float(final_std)
        self.batch_size = batch_size
        self._vae = None  # loaded on first use
        self._scales: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # device -> (scale, bias)

    def config(self) -> dict[str, Any]:
        return {
            "class": "stability_vae",
            "vae_name": self.vae_name,
            "raw_mean": list(self.raw_mean),
            "raw_std": list(self.raw_std),
            "final_mean": self.final_mean,
            "final_std": self.final_std,
            "batch_size": self.batch_size,
            "pixel_range": self.pixel_range,
        }

    def vae(self, device: torch.device | str) -> torch.nn.Module:
        """The AutoencoderKL on `device`, loaded on first use (weights from the hub or a local directory)."""
        if self._vae is None:
            self._vae = load_vae(self.vae_name)
        self._vae.to(device)
        return self._vae

    def _scale(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel multiplier and offset of raw -> final: final = raw * scale + bias. Made once per device:
        a tensor built from Python numbers on a GPU is a blocking copy, which would drain the GPU's queue on every
        training step."""
        if like.device not in self._scales:
            raw_mean = torch.tensor(self.raw_mean, dtype=torch.float32).reshape(1, -1, 1, 1)
            raw_std = torch.tensor(self.raw_std, dtype=torch.float32).reshape(1, -1, 1, 1)
            scale = self.final_std / raw_std
            self._scales[like.device] = (scale.to(like.device), (self.final_mean - raw_mean * scale).to(like.device))
        return self._scales[like.device]

    @torch.no_grad()
    def encode_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] -> raw latents [N, 2C, H/8, W/8]: posterior mean and std, float32."""
        _check_pixels(x, "StabilityVAEEncoder")
        vae = self.vae(x.device)
        out = []
        for batch in x.split(self.batch_size):
            pixels = batch.to(torch.float32) / 255 if self.pixel_range == "0,1" else batch.to(torch.float32) / 127.5 - 1
            posterior = vae.encode(pixels).latent_dist
            out.append(torch.cat([posterior.mean, posterior.std], dim=1).to(torch.float32))
        return torch.cat(out)

    def encode_latents(self, raw: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Raw latents -> one sample mean + std * N(0, 1), scaled per channel (docs/design.md §8)."""
        channels = len(self.raw_mean)
        if raw.ndim != 4 or raw.shape[1] != 2 * channels:
            raise ValueError(
                f"StabilityVAEEncoder.encode_latents: expected [N, {2 * channels}, H, W] raw latents, "
                f"got {list(raw.shape)}"
            )
        raw = raw.to(torch.float32)
        mean, std = raw[:, :channels], raw[:, channels:]
        gen_device = generator.device if generator is not None else raw.device
        eps = torch.randn(mean.shape, generator=generator, device=gen_device).to(raw.device)
        scale, bias = self._scale(raw)
        return (mean + std * eps) * scale + bias

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Scaled latents [N, C, h, w] -> uint8 images [N, 3, 8h, 8w]."""
        channels = len(self.raw_mean)
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"StabilityVAEEncoder.decode: expected [N, {channels}, h, w] latents, got {list(x.shape)}")
        vae = self.vae(x.device)
        scale, bias = self._scale(x)
        raw = (x.to(torch.float32) - bias) / scale
        images = [self._pixels_to_uint8(vae.decode(batch).sample) for batch in raw.split(self.batch_size)]
        return torch.cat(images)

    def _pixels_to_uint8(self, x: torch.Tensor) -> torch.Tensor:
        if self.pixel_range == "0,1":
            return x.clamp(0, 1).mul(255).to(torch.uint8)
        return ((x.to(torch.float32) + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)


ENCODER_CLASSES: dict[str, type] = {"standard_rgb": StandardRGBEncoder, "stability_vae": StabilityVAEEncoder}
_ENCODER_KEYS: dict[str, set[str]] = {"standard_rgb": set(), "stability_vae": set(STABILITY_VAE_DEFAULTS)}


def encoder_from_config(cfg: dict[str, Any]) -> StandardRGBEncoder | StabilityVAEEncoder:
    """The encoder a settings dict describes (missing optional keys take their defaults)."""
    if not isinstance(cfg, dict) or "class" not in cfg:
        raise ValueError(f"encoder settings must be a dict with a 'class' key, got {cfg!r}")
    name = cfg["class"]
    if name not in ENCODER_CLASSES:
        raise ValueError(f"encoder settings: unknown class {name!r}; expected one of {sorted(ENCODER_CLASSES)}")
    kwargs = {k: v for k, v in cfg.items() if k != "class"}
    unknown = sorted(set(kwargs) - _ENCODER_KEYS[name])
    if unknown:
        raise ValueError(
            f"encoder settings for {name!r}: unknown keys {unknown}; allowed {sorted(_ENCODER_KEYS[name])}"
        )
    if name == "stability_vae":
        kwargs.setdefault("pixel_range", LEGACY_VAE_PIXEL_RANGE)  # written before the setting existed
    return ENCODER_CLASSES[name](**kwargs)
