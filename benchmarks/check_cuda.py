"""The CUDA paths against the reference fixture: fp32 / fp16 / bf16 forward, torch.compile, the fast speed plan
(accel: fused attention, channels-last, fast dropout), a compiled training step, the fused post-step. Prints JSON
(one line) with every figure, the tolerance it is held to and `ok`; exits 1 when a figure is over its tolerance. Run
on a GPU machine (python benchmarks/check_cuda.py)."""

from __future__ import annotations

import json
import math
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from accel import resolve_speed_plan  # noqa: E402
from benchmarks.common import require_cuda  # noqa: E402
from conftest import build_reference_net, load_reference  # noqa: E402
from networks import Precond  # noqa: E402
from training import EDM2Loss  # noqa: E402


def compiled(module):
    """torch.compile(module, fullgraph=True) from a clean slate: the check compiles one network in a dozen variants
    (precision, layout, train / eval, another network), more than dynamo's recompile limit of one code object holds;
    with fullgraph=True the ninth would be a hard failure rather than a check."""
    torch.compiler.reset()
    return torch.compile(module, fullgraph=True)


class Figures(dict):
    """The result, each figure also written to stderr as it is measured: a run stopped by a time limit still shows
    how far it got."""

    def __setitem__(self, key, value):
        print(f"{key}: {value}", file=sys.stderr, flush=True)
        super().__setitem__(key, value)

    def update(self, other=(), **kw):
        for k, v in dict(other, **kw).items():
            self[k] = v


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of b."""
    return float((a.detach().double() - b.detach().double()).abs().max() / b.detach().double().abs().max())


def tolerance(name: str) -> float:
    """What a figure may reach: float32 rounding for float32 paths, half-precision rounding for fp16 / bf16."""
    if name.endswith("_sigmas"):
        return 5.0  # a random count's distance from its mean, in standard deviations
    if "bf16" in name:
        return 2e-2  # bfloat16 keeps 8 mantissa bits: 2^-8 = 4e-3 per rounding, a few dozen layers deep
    if "fp16" in name:
        return 3e-3  # float16: 2^-11 = 5e-4 per rounding
    return 1e-5


def main() -> None:
    require_cuda("check_cuda.py")
    dev = torch.device("cuda")
    ref = load_reference()
    x, sigma, labels, noise = (torch.from_numpy(ref[k]).to(dev) for k in ("x", "sigma", "labels", "noise"))
    out_D = torch.from_numpy(ref["out_D"]).to(dev)
    net = build_reference_net(ref).to(dev)
    res = Figures(device=torch.cuda.get_device_name(), torch=torch.__version__)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if "--dropout-only" in sys.argv:
        return finish(check_dropout())
    if "--post-step-only" in sys.argv:  # the fused post-step kernel (EMA before forced WN) alone, compiled
        res.update(check_post_step(net))
        return finish(res)
    with torch.no_grad():
        D32 = net(x, sigma, labels)
        res["fp32_vs_reference"] = rel(D32, out_D)
        for p in ("fp16", "bf16"):
            net.precision = p
            res[f"{p}_vs_reference"] = rel(net(x, sigma, labels), out_D)
        net.precision = "fp32"
        res["compiled_fp32_vs_reference"] = rel(compiled(net)(x, sigma, labels), out_D)
        net.precision = "fp16"
        res["compiled_fp16_vs_reference"] = rel(compiled(net)(x, sigma, labels), out_D)
        # cuDNN's autotuner held off as in the checks above: its picks would change the rounding from run to run.
        fast = resolve_speed_plan(dev, cudnn_benchmark=False)
        reference = resolve_speed_plan(dev, kernels="reference", cudnn_benchmark=False)
        fast.apply(net)  # the training layout: NHWC activations and weights, fused attention
        res["fast_plan_fp16_vs_reference"] = rel(net(x, sigma, labels), out_D)
        res["compiled_fast_plan_fp16_vs_reference"] = rel(compiled(net)(x, sigma, labels), out_D)
        net.precision = "fp32"
        res["fast_plan_fp32_vs_reference"] = rel(net(x, sigma, labels), out_D)
        reference.apply(net)
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
    for fn in (net, compiled(net)):
        net.zero_grad()
        loss_fn(fn, x, labels, sigma=sigma, noise=noise).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    res["compiled_train_grad_vs_eager"] = rel(grads[1], grads[0])
    grad_ref = torch.cat([torch.from_numpy(ref["grad/" + n]).flatten() for n, _ in net.named_parameters()]).to(dev)
    res["eager_grad_vs_reference"] = rel(grads[0], grad_ref)
    res.update(check_fast_plan_training(net, x, sigma, labels, noise, grads[0]))
    res.update(check_post_step(net))
    res.update(check_dropout())
    # Rows of up to 256 * 2 * 9 = 4608 elements: several SUB-element chunks per program, a ragged last one.
    wide = Precond(img_resolution=16, img_channels=4, label_dim=10, model_channels=128, channel_mult=[1, 2],
                   num_blocks=1, attn_resolutions=[8]).to(dev)
    res.update(check_post_step(wide, "wide_"))
    wx = torch.randn([8, 4, 16, 16], device=dev)
    with torch.no_grad():  # gains away from their zero init, so that every weight gets a gradient
        for q in wide.parameters():
            if q.ndim == 0:
                q.copy_(torch.randn([]))
    wide.train()
    wide_labels = torch.nn.functional.one_hot(torch.randint(0, 10, [8], device=dev), 10).float()
    wide_sigma, wide_noise = torch.rand([8], device=dev) * 3 + 0.1, torch.randn_like(wx)
    wide.zero_grad()
    EDM2Loss()(wide, wx, wide_labels, sigma=wide_sigma, noise=wide_noise).mean().backward()
    wide_grad = torch.cat([q.grad.flatten() for q in wide.parameters()])
    res.update(check_fast_plan_training(wide, wx, wide_sigma, wide_labels, wide_noise, wide_grad, "wide_"))
    finish(res)


def finish(res: dict) -> None:
    figures = {k: v for k, v in res.items() if isinstance(v, float)}
    failed = [k for k, v in figures.items() if not v <= tolerance(k)]
    res.update(tolerances={k: tolerance(k) for k in figures}, failed=failed, ok=not failed)
    print(json.dumps(res))
    sys.exit(1 if failed else 0)


def check_dropout(p: float = 0.1, shape: tuple = (64, 256, 64, 64)) -> dict:
    """Fast dropout (accel/dropout.py) at EDM2-M's training size: the keep rate of a mask, and a compiled
    dropout of exp(x), whose output is zero exactly where the mask drops and whose gradient must be zero exactly
    there too (the same mask forward and backward); the kept values are exp(x) / (1 - p)."""
    from accel.dropout import dropout, dropout_keep_mask

    dev = torch.device("cuda")
    n = math.prod(shape)
    sd = math.sqrt(p * (1 - p) / n)
    keep = dropout_keep_mask(torch.tensor([1], device=dev), list(shape), True, p)
    res = {"dropout_keep_rate_sigmas": abs(keep.float().mean().item() - (1 - p)) / sd}
    x = torch.randn(shape, device=dev).to(torch.bfloat16).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = torch.compile(lambda x: dropout(x.exp(), p))(x)
    y.float().sum().backward()
    kept = y != 0
    res["dropout_compiled_keep_rate_sigmas"] = abs(kept.float().mean().item() - (1 - p)) / sd
    res["dropout_compiled_grad_mask_mismatch"] = ((x.grad != 0) != kept).float().mean().item()
    res["dropout_compiled_bf16_values"] = rel(y[kept], (x.detach().float().exp() / (1 - p))[kept])
    return res


def check_fast_plan_training(net, x, sigma, labels, noise, truth, prefix: str = "") -> dict:
    """The gradients of a training step through the fast speed plan (fused attention, channels-last weights and
    activations), eager and compiled, against the reference plan's float32 gradients `truth`; in fp32 held to float32
    rounding, in fp16 / bf16 reported."""
    import copy

    out = {}
    loss_fn = EDM2Loss()
    for p in ("fp32", "fp16", "bf16"):
        for compile_net in (False, True):
            plan = resolve_speed_plan(x.device, compile=compile_net, cudnn_benchmark=False)
            n = plan.apply(copy.deepcopy(net).train())
            n.zero_grad(set_to_none=True)
            n.precision = p
            fn = compiled(n) if compile_net else n
            loss_fn(fn, x, labels, sigma=sigma, noise=noise).mean().backward()
            err = rel(torch.cat([q.grad.flatten() for q in n.parameters()]), truth)
            path = "compiled" if compile_net else "eager"
            if p == "fp32":  # held to float32 rounding
                out[f"{prefix}fast_plan_train_grad_fp32_{path}_vs_reference"] = err
            else:  # half precision: the distance from the float32 gradients (a note, as no tolerance applies)
                out.setdefault(f"{prefix}fast_plan_half_grads_vs_fp32", {}).setdefault(p, {})[path] = err
    return out


def check_post_step(net: torch.nn.Module, prefix: str = "") -> dict:
    """The fused post-step kernel (compiled for the GPU) against the library calls, 5 steps from the same
    gradients (NaN / inf included), on a channels-last and a contiguous copy of the network; with the power-function
    EMAs and forced weight normalization (G), and with the traditional EMA and none (ablation config A)."""
    import copy

    from accel.post_step import PostStep
    from training.phema import PowerFunctionEMA, TraditionalEMA

    out = {}
    for kind in ("power", "traditional"):
        for layout in ("contiguous", "channels_last"):
            runs = []
            for fused in (False, True):
                n = copy.deepcopy(net)
                if layout == "channels_last":
                    n.to(memory_format=torch.channels_last)
                opt = torch.optim.Adam(n.parameters(), lr=0.01, betas=(0.9, 0.99), eps=1e-8, fused=not fused)
                if kind == "power":
                    ema = PowerFunctionEMA(n, [0.05, 0.10])
                else:
                    ema = TraditionalEMA(n, halflife_nimg=256, rampup_ratio=0.25, count_before_step=True)
                runs.append((n, ema, PostStep(n, opt, ema, fused=fused, normalize=kind == "power")))
            for step in range(5):
                gen = torch.Generator(device="cuda").manual_seed(step)
                grads = [torch.randn(p.shape, device="cuda", generator=gen) for p in net.parameters()]
                grads[-1].view(-1)[:2] = torch.tensor([float("nan"), float("inf")])
                for n, _, post in runs:
                    for p, g in zip(n.parameters(), grads):
                        p.grad = g.clone().to(memory_format=torch.preserve_format) if g.ndim != 4 else g.clone(
                        ).contiguous(memory_format=torch.channels_last if layout == "channels_last" else
                                     torch.contiguous_format)  # fmt: skip
                    post((step + 1) * 64, 64)
            (a, ea, _), (b, eb, pb) = runs
            name = f"{prefix}post_step_fused_{layout}" + ("_traditional" if kind == "traditional" else "")
            if not pb.fused:
                raise RuntimeError(f"{name}: the fused post-step fell back to the library calls")
            out[f"{name}_params_vs_plain"] = max(rel(y, x) for x, y in zip(a.parameters(), b.parameters()))
            out[f"{name}_ema_vs_plain"] = max(
                rel(y, x) for e, f in zip(ea.emas, eb.emas) for x, y in zip(e.parameters(), f.parameters()))
    return out


if __name__ == "__main__":
    main()
