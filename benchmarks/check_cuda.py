"""The CUDA paths against the reference fixture: fp32 / fp16 / bf16 forward, torch.compile, a compiled
training step, the fused post-step. Prints JSON (one line) with every figure, the tolerance it is held to and
`ok`; exits 1 when a figure is over its tolerance. Run on a GPU machine (python benchmarks/check_cuda.py)."""

from __future__ import annotations

import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from conftest import build_reference_net, load_reference  # noqa: E402
from networks import Precond  # noqa: E402
from training import EDM2Loss  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of b."""
    return float((a.detach().double() - b.detach().double()).abs().max() / b.detach().double().abs().max())


def tolerance(name: str) -> float:
    """What a figure may reach: float32 rounding for float32 paths, half-precision rounding for fp16 / bf16."""
    if "bf16" in name:
        return 2e-2  # bfloat16 keeps 8 mantissa bits: 2^-8 = 4e-3 per rounding, a few dozen layers deep
    if "fp16" in name:
        return 3e-3  # float16: 2^-11 = 5e-4 per rounding
    return 1e-5


def main() -> None:
    dev = torch.device("cuda")
    ref = load_reference()
    x, sigma, labels, noise = (torch.from_numpy(ref[k]).to(dev) for k in ("x", "sigma", "labels", "noise"))
    out_D = torch.from_numpy(ref["out_D"]).to(dev)
    net = build_reference_net(ref).to(dev)
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        D32 = net(x, sigma, labels)
        res["fp32_vs_reference"] = rel(D32, out_D)
        for p in ("fp16", "bf16"):
            net.precision = p
            res[f"{p}_vs_reference"] = rel(net(x, sigma, labels), out_D)
        net.precision = "fp32"
        compiled = torch.compile(net, fullgraph=True)
        res["compiled_fp32_vs_reference"] = rel(compiled(x, sigma, labels), out_D)
        net.precision = "fp16"
        res["compiled_fp16_vs_reference"] = rel(torch.compile(net, fullgraph=True)(x, sigma, labels), out_D)
        net.channels_last = True  # the training layout: NHWC activations and weights
        net.to(memory_format=torch.channels_last)
        res["channels_last_fp16_vs_reference"] = rel(net(x, sigma, labels), out_D)
        compiled = torch.compile(net, fullgraph=True)
        res["compiled_channels_last_fp16_vs_reference"] = rel(compiled(x, sigma, labels), out_D)
        net.channels_last = False
        net.to(memory_format=torch.contiguous_format)
    # A compiled training step from the fixture's trainin/* weights: gradients match the reference and eager.
    net.precision = "fp32"
    state = net.state_dict()
    state.update({k[len("trainin/"):]: torch.from_numpy(v) for k, v in ref.items() if k.startswith("trainin/")})
    net.load_state_dict(state)
    net.train()
    net.normalize_weights_()
    loss_fn = EDM2Loss()
    grads = []
    for fn in (net, torch.compile(net, fullgraph=True)):
        net.zero_grad()
        loss_fn(fn, x, labels, sigma=sigma, noise=noise).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    res["compiled_train_grad_vs_eager"] = rel(grads[1], grads[0])
    grad_ref = torch.cat([torch.from_numpy(ref["grad/" + n]).flatten() for n, _ in net.named_parameters()]).to(dev)
    res["eager_grad_vs_reference"] = rel(grads[0], grad_ref)
    res.update(check_post_step(net))
    # Rows of up to 256 * 2 * 9 = 4608 elements: several SUB-element chunks per program, a ragged last one.
    wide = Precond(img_resolution=16, img_channels=4, label_dim=10, model_channels=128, channel_mult=[1, 2],
                   num_blocks=1, attn_resolutions=[8]).to(dev)
    res.update(check_post_step(wide, "wide_"))
    figures = {k: v for k, v in res.items() if isinstance(v, float)}
    failed = [k for k, v in figures.items() if not v <= tolerance(k)]
    res.update(tolerances={k: tolerance(k) for k in figures}, failed=failed, ok=not failed)
    print(json.dumps(res))
    sys.exit(1 if failed else 0)


def check_post_step(net: torch.nn.Module, prefix: str = "") -> dict:
    """The fused post-step kernel (compiled for the GPU) against the library calls, 5 steps from the same
    gradients (NaN / inf included), on a channels-last and a contiguous copy of the network."""
    import copy

    from training.phema import PowerFunctionEMA
    from training.post_step import PostStep

    out = {}
    for layout in ("contiguous", "channels_last"):
        runs = []
        for fused in (False, True):
            n = copy.deepcopy(net)
            if layout == "channels_last":
                n.to(memory_format=torch.channels_last)
            opt = torch.optim.Adam(n.parameters(), lr=0.01, betas=(0.9, 0.99), eps=1e-8, fused=not fused)
            ema = PowerFunctionEMA(n, [0.05, 0.10])
            runs.append((n, ema, PostStep(n, opt, ema, fused=fused)))
        for step in range(5):
            gen = torch.Generator(device="cuda").manual_seed(step)
            grads = [torch.randn(p.shape, device="cuda", generator=gen) for p in net.parameters()]
            grads[-1].view(-1)[:2] = torch.tensor([float("nan"), float("inf")])
            for n, _, post in runs:
                for p, g in zip(n.parameters(), grads):
                    p.grad = g.clone().to(memory_format=torch.preserve_format) if g.ndim != 4 else g.clone().contiguous(
                        memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
                post((step + 1) * 64, 64)
        (a, ea, _), (b, eb, pb) = runs
        out[f"{prefix}post_step_fused_{layout}_params_vs_plain"] = max(rel(y, x) for x, y in zip(a.parameters(), b.parameters()))
        out[f"{prefix}post_step_fused_{layout}_ema_vs_plain"] = max(
            rel(y, x) for e, f in zip(ea.emas, eb.emas) for x, y in zip(e.parameters(), f.parameters()))
    return out


if __name__ == "__main__":
    main()
