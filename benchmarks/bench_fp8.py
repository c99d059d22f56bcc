"""FP8 sampling on a GPU (accel/fp8.py): kernel correctness, per-shape timings, sampler throughput and accuracy;
prints one JSON line per result (flushed, so a run cut short keeps what it measured).

    python benchmarks/bench_fp8.py --preset edm2-img512-s --parts check,shapes,sampler,accuracy

Parts (--parts, any subset, run in this order):
- check: every FP8 kernel (Triton 3x3, im2col 3x3, 1x1 torch._scaled_mm) against the emulation
  (fp8_conv_emulated, rounded to bf16 as the kernels' outputs are) at each FP8 convolution shape of the preset
  (batch --check-batch); exits non-zero when one differs by more than CHECK_RTOL (relative L2) or CHECK_ATOL_MAX
  (max abs over the reference's max abs): both sum the same exact products in float32, so only the summation
  order may differ, flipping a bf16 rounding here and there (Triton's interpreter, which truncates to bf16, fails
  this check: run it on the GPU). triton_fast_acc (Hopper's unpromoted FP8 accumulation) is reported, not judged;
- shapes: per FP8 convolution shape of the preset (as benchmarks/conv_ceiling.py finds them, batch --batch),
  cuDNN's bf16 convolution against the FP8 kernels, with and without quantizing the input (eager: amax, divide,
  cast; compiled sampling fuses these into the producing elementwise chain), and a few Triton tilings; totals
  weighted by how often each shape runs per evaluation;
- sampler: the Heun sampler (batch --batch, --steps steps: 2 * steps - 1 evaluations), compiled with CUDA graphs
  and frozen weights as generate.py runs it, for each of --variants (bf16, fp8 = dynamic activation scale with
  the Triton 3x3 kernel, fp8-unit = unit activation scale, fp8-im2col = im2col 3x3), img/s;
- accuracy: final latents of each variant against bf16 and against float32 (uncompiled) on the same noise and
  labels: relative L2 error and max abs. Random weights with every gain set to --gain (at initialization the
  gains are zero and the network's output would not depend on its convolutions); --net loads a model file
  instead. With --vae (a hub name or local folder of the Stable Diffusion VAE) also the PSNR of the decoded uint8
  images against bf16's and float32's.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time

import click
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import edm2  # noqa: E402
from accel import fp8, resolve_speed_plan  # noqa: E402
from benchmarks.conv_ceiling import record_shapes, time_ms  # noqa: E402
from edm2.sampler import SamplerStats, edm_sampler  # noqa: E402
from training.encoders import StabilityVAEEncoder  # noqa: E402

PARTS = ("check", "shapes", "sampler", "accuracy")
VARIANTS = {  # name -> (fp8 mode, act_scale, conv3x3)
    "bf16": ("off", "dynamic", "triton"),
    "fp8": ("on", "dynamic", "triton"),
    "fp8-unit": ("on", "unit", "triton"),
    "fp8-im2col": ("on", "dynamic", "im2col"),
}
CHECK_RTOL = 2e-3  # relative L2 of a kernel against the emulation
CHECK_ATOL_MAX = 2**-6  # max abs difference over the emulation's max abs (a few bf16 steps at the largest values)
TILINGS = ((128, 128, 64), (128, 64, 64), (64, 128, 64), (128, 128, 32), (256, 128, 64))
DEVICE = "cuda"  # a smoke test on the CPU (Triton's interpreter) sets "cpu"


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def fp8_shapes(net: torch.nn.Module, batch: int) -> list[tuple[tuple, tuple, int]]:
    """(input shape, weight shape, calls per evaluation) of the convolutions that FP8 runs, costliest first."""
    convs, _ = record_shapes(net, batch)
    rows = [(xs, ws, n) for (xs, ws), n in convs.items()
            if len(ws) == 4 and ws[2:] in ((1, 1), (3, 3)) and ws[1] % 32 == 0 and ws[0] % 16 == 0]
    return sorted(rows, key=lambda r: -r[2] * r[0][0] * r[0][2] * r[0][3] * r[1][0] * r[1][1] * r[1][2] * r[1][3])


def operands(xs: tuple, ws: tuple, seed: int = 0) -> dict:
    """Random unit-RMS activations (channels-last bf16) and Eq. 47-scaled weights, quantized as FP8Conv does."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(xs, device=DEVICE, generator=gen).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w = torch.randn(ws, device=DEVICE, generator=gen) / (ws[1] * ws[2] * ws[3]) ** 0.5
    wq, w_scale = fp8.quantize_weight(w)
    x_scale = fp8.activation_scale(x)
    return dict(x=x, w=w, xq=fp8.quantize_activation(x, x_scale), wq=wq, w_flat=wq.permute(0, 2, 3, 1).reshape(
        ws[0], -1).contiguous(), x_scale=x_scale, w_scale=w_scale)


def kernels_for(k: int) -> dict:
    """name -> fn(ops) of the FP8 kernels for a k x k convolution."""
    if k == 1:
        return dict(scaled_mm=lambda o: fp8.fp8_conv1x1_scaled_mm(o["xq"], o["w_flat"], o["x_scale"], o["w_scale"]))
    return dict(triton=lambda o: fp8.fp8_conv3x3(o["xq"], o["w_flat"], o["x_scale"] * o["w_scale"]),
                im2col=lambda o: fp8.fp8_conv3x3_im2col(o["xq"], o["w_flat"], o["x_scale"], o["w_scale"]),
                triton_fast_acc=lambda o: fp8.conv3x3_triton(o["xq"], o["w_flat"], o["x_scale"] * o["w_scale"],
                                                             precise=False))


INFORMATIVE = ("triton_fast_acc",)  # measured and compared, but not used by FP8Conv: no part of the pass / fail


def part_check(shapes: list, batch: int) -> bool:
    ok_all = True
    for xs, ws, _ in shapes:
        xs = (batch, *xs[1:])
        o = operands(xs, ws)
        ref = fp8.fp8_conv_emulated(o["xq"], o["wq"], o["x_scale"] * o["w_scale"]).float()  # rounded to bf16
        for name, fn in kernels_for(ws[-1]).items():
            y = fn(o).float()
            r = float((y - ref).norm() / ref.norm())
            a = float((y - ref).abs().max() / ref.abs().max())
            ok = r <= CHECK_RTOL and a <= CHECK_ATOL_MAX and y.shape == ref.shape
            ok_all &= ok or name in INFORMATIVE
            emit(part="check", kernel=name, x=list(xs), w=list(ws), rel_l2=r, max_abs_rel=a, ok=ok,
                 channels_last=y.is_contiguous(memory_format=torch.channels_last))
    emit(part="check", all_ok=ok_all, rtol=CHECK_RTOL, atol_max=CHECK_ATOL_MAX)
    return ok_all


def part_shapes(shapes: list) -> None:
    totals: dict[str, float] = {}
    for xs, ws, count in shapes:
        o = operands(xs, ws)
        w_bf16 = o["w"].to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        pad = ws[-1] // 2
        gflop = 2 * xs[0] * xs[2] * xs[3] * ws[0] * ws[1] * ws[2] * ws[3] / 1e9
        row = dict(bf16_cudnn=time_ms(lambda: F.conv2d(o["x"], w_bf16, padding=pad)),
                   quantize_eager=time_ms(lambda: fp8.quantize_activation(o["x"], fp8.activation_scale(o["x"]))))
        for name, fn in kernels_for(ws[-1]).items():
            row[name] = time_ms(lambda: fn(o))
        if ws[-1] == 3:
            tiles = {}
            for tiling in TILINGS:
                if ws[1] % tiling[2] == 0:
                    try:
                        tiles["x".join(map(str, tiling))] = round(time_ms(lambda: fp8.conv3x3_triton(
                            o["xq"], o["w_flat"], o["x_scale"] * o["w_scale"], blocks=tiling)), 4)
                    except Exception as e:  # a tiling the GPU cannot hold (shared memory): say so, go on
                        tiles["x".join(map(str, tiling))] = f"{type(e).__name__}"
            best = min((v for v in tiles.values() if isinstance(v, float)), default=row["triton"])
            row["triton_best_tiling"] = best
        fp8_ms = row["scaled_mm"] if ws[-1] == 1 else row["triton"]
        row["fp8_with_quantize"] = fp8_ms + row["quantize_eager"]
        for key, ms in row.items():
            totals[key] = totals.get(key, 0.0) + ms * count
        emit(part="shapes", x=list(xs), w=list(ws), count=count, gflop=round(gflop, 2),
             ms={k: round(v, 4) for k, v in row.items()},
             tflop_per_s={k: round(gflop / v, 1) for k, v in row.items() if k != "quantize_eager"},
             **(dict(tilings_ms=tiles) if ws[-1] == 3 else {}))
    emit(part="shapes", totals_ms_per_eval={k: round(v, 2) for k, v in totals.items()},
         note="1x1 shapes count under scaled_mm, 3x3 under triton/im2col; fp8_with_quantize = kernel + eager quantize")


def prepared(net: torch.nn.Module, variant: str, compile_net: bool) -> torch.nn.Module:
    """net (a copy) set up as prepare_for_sampling does, with the variant's FP8 settings."""
    mode, act_scale, conv3x3 = VARIANTS[variant]
    net = copy.deepcopy(net)
    net.precision = "bf16"
    plan = resolve_speed_plan(torch.device(DEVICE), compile=compile_net, fp8=mode)
    plan.apply(net.eval().requires_grad_(False), weights_channels_last=False)
    if mode == "on":
        fp8.swap_fp8(net, mode, act_scale=act_scale, conv3x3=conv3x3)
    return plan.compile_for_sampling(net)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """PSNR in dB of uint8 images a against b over the whole batch (None where they are equal)."""
    mse = float((a.float() - b.float()).square().mean())
    return None if mse == 0 else 10 * math.log10(255**2 / mse)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def sample(net, noise, labels, steps: int) -> tuple[torch.Tensor, float]:
    sync()
    t0 = time.perf_counter()
    x = edm_sampler(net, noise, labels, num_steps=steps, stats=SamplerStats())
    sync()
    return x, time.perf_counter() - t0


@click.command()
@click.option("--preset", default="edm2-img512-s", show_default=True)
@click.option("--net", "net_path", default=None, help="A model file instead of random weights")
@click.option("--parts", default=",".join(PARTS), show_default=True, help=f"Comma-separated, of {', '.join(PARTS)}")
@click.option("--variants", default="bf16,fp8", show_default=True,
              help=f"Sampler / accuracy variants, of {', '.join(VARIANTS)}")
@click.option("--batch", type=int, default=64, show_default=True)
@click.option("--check-batch", type=int, default=8, show_default=True)
@click.option("--steps", type=int, default=32, show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option("--gain", type=float, default=1.0, show_default=True, help="Every gain of the random-weight network")
@click.option("--compile/--no-compile", "compile_net", default=True, show_default=True,
              help="sampler: torch.compile with CUDA graphs, as generate.py")
@click.option("--vae", metavar="NAME|DIR", default=None, help="accuracy: PSNR of the images this VAE decodes")
def main(preset: str, net_path: str | None, parts: str, variants: str, batch: int, check_batch: int, steps: int,
         repeats: int, gain: float, compile_net: bool, vae: str | None) -> None:
    chosen = [p for p in parts.split(",") if p]
    bad = [p for p in chosen if p not in PARTS]
    if bad:
        raise click.BadParameter(f"expected some of {', '.join(PARTS)}, got {', '.join(bad)}", param_hint="'--parts'")
    names = [v for v in variants.split(",") if v]
    if not names or any(v not in VARIANTS for v in names):
        raise click.BadParameter(f"expected some of {', '.join(VARIANTS)}, got {variants!r}", param_hint="'--variants'")
    try:
        fp8.check_fp8_device(DEVICE)
    except ValueError as e:
        raise click.ClickException(f"bench_fp8.py: {e}") from None
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    if net_path is not None:
        net = edm2.load_network(net_path, device=DEVICE).net.eval()
    else:
        net = edm2.Precond(**edm2.preset_network_kwargs(preset, precision="bf16")).to(DEVICE).eval()
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name.endswith("gain"):
                    p.fill_(gain)
    emit(part="setup", preset=preset, net=net_path, gain=None if net_path else gain, batch=batch, steps=steps,
         device=torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE, torch=torch.__version__,
         triton=fp8.triton.__version__)
    t_start = time.perf_counter()
    shapes = fp8_shapes(net, batch) if {"check", "shapes"} & set(chosen) else []
    failed = False
    if "check" in chosen:
        failed = not part_check(shapes, check_batch)
    if "shapes" in chosen:
        part_shapes(shapes)
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    noise = torch.randn([batch, net.img_channels, net.img_resolution, net.img_resolution], device=DEVICE,
                        generator=gen)
    labels = (torch.nn.functional.one_hot(torch.randint(0, net.label_dim, [batch], device=DEVICE, generator=gen),
                                          net.label_dim).float() if net.label_dim else None)
    finals: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        if "sampler" in chosen:
            for v in names:
                t0 = time.perf_counter()
                runner = prepared(net, v, compile_net=compile_net)
                x, first = sample(runner, noise, labels, steps)
                times = [sample(runner, noise, labels, steps)[1] for _ in range(repeats)]
                finals[v] = x
                emit(part="sampler", variant=v, img_per_s=round(batch / min(times), 2), seconds=round(min(times), 3),
                     first_call_s=round(first, 1), setup_and_first_s=round(time.perf_counter() - t0, 1),
                     evals=2 * steps - 1, compiled=compile_net,
                     peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEVICE == "cuda" else None)
                del runner
                torch.compiler.reset()
        if "accuracy" in chosen:
            for v in names:
                if v not in finals:  # not compiled: eager with the same modules
                    finals[v] = sample(prepared(net, v, compile_net=False), noise, labels, steps)[0]
            f32 = copy.deepcopy(net).float()
            f32.precision = "fp32"
            resolve_speed_plan(torch.device(DEVICE), compile=False).apply(f32, weights_channels_last=False)
            ref32 = sample(f32, noise, labels, steps)[0]
            ref = finals.get("bf16")
            images = {}
            if vae is not None:
                encoder = StabilityVAEEncoder(vae_name=vae)
                images = {v: encoder.decode(x) for v, x in [("fp32", ref32), *finals.items()]}
            for v, x in finals.items():
                row = dict(part="accuracy", variant=v, finite=bool(torch.isfinite(x).all()),
                           rel_l2_vs_fp32=float((x - ref32).norm() / ref32.norm()),
                           max_abs_vs_fp32=float((x - ref32).abs().max()))
                if ref is not None and v != "bf16":
                    row.update(rel_l2_vs_bf16=float((x - ref).norm() / ref.norm()),
                               max_abs_vs_bf16=float((x - ref).abs().max()))
                if images:
                    row.update(psnr_vs_fp32_db=psnr(images[v], images["fp32"]),
                               psnr_vs_bf16_db=psnr(images[v], images["bf16"]) if "bf16" in images else None)
                emit(**row, latent_rms=float(ref32.square().mean().sqrt()))
    emit(part="done", seconds=round(time.perf_counter() - t_start, 1), check_failed=failed)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
