"""Loss curves of training runs from their stats.jsonl, as a PNG.

    python -m training.plot_stats runs/demo                       # writes runs/demo/loss.png
    python -m training.plot_stats runs/a runs/b --out compare.png # several runs in one plot
"""

from __future__ import annotations

import io
import json
import os

import click

from torch_utils.state_io import atomic_write_bytes


def read_stats(run_dir: str) -> list[dict]:
    """The status entries of a run (one per status line), oldest first."""
    path = os.path.join(run_dir, "stats.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (has the run printed a status line yet?)")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss_curves(run_dirs: list[str], path: str) -> str:
    """Training loss and learning rate against images seen, one line per run; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6), dpi=110)
    ax_loss, ax_lr = fig.subplots(1, 2)
    for run_dir in run_dirs:
        stats = read_stats(run_dir)
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
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return path


@click.command()
@click.argument("run_dirs", nargs=-1, required=True)
@click.option("--out", default=None, help="PNG to write [default: RUN_DIR/loss.png for one run]")
def main(run_dirs: tuple[str, ...], out: str | None) -> None:
    """Plot the loss curves of one or more training runs."""
    if out is None and len(run_dirs) > 1:
        raise click.BadParameter("several runs need --out", param_hint="--out")
    try:
        path = plot_loss_curves(list(run_dirs), out or os.path.join(run_dirs[0], "loss.png"))
    except FileNotFoundError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"Wrote {path}")


if __name__ == "__main__":
    main()
