"""Shared measurements for the benchmarks: FLOPs per image (torch's flop counter) and the bf16 matrix-product
peak of the GPU in the same run, so achieved TFLOP/s can be stated as a fraction of what the chip does."""

from __future__ import annotations

import ast
import io
import json
import sys
import time
import zipfile

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode


def flops_per_image(net: torch.nn.Module, train: bool, batch: int = 2) -> float:
    """FLOPs of one forward (train=False) or forward + backward (train=True) per image, as torch counts them
    (one multiply-add = 2 FLOPs)."""
    dev = next(net.parameters()).device
    x = torch.randn([batch, net.img_channels, net.img_resolution, net.img_resolution], device=dev)
    sigma = torch.full([batch], 1.0, device=dev)
    labels = torch.eye(net.label_dim, device=dev)[:batch] if net.label_dim else None
    with FlopCounterMode(display=False) as counter:
        if train:
            D, logvar = net(x, sigma, labels, return_logvar=True)
            (D.square().mean() + logvar.mean()).backward()
        else:
            with torch.no_grad():
                net(x, sigma, labels)
    if train:
        net.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def require_cuda(script: str) -> None:
    """A GPU-only benchmark on a machine without CUDA: one line and exit status 1, instead of an assertion from
    deep inside torch or minutes of timing the CPU."""
    if not torch.cuda.is_available():
        sys.exit(f"{script}: needs a CUDA GPU (torch.cuda.is_available() is False here)")


def matmul_peak_tflops(n: int = 8192, repeats: int = 10) -> float | None:
    """bf16 n x n x n matrix-product rate on random data (TFLOP/s), or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e12


def set_inductor_options(options: tuple[str, ...]) -> dict[str, object]:
    """KEY=VALUE settings of torch._inductor.config (VALUE as JSON or a Python literal, else a string), for trying
    compiler options before any of them becomes a default; returns them as a dict for the benchmark's JSON."""
    import torch._inductor.config as inductor_config

    applied: dict[str, object] = {}
    for option in options:
        key, sep, text = option.partition("=")
        if not sep or not hasattr(inductor_config, key):
            raise ValueError(f"expected KEY=VALUE with a torch._inductor.config key, got {option!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text
        setattr(inductor_config, key, value)
        applied[key] = value
    return applied


def random_latent_zip(path: str, num: int, resolution: int, label_dim: int) -> str:
    """An uncompressed zip of `num` random raw latents (8 x resolution^2: mean and std, like `dataset_tool.py encode`
    output) with labels, readable by this project and by the official code."""
    rng = np.random.default_rng(0)
    labels = []
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for i in range(num):
            raw = np.concatenate(
                [rng.normal(size=(4, resolution, resolution)) * 4, np.full((4, resolution, resolution), 0.1)]
            )
            buf = io.BytesIO()
            np.save(buf, raw.astype(np.float32))
            z.writestr(f"{i:08d}.npy", buf.getvalue())
            labels.append([f"{i:08d}.npy", i % label_dim])
        z.writestr("dataset.json", json.dumps({"labels": labels, "num_classes": label_dim}))
    return path
