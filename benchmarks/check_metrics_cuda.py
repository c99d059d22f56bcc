"""The metric detectors on a GPU: throughput of the full-size networks, CPU/GPU agreement, and a cross-check of
the architectures against independent implementations where the machine has them (torchvision's Inception3,
timm's DINOv2 ViT-L/14), with the same random weights. Prints one JSON line per check.

    python benchmarks/check_metrics_cuda.py

Random weights stand in for the published files (the machine may be offline); throughput does not depend on
the values. The cross-checks switch off the two FID-graph pool quirks on our side (torchvision has neither)
and feed both networks the same preprocessed input (DINOv2 at 518 px: no positional resize on either side).
"""

from __future__ import annotations

import json
import time

import torch

from edm2.detectors import DINOv2ViT, InceptionV3FID
from edm2.detectors import inception as inception_module


def init_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 4:
                p.copy_(torch.randn(p.shape, generator=gen) * (2 / p[0].numel()) ** 0.5)
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            else:
                p.copy_((0 if name.endswith("bias") else 1) + 0.1 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))
            elif name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
    return model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def throughput(batch: int = 250, resolution: int = 512, iters: int = 4) -> None:
    device = torch.device("cuda")
    images = torch.randint(0, 256, (batch, 3, resolution, resolution), dtype=torch.uint8)
    for name, build in (("fid", InceptionV3FID), ("fd_dinov2", DINOv2ViT)):
        gpu = init_(build()).to(device)
        cpu = init_(build())
        with torch.no_grad():
            x = images.to(device)
            gpu(x)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(iters):
                features = gpu(x)
            torch.cuda.synchronize()
            rate = batch * iters / (time.perf_counter() - start)
            diff = rel(features[:4].cpu(), cpu(images[:4]))
        print(json.dumps({"check": f"{name} throughput", "img_per_s": round(rate), "batch": batch,
                          "input_px": resolution, "seconds_per_50k": round(50000 / rate),
                          "gpu_vs_cpu_max_rel": diff}), flush=True)  # fmt: skip


def versus_torchvision() -> None:
    try:
        import torchvision
    except ImportError:
        print(json.dumps({"check": "inception vs torchvision", "skipped": "no torchvision"}))
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ours = init_(InceptionV3FID()).to(device)
    theirs = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    result = theirs.load_state_dict(ours.state_dict(), strict=False)  # independent key names and shapes
    theirs = theirs.to(device).eval()
    theirs.fc = torch.nn.Identity()
    images = torch.randint(0, 256, (4, 3, 299, 299), dtype=torch.uint8, device=device)
    x = ours.preprocess(images)
    with torch.no_grad():
        tv = theirs(x)
        ours.Mixed_7c.max_pool = False  # torchvision has neither FID quirk
        plain_pool = inception_module.avg_pool_valid_only
        inception_module.avg_pool_valid_only = lambda t: torch.nn.functional.avg_pool2d(t, 3, 1, 1)
        try:
            plain = ours(images)
        finally:
            inception_module.avg_pool_valid_only = plain_pool
            ours.Mixed_7c.max_pool = True
        fid = ours(images)
    print(json.dumps({"check": "inception vs torchvision", "missing": result.missing_keys,
                      "unexpected": [k for k in result.unexpected_keys if "num_batches" not in k],
                      "max_rel_without_quirks": rel(plain, tv),
                      "quirks_change_features_by": rel(fid, tv)}))  # fmt: skip


def versus_timm() -> None:
    try:
        import timm
    except ImportError:
        print(json.dumps({"check": "dinov2 vs timm", "skipped": "no timm"}))
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ours = init_(DINOv2ViT(resolution=518)).to(device)
    theirs = timm.create_model("vit_large_patch14_dinov2", pretrained=False, img_size=518, num_classes=0)
    result = theirs.load_state_dict(ours.state_dict(), strict=False)
    theirs = theirs.to(device).eval()
    images = torch.randint(0, 256, (2, 3, 518, 518), dtype=torch.uint8, device=device)
    with torch.no_grad():
        a = ours(images)
        b = theirs.forward_features(ours.preprocess(images))[:, 0]
    print(json.dumps({"check": "dinov2 vs timm", "missing": result.missing_keys, "unexpected": result.unexpected_keys,
                      "max_rel": rel(a, b)}))  # fmt: skip


if __name__ == "__main__":
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    versus_torchvision()
    versus_timm()
    throughput()
