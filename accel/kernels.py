"""Where the Triton kernels of the speed layer run: one check, shared by every kernel and by the speed plan."""

from __future__ import annotations

import os

import torch

try:  # Triton comes with CUDA builds of PyTorch; the reference path needs nothing beyond torch
    import triton
except ImportError:  # pragma: no cover - depends on the installation
    triton = None


# Triton generates code for NVIDIA GPUs of compute capability 7.0 (Volta) or newer.
MIN_TRITON_CAPABILITY = (7, 0)


def kernels_available(device: torch.device | str) -> bool:
    """Whether the Triton kernels (and torch.compile's GPU code) run for tensors on `device`: CUDA with Triton on a
    GPU Triton supports (or Triton's interpreter on the CPU, with TRITON_INTERPRET=1 set before Triton is imported:
    that is for tests). Where CUDA is absent, a CUDA device counts as capable (resolving a plan touches no GPU)."""
    device = torch.device(device)
    if triton is None:
        return False
    if device.type == "cuda":
        if torch.cuda.is_available():
            return torch.cuda.get_device_capability(device) >= MIN_TRITON_CAPABILITY
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
