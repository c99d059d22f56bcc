"""Does the fast path train like the plain one? The same 2,000-step run (same seed, so the same images, noise
levels and noise at every step) on the demo data, once plain (float32, eager, TF32 off, kernels 'reference') and
once fast (fp16 or bf16, torch.compile, kernels 'fast'); then a plot of both loss curves and JSON figures.

    python benchmarks/loss_curves.py run --outdir runs/curves --path plain          # on one GPU
    python benchmarks/loss_curves.py run --outdir runs/curves --path fp16           # on another, at once
    python benchmarks/loss_curves.py compare --outdir runs/curves                   # plot + JSON

The loss at a status point is the mean over its 20 steps. 'Within noise' is judged against the plain curve's
own scatter once past the initial descent: the standard deviation of the differences between consecutive
status points over the second half of the run; the differences fast - plain are summarized there too.
"""

from __future__ import annotations

import json
import os
import sys

import click
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import edm2  # noqa: E402
from training.demo_data import write_demo_dataset  # noqa: E402
from training.instruments import read_stats  # noqa: E402
from training.plot_stats import save_figure  # noqa: E402
from training.config import LossConfig, LrConfig, TrainingConfig  # noqa: E402
from training.training_loop import training_loop  # noqa: E402

PATHS = {  # name: (precision, compile, kernels)
    "plain": ("fp32", False, "reference"),
    "fp16": ("fp16", True, "fast"),
    "bf16": ("bf16", True, "fast"),
}
# A U-Net of the EDM2 architecture sized for 32x32 data: four levels, attention at 16x16 and 8x8 (~21M parameters).
NETWORK = dict(
    model_channels=64, channel_mult=[1, 2, 3, 4], num_blocks=2, attn_resolutions=[16, 8], channels_per_head=64
)


def curve_config(outdir: str, path: str, steps: int, batch: int) -> TrainingConfig:
    precision, compile_net, kernels = PATHS[path]
    t = edm2.preset_training_kwargs("demo")
    return TrainingConfig(
        data=write_demo_dataset(os.path.join(outdir, "demo-data.zip")),
        network=dict(NETWORK, precision=precision), loss=LossConfig(**t["loss"]), lr=LrConfig(**t["lr"]),
        duration=steps * batch, batch=batch, status=20 * batch, snapshot=0, checkpoint=0, workers=4,
        compile=compile_net, kernels=kernels, instruments=False,
    )


@click.group()
def cli() -> None:
    """Loss curves of the plain and the fast training path."""


@cli.command()
@click.option("--outdir", required=True)
@click.option("--path", "path", type=click.Choice(list(PATHS)), required=True)
@click.option("--steps", type=int, default=2000, show_default=True)
@click.option("--batch", type=int, default=256, show_default=True)
def run(outdir: str, path: str, steps: int, batch: int) -> None:
    """Train one path."""
    os.makedirs(outdir, exist_ok=True)
    if path == "plain":  # the float32 reference: no TF32 in convolutions or matrix products
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    training_loop(os.path.join(outdir, path), curve_config(outdir, path, steps, batch))


def curve_figures(plain: list[dict], fast: list[dict]) -> dict:
    a, b = (np.array([s["loss"] for s in run]) for run in (plain, fast))
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    h = n // 2
    scatter = plain_scatter(a)
    diff = (b - a)[h:]
    return dict(
        points=n, final_plain=float(a[-1]), final_fast=float(b[-1]), second_half_plain=float(a[h:].mean()),
        second_half_fast=float(b[h:].mean()), second_half_mean_diff=float(diff.mean()),
        second_half_mean_abs_diff=float(np.abs(diff).mean()), second_half_max_abs_diff=float(np.abs(diff).max()),
        plain_scatter=scatter, mean_diff_over_scatter=float(diff.mean() / scatter) if scatter > 0 else None,
    )


def plain_scatter(losses) -> float:
    """Status-to-status standard deviation of a curve over its second half (past the initial descent)."""
    a = np.asarray(losses, dtype=np.float64)
    return float(np.std(np.diff(a[len(a) // 2:]))) if len(a) > 2 else 0.0


@cli.command()
@click.option("--outdir", required=True)
@click.option("--out", default=None, help="PNG [default: OUTDIR/loss_curves.png]")
def compare(outdir: str, out: str | None) -> None:
    """Plot the runs found in OUTDIR and print their figures against the plain run as JSON."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    runs = {
        p: read_stats(os.path.join(outdir, p)) for p in PATHS if os.path.isfile(os.path.join(outdir, p, "stats.jsonl"))
    }
    if "plain" not in runs:
        raise click.UsageError(f"{outdir}/plain/stats.jsonl is missing: run --path plain first")
    fig = Figure(figsize=(10, 3.8), dpi=110)
    ax, ax_d = fig.subplots(1, 2)
    result = {}
    steps_of = lambda run: [s["nimg"] / (run[0]["nimg"] / 20) for s in run]  # noqa: E731  (first status: step 20)
    for name, run in runs.items():
        color = f"C{list(PATHS).index(name)}"  # one colour per path in both panels
        ax.plot(steps_of(run), [s["loss"] for s in run], label=name, lw=1, color=color)
        if name != "plain":
            result[name] = curve_figures(runs["plain"], run)
            n = result[name]["points"]
            ax_d.plot(steps_of(run)[:n], [f["loss"] - p["loss"] for f, p in zip(run, runs["plain"])],
                      label=f"{name} - plain", lw=1, color=color)
    scatter = plain_scatter([s["loss"] for s in runs["plain"]])
    ax_d.axhspan(-scatter, scatter, color="grey", alpha=0.2, label="plain status-to-status std (2nd half)")
    ax.set(xlabel="training step", ylabel="loss (mean of 20 steps)", title="plain (fp32 eager) vs fast paths")
    ax_d.set(xlabel="training step", ylabel="loss difference", title="fast - plain")
    for a in (ax, ax_d):
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    save_figure(fig, out or os.path.join(outdir, "loss_curves.png"))
    print(json.dumps(dict(benchmark="loss_curves", network=NETWORK, **result)))


if __name__ == "__main__":
    cli()
