"""Loss curves of training runs from their stats.jsonl, as a PNG.

    python -m training.plot_stats runs/demo                       # writes runs/demo/loss.png
    python -m training.plot_stats runs/a runs/b --out compare.png # several runs in one plot
    python -m training.plot_stats runs/a --magnitudes             # per-stage activation RMS and weight norms
"""

from __future__ import annotations

import io
import os
from typing import Any

import click

from torch_utils.state_io import atomic_write_bytes

from .instruments import read_stats


def save_figure(fig: Any, path: str) -> None:
    """A matplotlib figure as a PNG file, written atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())

def loss_entries(run_dir: str) -> list[dict]:
    """The status entries of a run with a loss, oldest first (none before its first status line)."""
    return [s for s in read_stats(run_dir) if "loss" in s and "kimg" in s]


def plot_loss_curves(run_dirs: list[str], path: str) -> str:
    """Training loss and learning rate against images seen, one line per run; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6), dpi=110)
    ax_loss, ax_lr = fig.subplots(1, 2)
    for run_dir in run_dirs:
        stats = loss_entries(run_dir)
        kimg = [s["kimg"] for s in stats]
        label = os.path.basename(os.path.normpath(run_dir))
        ax_loss.plot(kimg, [s["loss"] for s in stats], marker=".", label=label)
        ax_lr.plot(kimg, [s["lr"] for s in stats], label=label)
    ax_loss.set(xlabel="training images (thousands)", ylabel="EDM2 loss (learned weighting)", title="loss")
    ax_lr.set(xlabel="training images (thousands)", ylabel="learning rate", title="learning rate")
    ax_lr.set_ylim(bottom=0)
    for ax in (ax_loss, ax_lr):
        ax.grid(alpha=0.3)
    if len(run_dirs) > 1:
        ax_loss.legend()
    fig.tight_layout()
    save_figure(fig, path)
    return path


def magnitude_series(stats: list[dict], what: str) -> dict[str, list[float]]:
    """stage name -> its `what` ('feat_rms' or 'weight_norm', training/instruments.py) on every status line that has
    it (stats.jsonl sorts the keys, so the stages come in name order)."""
    series: dict[str, list[float]] = {}
    for s in stats:
        for key, value in s.items():
            if key.startswith("stages/") and key.endswith(f"/{what}"):
                series.setdefault(key[len("stages/"):-len(what) - 1], []).append(value)
    return series


def plot_magnitudes(run_dirs: list[str], path: str) -> str:
    """Per-stage activation RMS and weight norms against images seen (the EDM2 paper's magnitude plots): one line
    per stage for one run; for several runs, one line per run, each the mean over its stages of the value relative
    to the first status line. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6), dpi=110)
    axes = fig.subplots(1, 2)
    for run_dir in run_dirs:
        stats = [s for s in read_stats(run_dir) if any(k.endswith("/weight_norm") for k in s)]
        if not stats:
            raise FileNotFoundError(f"{run_dir}: stats.jsonl has no magnitude figures (run with instruments on)")
        kimg = [s["kimg"] for s in stats]
        for ax, what in zip(axes, ("feat_rms", "weight_norm")):
            series = magnitude_series(stats, what)
            if len(run_dirs) == 1:
                for stage, values in series.items():
                    ax.plot(kimg[: len(values)], values, label=stage)
            else:
                n = min(len(v) for v in series.values())
                rel = [sum(v[i] / v[0] for v in series.values()) / len(series) for i in range(n)]
                ax.plot(kimg[:n], rel, marker=".", label=os.path.basename(os.path.normpath(run_dir)))
    scale = "" if len(run_dirs) == 1 else " / first status line, mean over stages"
    axes[0].set(xlabel="training images (thousands)", ylabel=f"activation RMS{scale}", title="activations")
    axes[1].set(xlabel="training images (thousands)", ylabel=f"weight norm{scale}", title="weights")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, path)
    return path


@click.command()
@click.argument("run_dirs", nargs=-1, required=True)
@click.option("--out", default=None, help="PNG to write [default: RUN_DIR/loss.png (magnitudes.png) for one run]")
@click.option("--magnitudes", is_flag=True, help="Per-stage activation RMS and weight norms instead of the loss")
def main(run_dirs: tuple[str, ...], out: str | None, magnitudes: bool) -> None:
    """Plot the loss curves (or the magnitudes) of one or more training runs."""
    if out is None and len(run_dirs) > 1:
        raise click.BadParameter("several runs need --out", param_hint="--out")
    plot, name = (plot_magnitudes, "magnitudes.png") if magnitudes else (plot_loss_curves, "loss.png")
    target = out or os.path.join(run_dirs[0], name)
    try:
        for run_dir in run_dirs:  # an empty plot says nothing: say why instead
            if not magnitudes and not loss_entries(run_dir):
                raise ValueError(f"{os.path.join(run_dir, 'stats.jsonl')}: no status line with a loss yet")
        path = plot(list(run_dirs), target)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        if isinstance(e, FileNotFoundError) and e.filename is None:  # read_stats's: a run without stats.jsonl
            raise click.ClickException(str(e)) from None
        # writing the PNG: a folder that cannot be made, a folder in its place
        raise click.BadParameter(f"cannot write {target!r} ({e.strerror or e})", param_hint="--out") from None
    click.echo(f"Wrote {path}")


if __name__ == "__main__":
    main()
