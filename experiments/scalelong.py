"""ScaleLong experiment: train the demo configuration with every skip-scaling mode on both backbones, then
compare loss curves and the oscillation of hidden features and gradients (docs/design.md §9).

    python experiments/scalelong.py run --outdir runs/scalelong --setting cpu     # CPU only, small
    python experiments/scalelong.py run --outdir out/scalelong --rundir /tmp/sl --setting gpu  # one GPU, 14 at once
    python experiments/scalelong.py analyze --outdir runs/scalelong               # figures again

Every run is a plain `train_edm2.py --preset demo --arch A --skip-scaling M` training (same seed, same data,
same images per step) whose status lines carry the instruments of training/instruments.py. Runs that hit
--time-limit are stopped with SIGTERM (they checkpoint and stop cleanly); the comparison then uses the image
range that all runs of a backbone reached. Outputs in --outdir: scalelong.json (settings and figures),
scalelong.md (the table), scalelong.png (the plot); the run folders go to --rundir (default: --outdir).

The GPU setting starts all 14 runs (7 modes x 2 backbones) at once as separate processes on the one GPU and
stops each at the setting's time limit, so the whole experiment takes about one run's limit of wall time; every
run of a backbone then shares the GPU with the same others, and the comparison is at equal images seen.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from typing import Any

import click
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from edm2.cli import NumberRange
from edm2.presets import Ki
from training.instruments import read_stats

BACKBONES = ("edm2-unet", "uvit")
MODES = ("none", "inv_sqrt2", "cs", "ls", "ls_nonshared", "ls_channel", "ls_channel_nonshared")
# Images per run, per step, between instrument readings; DataLoader workers; runs at once; data set size.
SETTINGS: dict[str, dict[str, Any]] = {
    "cpu": dict(duration=1 * Ki, batch=32, status=32, workers=0, parallel=1, num_images=512, time_limit=600),
    "gpu": dict(
        duration=2048 * Ki, batch=256, status=16 * 256, workers=0, parallel=14, num_images=2000, time_limit=300
    ),
}
SMOOTH = 8  # readings in the moving average of the loss
COLORS = dict(
    none="black", inv_sqrt2="tab:blue", cs="tab:green", ls="tab:orange", ls_nonshared="tab:red",
    ls_channel="tab:purple", ls_channel_nonshared="tab:brown",
)


def run_name(backbone: str, mode: str) -> str:
    return f"{backbone}-{mode}"


def train_command(
    run_dir: str, data: str, backbone: str, mode: str, s: dict[str, Any], kappa: float, seed: int
) -> list[str]:
    cmd = [
        sys.executable, os.path.join(ROOT, "train_edm2.py"), "--outdir", run_dir, "--data", data, "--preset", "demo",
        "--arch", backbone, "--skip-scaling", mode, "--duration", str(s["duration"]), "--batch", str(s["batch"]),
        "--status", str(s["status"]), "--snapshot", "0", "--checkpoint", "0", "--workers", str(s["workers"]),
        "--seed", str(seed), "--instruments",  # on even where a long run compiles (it would default to off)
    ]  # fmt: skip
    return cmd + (["--kappa", str(kappa)] if mode == "cs" else [])


def train_all(outdir: str, runs: list[tuple[str, str]], s: dict[str, Any], kappa: float, seed: int) -> dict[str, float]:
    """Train the runs, `parallel` at a time, each stopped (SIGTERM) after `time_limit` seconds; returns
    the wall time of each run."""
    from training.demo_data import write_demo_dataset

    outdir = os.path.abspath(outdir)  # the runs start in the repository (cwd=ROOT), not where we were started
    data = os.path.join(outdir, "demo-data.zip")
    if not os.path.isfile(data):
        write_demo_dataset(data, num_images=s["num_images"])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    import torch

    gpus = torch.cuda.device_count()  # runs are spread round-robin over the visible GPUs
    started = 0
    pending = list(runs)
    active: dict[str, tuple[subprocess.Popen, float, Any]] = {}
    walls: dict[str, float] = {}
    stopped: set[str] = set()
    with click.progressbar(length=len(runs), label="ScaleLong runs") as bar:
        while pending or active:
            while pending and len(active) < s["parallel"]:
                backbone, mode = pending.pop(0)
                name = run_name(backbone, mode)
                run_dir = os.path.join(outdir, name)
                os.makedirs(run_dir, exist_ok=True)
                log = open(os.path.join(run_dir, "console.txt"), "a")  # noqa: SIM115 (open while the run lasts)
                cmd = train_command(run_dir, data, backbone, mode, s, kappa, seed)
                run_env = dict(env, CUDA_VISIBLE_DEVICES=str(started % gpus)) if gpus > 1 else env
                started += 1
                active[name] = (
                    subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=run_env, cwd=ROOT),
                    time.time(),
                    log,
                )
            time.sleep(0.5)
            for name, (proc, start, log) in list(active.items()):
                overtime = time.time() - start - s["time_limit"]
                if proc.poll() is None and overtime > 0 and name not in stopped:
                    proc.send_signal(signal.SIGTERM)  # the loop checkpoints and stops after its step
                    stopped.add(name)
                elif proc.poll() is None and overtime > 60:
                    proc.kill()
                    proc.wait()
                if proc.poll() is not None:
                    log.close()
                    walls[name] = time.time() - start
                    # 143 = 128 + SIGTERM: stopped at the time limit
                    if proc.returncode not in (0, 128 + signal.SIGTERM, -signal.SIGTERM):
                        click.echo(
                            f"\n{name}: exit code {proc.returncode}; see {os.path.join(outdir, name, 'console.txt')}",
                            err=True,
                        )
                    del active[name]
                    bar.update(1)
    return walls


# --- analysis ----------------------------------------------------------------------------------------------


def series(entries: list[dict[str, Any]], key: str) -> np.ndarray:
    return np.array([e.get(key, np.nan) for e in entries], dtype=np.float64)


def mean_abs_log_step(values: np.ndarray) -> float:
    """Mean |log(v_t / v_{t-1})|: how much a positive quantity jumps between readings (oscillation)."""
    v = values[np.isfinite(values) & (values > 0)]
    return float(np.mean(np.abs(np.diff(np.log(v))))) if len(v) > 1 else float("nan")


def log_std(values: np.ndarray) -> float:
    """Standard deviation of log(v): the spread of a positive quantity over a stretch of training."""
    v = values[np.isfinite(values) & (values > 0)]
    return float(np.std(np.log(v))) if len(v) > 1 else float("nan")


def _mean(values: list[float]) -> float | None:
    """Mean of the finite values; None when there are none."""
    v = [x for x in values if x is not None and math.isfinite(x)]
    return float(np.mean(v)) if v else None


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    window = max(1, min(window, len(values)))
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


def run_figures(entries: list[dict[str, Any]], target_loss: float | None) -> dict[str, Any]:
    """Loss and oscillation figures of one run (entries already cut to the common image range)."""
    n = len(entries)
    nimg = series(entries, "nimg")
    loss = series(entries, "loss")
    tail = entries[max(n - max(n // 10, 1), 0) :]
    second = entries[n // 2 :]
    skips = sorted({k.split("/")[1] for e in entries for k in e if k.startswith("skips/")})
    dec = sorted({k.split("/")[1] for e in entries for k in e if k.startswith(("stages/dec.", "stages/out"))})
    dec = [k for k in dec if any(f"stages/{k}/feat_rms" in e for e in entries)]
    fig: dict[str, Any] = dict(
        images=int(nimg[-1]) if n else 0,
        readings=n,
        final_loss=float(np.mean(series(tail, "loss"))),
        min_smoothed_loss=float(np.min(smooth(loss, SMOOTH))),
        loss_std_second_half=float(np.std(series(second, "loss"))),
        loss_last_quarter=float(np.mean(series(entries[n - max(n // 4, 1) :], "loss"))),
        loss_last_quarter_sem=float(np.std(series(entries[n - max(n // 4, 1) :], "loss")) / math.sqrt(max(n // 4, 1))),
        grad_norm_mean=_mean(list(series(second, "grad_norm"))),
        grad_norm_osc=mean_abs_log_step(series(second, "grad_norm")),
        grad_norm_log_std=log_std(series(second, "grad_norm")),
        skip_feat_rms_log_std=_mean([log_std(series(second, f"skips/{i}/feat_rms")) for i in skips]),
        skip_grad_osc=_mean([mean_abs_log_step(series(second, f"skips/{i}/grad_norm")) for i in skips]),
        dec_feat_rms_mean=_mean([_mean(list(series(second, f"stages/{k}/feat_rms"))) for k in dec]),
        dec_feat_rms_log_std=_mean([log_std(series(second, f"stages/{k}/feat_rms")) for k in dec]),
        dec_feat_grad_osc=_mean([mean_abs_log_step(series(second, f"stages/{k}/feat_grad_norm")) for k in dec]),
        sum_sq_skip_scale=float(sum(np.nanmean(series(second, f"skips/{i}/scale")) ** 2 for i in skips))
        if skips
        else None,
        num_skips=len(skips),
    )
    fig["final_smoothed_loss"] = float(smooth(loss, SMOOTH)[-1]) if n else float("nan")
    if target_loss is not None:
        hit = np.nonzero(smooth(loss, SMOOTH) <= target_loss + 1e-9 * abs(target_loss))[0]  # losses go negative
        fig["images_to_none_final_loss"] = int(nimg[hit[0]]) if len(hit) else None
    return fig


def analyze(outdir: str, settings: dict[str, Any] | None = None, rundir: str | None = None) -> dict[str, Any]:
    """Figures per backbone and mode from the runs in rundir (default: outdir); writes scalelong.json / .md /
    .png to outdir."""
    rundir = outdir if rundir is None else rundir
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for backbone in BACKBONES:
        for mode in MODES:
            run_dir = os.path.join(rundir, run_name(backbone, mode))
            if os.path.isfile(os.path.join(run_dir, "stats.jsonl")):
                try:
                    runs.setdefault(backbone, {})[mode] = [e for e in read_stats(run_dir) if "loss" in e]
                except ValueError as e:  # a line that is no status entry
                    raise click.ClickException(str(e)) from None
    previous = os.path.join(outdir, "scalelong.json")
    if settings is None and os.path.isfile(previous):
        with open(previous) as f:
            settings = json.load(f).get("settings")
    if not runs:
        raise click.ClickException(
            f"{rundir}: no runs with stats.jsonl (expected folders such as {run_name('uvit', 'cs')})"
        )
    results: dict[str, Any] = dict(settings=settings, backbones={})
    for backbone, by_mode in runs.items():
        common = min(max((e["nimg"] for e in entries), default=0) for entries in by_mode.values())
        cut = {mode: [e for e in entries if e["nimg"] <= common] for mode, entries in by_mode.items()}
        base = run_figures(cut["none"], None)["final_smoothed_loss"] if cut.get("none") else None
        figures = {mode: run_figures(entries, base) for mode, entries in cut.items() if entries}
        ref = figures.get("none", {}).get("images_to_none_final_loss")
        for f in figures.values():
            reached = f.get("images_to_none_final_loss")
            f["speedup_vs_none"] = ref / reached if (ref and reached) else None
        results["backbones"][backbone] = dict(common_images=int(common), modes=figures)
    write_outputs(
        outdir,
        results,
        cut_runs={
            b: {m: [e for e in es if e["nimg"] <= results["backbones"][b]["common_images"]] for m, es in bm.items()}
            for b, bm in runs.items()
        },
    )
    return results


def markdown_table(results: dict[str, Any]) -> str:
    cols = [
        ("final_loss", "final loss", "{:.4f}"), ("loss_last_quarter", "loss, last quarter", "{:.4f}"),
        ("loss_last_quarter_sem", "+-", "{:.4f}"), ("loss_std_second_half", "loss std (2nd half)", "{:.4f}"),
        ("speedup_vs_none", "speed-up to none's final loss", "{:.2f}x"), ("grad_norm_mean", "grad norm", "{:.3f}"),
        ("grad_norm_osc", "grad-norm osc.", "{:.3f}"), ("skip_grad_osc", "skip-grad osc.", "{:.3f}"),
        ("skip_feat_rms_log_std", "skip-feature spread", "{:.4f}"),
        ("dec_feat_rms_mean", "decoder-feature RMS", "{:.3f}"),
        ("dec_feat_rms_log_std", "decoder-feature spread", "{:.4f}"),
        ("dec_feat_grad_osc", "decoder-grad osc.", "{:.3f}"), ("sum_sq_skip_scale", "sum coef^2", "{:.2f}"),
    ]  # fmt: skip
    lines = []
    for backbone, b in results["backbones"].items():
        lines.append(f"**{backbone}** ({b['common_images']} images per run)\n")
        lines.append("| mode | " + " | ".join(c[1] for c in cols) + " |")
        lines.append("| --- " * (len(cols) + 1) + "|")
        for mode, f in b["modes"].items():
            cells = [
                "-" if f.get(k) is None or (isinstance(f.get(k), float) and math.isnan(f[k])) else fmt.format(f[k])
                for k, _, fmt in cols
            ]
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(path: str, cut_runs: dict[str, dict[str, list[dict[str, Any]]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("loss (smoothed)", lambda es: smooth(series(es, "loss"), SMOOTH), False),
        ("gradient norm, all parameters", lambda es: series(es, "grad_norm"), True),
        ("gradient norm at the long skips (mean)", lambda es: _mean_over(es, "skips/", "/grad_norm"), True),
        (
            "decoder feature RMS (mean over stages)",
            lambda es: _mean_over(es, ("stages/dec.", "stages/out"), "/feat_rms"),
            False,
        ),
    ]
    backbones = list(cut_runs)
    fig, axes = plt.subplots(
        len(backbones), len(panels), figsize=(4.2 * len(panels), 3.3 * len(backbones)), squeeze=False
    )
    for row, backbone in enumerate(backbones):
        for col, (title, fn, logy) in enumerate(panels):
            ax = axes[row][col]
            for mode, entries in cut_runs[backbone].items():
                if entries:
                    ax.plot(series(entries, "nimg") / 1e3, fn(entries), color=COLORS[mode], lw=0.9, label=mode)
            ax.set_title(f"{backbone}: {title}", fontsize=9)
            ax.set_xlabel("kimg", fontsize=8)
            ax.tick_params(labelsize=7)
            if logy:
                ax.set_yscale("log")
            if row == 0 and col == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def _mean_over(entries: list[dict[str, Any]], prefix: str | tuple[str, ...], suffix: str) -> np.ndarray:
    out = []
    for e in entries:
        vals = [v for k, v in e.items() if k.startswith(prefix) and k.endswith(suffix)]
        out.append(float(np.mean(vals)) if vals else np.nan)
    return np.array(out)


def write_outputs(outdir: str, results: dict[str, Any], cut_runs) -> None:
    from torch_utils.state_io import atomic_write

    def text_writer(text: str):
        def write(tmp: str) -> None:
            with open(tmp, "w") as f:
                f.write(text)

        return write

    atomic_write(os.path.join(outdir, "scalelong.json"), text_writer(json.dumps(results, indent=2)))
    atomic_write(os.path.join(outdir, "scalelong.md"), text_writer(markdown_table(results)))
    atomic_write(os.path.join(outdir, "scalelong.png"), lambda tmp: plot(tmp, cut_runs))


# --- command line -------------------------------------------------------------------------------------------


def _choices(value: str, allowed: tuple[str, ...], option: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise click.BadParameter(
            f"expected a comma-separated subset of {', '.join(allowed)}, got {value!r}", param_hint=option
        )
    return items


@click.group()
def cli() -> None:
    """ScaleLong experiment: skip-scaling modes x backbones on the demo data."""


@cli.command()
@click.option("--outdir", required=True, type=click.Path(file_okay=False),
              help="Experiment directory (one run folder per backbone and mode)")
@click.option("--setting", type=click.Choice(list(SETTINGS)), default="cpu", show_default=True, help="Budget")
@click.option("--backbones", default=",".join(BACKBONES), show_default=True, help="Comma-separated backbones")
@click.option("--modes", default=",".join(MODES), show_default=True, help="Comma-separated skip-scaling modes")
@click.option("--kappa", type=NumberRange(0, 1, min_open=True), default=0.7, show_default=True, help="CS base")
@click.option("--duration", type=click.IntRange(min=1), default=None, help="Images per run [default: the setting's]")
@click.option("--batch", type=click.IntRange(min=1), default=None, help="Images per step [default: the setting's]")
@click.option(
    "--status", type=click.IntRange(min=1), default=None, help="Images between readings [default: the setting's]"
)
@click.option("--parallel", type=click.IntRange(min=1), default=None, help="Runs at once [default: the setting's]")
@click.option(
    "--time-limit", "time_limit", type=NumberRange(min=1), default=None, help="Seconds per run before SIGTERM"
)
@click.option("--seed", type=int, default=0, show_default=True, help="Training seed (the same for every run)")
@click.option("--rundir", default=None, type=click.Path(file_okay=False),
              help="Folder of the run folders and data [default: --outdir]")
def run(
    outdir: str, setting: str, backbones: str, modes: str, kappa: float, seed: int, rundir: str | None, **overrides
) -> None:
    """Train every (backbone, mode) and write the comparison."""
    s = dict(SETTINGS[setting])
    s.update({k: v for k, v in overrides.items() if v is not None})
    s.update(kappa=kappa, seed=seed, setting=setting)
    runs = [(b, m) for b in _choices(backbones, BACKBONES, "--backbones") for m in _choices(modes, MODES, "--modes")]
    rundir = outdir if rundir is None else rundir
    os.makedirs(outdir, exist_ok=True)
    os.makedirs(rundir, exist_ok=True)
    s["wall_s"] = train_all(rundir, runs, s, kappa, seed)
    results = analyze(outdir, s, rundir)
    click.echo(markdown_table(results))
    click.echo(f"Wrote {os.path.join(outdir, 'scalelong.json')}, scalelong.md, scalelong.png")


@cli.command(name="analyze")
@click.option("--outdir", required=True, type=click.Path(exists=True, file_okay=False), help="Experiment directory")
@click.option("--rundir", default=None, type=click.Path(exists=True, file_okay=False), help="Run folders [--outdir]")
def analyze_cmd(outdir: str, rundir: str | None) -> None:
    """Recompute the figures and the plot from the runs' stats.jsonl."""
    results = analyze(outdir, rundir=rundir)
    click.echo(markdown_table(results))


if __name__ == "__main__":
    cli()
