"""Where the Triton kernels of the speed layer run: one check, shared by every kernel and by the speed plan."""

from __future__ import annotations

import os

import torch

try:  # Triton comes with CUDA builds of PyTorch; the reference path needs nothing beyond torch
    import triton
except ImportError:  # pragma: no cover - depends on the installation
    triton = None


def kernels_available(device: torch.device | str) -> bool:
    """Whether the Triton kernels run for tensors on `device`: CUDA with Triton (or Triton's interpreter on the CPU,
    with TRITON_INTERPRET=1 set before Triton is imported: that is for tests)."""
    kind = torch.device(device).type
    return triton is not None and (kind == "cuda" or (kind == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"))
