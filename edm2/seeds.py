"""Seed lists and per-seed random numbers: image k's noise and class depend only on seed k (docs/design.md §7).

Every image owns a torch.Generator seeded with its seed modulo 2^32 (as the official generate_images.py
does), so the numbers are the same whatever the batch size or the number of GPUs. The generator lives on the
noise device, by default the compute device as in the official code: on CUDA the numbers then come from the
CUDA generator (the official images per seed); with noise_device='cpu' they are the CPU generator's on every
device. Draw order per seed: the initial noise, then the random class (if any), then the churn noise of each
step.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit integer
MAX_SEEDS = 10_000_000  # images per seed list at most (200 FID runs of 50k): a typo such as 0-99999999999 is refused
SEED_MODULUS = 2**32  # the official generator seeds with seed % 2^32: seeds k and k + 2^32 give the same image
_RANGE = re.compile(r"^(\d+)\s*-\s*(\d+)$")


def parse_seeds(text: str) -> list[int]:
    """Parse a seed list such as '0-63,100,200-299' (ranges inclusive) into a list of distinct seeds."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"seed list must be a non-empty string such as '0-63,100', got {text!r}")
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        match = _RANGE.match(part)
        if match:
            first, last = int(match.group(1)), int(match.group(2))
            if last < first:
                raise ValueError(f"seed range {part!r} runs backwards (expected first-last with first <= last)")
            if len(seeds) + last - first + 1 > MAX_SEEDS:  # before the list is built: it would fill the memory
                raise ValueError(f"seed list {text!r} holds more than {MAX_SEEDS} seeds")
            seeds.extend(range(first, last + 1))
        elif part.isdigit():
            seeds.append(int(part))
        else:
            raise ValueError(f"malformed seed list item {part!r} in {text!r}: expected N or N-M with integers >= 0")
    if max(seeds) > MAX_SEED:
        raise ValueError(f"seeds must be at most {MAX_SEED}, got {max(seeds)}")
    seen: set[int] = set()
    for seed in seeds:
        if seed in seen:
            raise ValueError(f"seed {seed} appears more than once in {text!r}")
        seen.add(seed)
    return seeds


def format_seeds(seeds: Sequence[int]) -> str:
    """The inverse of parse_seeds: consecutive runs written as ranges."""
    parts = []
    i = 0
    while i < len(seeds):
        j = i
        while j + 1 < len(seeds) and seeds[j + 1] == seeds[j] + 1:
            j += 1
        parts.append(str(seeds[i]) if i == j else f"{seeds[i]}-{seeds[j]}")
        i = j + 1
    return ",".join(parts)


def check_noise_device(noise_device: torch.device | str, device: torch.device | str) -> torch.device:
    """The device whose generator draws the noise: the CPU or the compute device (ValueError otherwise)."""
    noise_device, device = torch.device(noise_device), torch.device(device)
    if noise_device.type not in ("cpu", device.type):
        raise ValueError(f"noise device must be 'cpu' or the compute device ({device.type}), got {noise_device.type!r}")
    if noise_device.type == device.type:
        return device  # the same CUDA device (index) as the computation
    return noise_device


class SeedGenerators:
    """One torch.Generator per seed on `noise_device`; batched draws stack the per-seed draws (results
    move to `device`)."""

    def __init__(
        self,
        seeds: Sequence[int],  # one seed per image of the batch
        device: torch.device | str = "cpu",  # where the drawn tensors are returned
        noise_device: torch.device | str | None = None,  # where the generators draw; None = `device`
    ):
        self.seeds = [int(s) for s in seeds]
        self.device = torch.device(device)
        self.noise_device = check_noise_device(self.device if noise_device is None else noise_device, self.device)
        self.generators = [
            torch.Generator(device=self.noise_device).manual_seed(s % SEED_MODULUS) for s in self.seeds
        ]

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Unit normal [len(seeds), *shape]."""
        draws = [torch.randn(list(shape), generator=g, dtype=dtype, device=g.device) for g in self.generators]
        return torch.stack(draws).to(self.device)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """Unit normal shaped like x (x's first dimension must be the number of seeds)."""
        if x.shape[0] != len(self.generators):
            raise ValueError(f"randn_like: batch of {x.shape[0]} does not match {len(self.generators)} seeds")
        return self.randn(x.shape[1:], dtype=x.dtype).to(x.device)

    def randint(self, high: int) -> torch.Tensor:
        """One integer in [0, high) per seed, shape [len(seeds)], int64."""
        draws = [torch.randint(high, [1], generator=g, device=g.device) for g in self.generators]
        return torch.cat(draws).to(self.device)


def seed_noise_and_labels(
    seeds: Sequence[int],
    shape: Sequence[int],
    label_dim: int = 0,
    class_idx: int | None = None,
    device: torch.device | str = "cpu",
    noise_device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, SeedGenerators]:
    """Initial noise [N, *shape], one-hot labels [N, label_dim] (None if label_dim 0) and the generators.

    The class is drawn per seed after the noise; class_idx, if given, replaces it for every image. The
    generators draw on noise_device (None = device, the official choice).
    """
    if class_idx is not None:
        if label_dim == 0:
            raise ValueError(f"class {class_idx} given for an unconditional network (label_dim 0)")
        if not 0 <= class_idx < label_dim:
            raise ValueError(
                f"class {class_idx} is out of range: the network has {label_dim} classes (0..{label_dim - 1})"
            )
    gens = SeedGenerators(seeds, device, noise_device)
    noise = gens.randn(shape)
    labels = None
    if label_dim > 0:
        idx = gens.randint(label_dim)  # drawn even for a fixed class, so the churn noise stays the same
        if class_idx is not None:
            idx = torch.full_like(idx, class_idx)
        labels = torch.nn.functional.one_hot(idx, label_dim).to(torch.float32)
    return noise, labels, gens
