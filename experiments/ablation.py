"""The EDM2 paper's ablation ladder at small scale: train configurations A-G (presets ablation-{a..g}-demo, the demo
data) side by side, then compare the loss and the drift of activation and weight magnitudes (docs/design.md §13).

    python experiments/ablation.py run --outdir runs/ablation --setting cpu            # CPU, one run at a time
    python experiments/ablation.py run --outdir out/ablation --rundir /tmp/abl --setting gpu   # one GPU, 7 at once
    python experiments/ablation.py analyze --outdir runs/ablation                      # the figures again

Every run is a plain `train_edm2.py --preset ablation-X-demo` training (same seed, data and batch) whose status lines
carry the per-stage magnitudes of training/instruments.py. Runs past --time-limit are stopped with SIGTERM (they
checkpoint and stop cleanly); the comparison then uses the image range that every run reached. Outputs in --outdir:
ablation.json (settings and figures), ablation.md (the table), ablation.png (loss and magnitudes).

The loss: A trains with the EDM loss weighting (no learned u(sigma)), so its loss is on another scale than B-G's
(which can go negative); A is compared with the rest through its magnitudes, and the losses from B on.

The EMA: runs that finish write their EMA snapshots at the end: A-B the traditional EMA (its half-life scaled to
the run's duration as the presets scale it, docs/design.md §13), C-G the power-function EMAs. Each snapshot is scored
by the EDM-weighted loss (no u(sigma): one scale for all seven) on held-out demo images with fixed sigma and noise.
"""

from __future__ import annotations

import glob
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

from edm2.presets import ABLATION_CONFIGS, EDM_EMA_HALFLIFE_FRACTION, Ki, get_preset, preset_training_kwargs
from training.instruments import read_stats
from training.plot_stats import magnitude_series, save_figure
from torch_utils.state_io import atomic_write_bytes, write_json

# Images per run and per step, images between status lines, runs at once, demo images, seconds per run, and the
# activation dtype: bf16 on the GPU, since A-F have no activation clipping and A-D's magnitudes grow (fp16's range).
SETTINGS: dict[str, dict[str, Any]] = {
    "cpu": dict(duration=4 * Ki, batch=32, status=256, parallel=1, num_images=512, time_limit=600, precision="fp32"),
    "gpu": dict(
        duration=640 * Ki, batch=256, status=16 * 256, parallel=7, num_images=2000, time_limit=480, precision="bf16"
    ),
}


# Held-out images for the EMA snapshots' loss: demo images the runs never saw (their data is drawn with seed 0).
HELD_OUT = dict(num_images=256, seed=1)


def train_command(run_dir: str, data: str, letter: str, s: dict[str, Any], seed: int) -> list[str]:
    command = [
        sys.executable, os.path.join(ROOT, "train_edm2.py"), "--outdir", run_dir, "--data", data,
        "--preset", f"ablation-{letter}-demo", "--duration", str(s["duration"]), "--batch", str(s["batch"]),
        "--status", str(s["status"]), "--snapshot", "0", "--checkpoint", "0", "--workers", "0", "--seed", str(seed),
        "--precision", s["precision"], "--instruments",  # on even where a long run compiles (default: off)
    ]  # fmt: skip
    if "ema_halflife" in preset_training_kwargs(f"ablation-{letter}-demo"):
        # The traditional EMA's half-life follows this run's duration, as the preset's follows the preset's.
        command += ["--ema-halflife", str(round(s["duration"] * EDM_EMA_HALFLIFE_FRACTION))]
    return command


def train_all(rundir: str, letters: list[str], s: dict[str, Any], seed: int) -> None:
    """Train the configurations, `parallel` at a time, each stopped (SIGTERM) after `time_limit` seconds."""
    from training.demo_data import write_demo_dataset

    data = os.path.join(rundir, "demo-data.zip")
    if not os.path.isfile(data):
        write_demo_dataset(data, num_images=s["num_images"])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    pending, active = list(letters), {}
    with click.progressbar(length=len(letters), label="ablation runs") as bar:
        while pending or active:
            while pending and len(active) < s["parallel"]:
                letter = pending.pop(0)
                run_dir = os.path.join(rundir, letter)
                os.makedirs(run_dir, exist_ok=True)
                log = open(os.path.join(run_dir, "console.txt"), "a")  # noqa: SIM115 (open while the run lasts)
                proc = subprocess.Popen(train_command(run_dir, data, letter, s, seed), stdout=log,
                                        stderr=subprocess.STDOUT, env=env, cwd=ROOT)  # fmt: skip
                active[letter] = (proc, time.time(), log)
            time.sleep(0.5)
            for letter, (proc, start, log) in list(active.items()):
                if proc.poll() is None and time.time() - start > s["time_limit"]:
                    proc.send_signal(signal.SIGTERM)  # the loop checkpoints and stops after its step
                    try:
                        proc.wait(timeout=120)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
                if proc.poll() is not None:
                    log.close()
                    if proc.returncode not in (0, 128 + signal.SIGTERM, -signal.SIGTERM):
                        click.echo(f"\n{letter}: exit code {proc.returncode}; see {log.name}", err=True)
                    del active[letter]
                    bar.update(1)


def drift(values: list[list[float]]) -> float | None:
    """Last reading / first reading, averaged in log space over the stages: 1 = no drift; None without readings."""
    logs = [math.log(v[-1] / v[0]) for v in values if v[0] > 0 and v[-1] > 0]
    return float(np.exp(np.mean(logs))) if logs else None


def run_figures(entries: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(entries)
    tail = entries[n - max(n // 10, 1):]
    activations = list(magnitude_series(entries, "feat_rms").values())
    return dict(
        images=int(entries[-1]["nimg"]),
        readings=n,
        final_loss=float(np.mean([e["loss"] for e in tail])),
        activation_drift=drift(activations),
        weight_drift=drift(list(magnitude_series(entries, "weight_norm").values())),
        final_activation_rms=float(np.mean([v[-1] for v in activations])) if activations else None,
    )


def final_ema_snapshots(run_dir: str) -> list[tuple[str, dict[str, Any]]]:
    """(path, header) of the run's EMA snapshots of its last snapshot time; none if it wrote none."""
    from training.model_files import read_file_header

    found = [(p, read_file_header(p)) for p in sorted(glob.glob(os.path.join(glob.escape(run_dir),
                                                                              "network-snapshot-*.safetensors")))]
    if not found:
        return []
    last = max(h.get("training_nimg") or 0 for _, h in found)
    return [(p, h) for p, h in found if (h.get("training_nimg") or 0) == last]


def ema_label(header: dict[str, Any]) -> str:
    """What a snapshot averages, from its header."""
    if header.get("ema_std") is not None:
        return f"power-function std {header['ema_std']:.3f}"
    ema = (header.get("extra") or {}).get("ema")
    if isinstance(ema, dict) and ema.get("kind") == "traditional":
        halflife = ema.get("halflife_nimg")
        return f"traditional, half-life {'inf' if halflife is None else f'{halflife:g}'} images"
    return "unknown"


def ema_figures(rundir: str, letters: list[str]) -> dict[str, dict[str, Any]]:
    """Per configuration: the held-out EDM-weighted loss of each final EMA snapshot, and the lowest."""
    from edm2.phema_search import load_validation_data, validation_loss_metric
    from training.demo_data import write_demo_dataset
    from training.model_files import load_model_file

    snapshots = {letter: final_ema_snapshots(os.path.join(rundir, letter)) for letter in letters}
    snapshots = {k: v for k, v in snapshots.items() if v}
    if not snapshots:
        return {}
    resolution = next(iter(snapshots.values()))[0][1]["init_kwargs"]["img_resolution"]
    data = write_demo_dataset(os.path.join(rundir, f"held-out-{resolution}.zip"), resolution=resolution, **HELD_OUT)
    images, labels = load_validation_data(data)
    demo = get_preset("demo")
    metric = validation_loss_metric(images, labels, P_mean=demo["P_mean"], P_std=demo["P_std"],
                                    learned_weighting=False)  # fmt: skip
    out = {}
    for letter, found in snapshots.items():
        scored = [dict(file=os.path.basename(p), ema=ema_label(h), images=h.get("training_nimg"),
                       loss=metric(load_model_file(p).net)) for p, h in found]  # fmt: skip
        out[letter] = dict(snapshots=scored, best=min(scored, key=lambda e: e["loss"]))
    return out


def analyze(outdir: str, rundir: str | None = None, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Figures per configuration from the runs in rundir (default: outdir), cut to the common image range; writes
    ablation.json / .md / .png to outdir."""
    rundir = rundir or outdir
    runs = {}
    for letter in ABLATION_CONFIGS:
        if os.path.isfile(os.path.join(rundir, letter, "stats.jsonl")):
            entries = [e for e in read_stats(os.path.join(rundir, letter)) if "loss" in e]
            if entries:
                runs[letter] = entries
    if not runs:
        raise click.ClickException(f"{rundir}: no run folder with a stats.jsonl (a..g)")
    common = min(e[-1]["nimg"] for e in runs.values())
    cut = {k: [e for e in v if e["nimg"] <= common] for k, v in runs.items()}
    results = dict(settings=settings, common_images=common, configs={k: run_figures(v) for k, v in cut.items()})
    results["ema"] = ema_figures(rundir, list(runs))
    os.makedirs(outdir, exist_ok=True)
    write_json(os.path.join(outdir, "ablation.json"), results)
    atomic_write_bytes(os.path.join(outdir, "ablation.md"), markdown_table(results).encode())
    plot(os.path.join(outdir, "ablation.png"), cut)
    return results


def markdown_table(results: dict[str, Any]) -> str:
    lines = [
        f"Compared over the first {results['common_images']} images that every run reached; the EMA columns: each "
        "run's final EMA snapshot with the lowest held-out loss in EDM weighting (runs stopped early wrote none); "
        "— in a magnitude column: the run's status lines carry no magnitudes (trained without --instruments).",
        "",
        "| config | final loss | activation drift (last / first) | weight drift (last / first) "
        "| final activation RMS | EMA (images) | EMA loss (EDM weighting, held out) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    emas = results.get("ema") or {}
    for letter, f in results["configs"].items():
        loss = f"{f['final_loss']:.4f}" + (" (EDM weighting)" if letter == "a" else "")
        best = emas.get(letter, {}).get("best")
        ema = f"{best['ema']} ({best['images']}) | {best['loss']:.4f}" if best else "— | —"
        act, weight, rms = (("—" if f[k] is None else f"{f[k]:{spec}}") for k, spec in
                            (("activation_drift", ".4f"), ("weight_drift", ".4f"), ("final_activation_rms", ".3f")))
        lines.append(f"| {letter.upper()} | {loss} | {act} | {weight} | {rms} | {ema} |")
    return "\n".join(lines) + "\n"


def plot(path: str, cut: dict[str, list[dict[str, Any]]]) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.6), dpi=110)
    ax_loss, ax_act, ax_w = fig.subplots(1, 3)
    for letter, entries in cut.items():
        kimg = [e["nimg"] / 1000 for e in entries]
        color = f"C{ABLATION_CONFIGS.index(letter)}"  # one color per configuration in all three panels
        if letter != "a":  # A's loss has another weighting (see the module docstring)
            ax_loss.plot(kimg, [e["loss"] for e in entries], label=letter.upper(), color=color)
        for ax, what in ((ax_act, "feat_rms"), (ax_w, "weight_norm")):
            series = list(magnitude_series(entries, what).values())
            if not series:  # a run trained without --instruments: no magnitudes to draw ("—" in the table)
                continue
            n = min(len(v) for v in series)
            rel = [float(np.exp(np.mean([math.log(v[i] / v[0]) for v in series]))) for i in range(n)]
            ax.plot(kimg[:n], rel, label=letter.upper(), color=color)
    ax_loss.set(xlabel="training images (thousands)", ylabel="loss (learned weighting)", title="loss, B-G")
    ax_act.set(xlabel="training images (thousands)", ylabel="activation RMS / first", title="activations")
    ax_w.set(xlabel="training images (thousands)", ylabel="weight norm / first", title="weights")
    for ax in (ax_loss, ax_act, ax_w):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


@click.group()
def cli() -> None:
    """The EDM2 ablation ladder (configs A-G) at small scale."""


@cli.command()
@click.option("--outdir", required=True, help="Experiment directory (table, figures; run folders a..g)")
@click.option("--setting", type=click.Choice(list(SETTINGS)), default="cpu", show_default=True, help="Budget")
@click.option("--configs", default=ABLATION_CONFIGS, show_default=True, help="Letters of the configurations to run")
@click.option("--duration", type=click.IntRange(min=1), default=None, help="Images per run [default: the setting's]")
@click.option("--time-limit", type=click.IntRange(min=1), default=None, help="Seconds per run [the setting's]")
@click.option("--seed", type=int, default=0, show_default=True, help="Training seed (the same for every run)")
@click.option("--rundir", default=None, help="Folder of the run folders and data [default: --outdir]")
def run(outdir: str, setting: str, configs: str, duration: int | None, time_limit: int | None, seed: int,
        rundir: str | None) -> None:  # fmt: skip
    """Train the configurations, then write the table and the plot."""
    letters = sorted(set(configs.lower()))
    bad = [c for c in letters if c not in ABLATION_CONFIGS]
    if bad or not letters:
        raise click.BadParameter(f"expected letters of {ABLATION_CONFIGS}, got {configs!r}", param_hint="--configs")
    s = dict(SETTINGS[setting], setting=setting, seed=seed)
    s.update({k: v for k, v in dict(duration=duration, time_limit=time_limit).items() if v is not None})
    rundir = rundir or outdir
    os.makedirs(rundir, exist_ok=True)
    train_all(rundir, letters, s, seed)
    results = analyze(outdir, rundir, s)
    click.echo(markdown_table(results))


@cli.command(name="analyze")
@click.option("--outdir", required=True, type=click.Path(file_okay=False), help="Experiment directory")
@click.option("--rundir", default=None, type=click.Path(exists=True, file_okay=False), help="Run folders [--outdir]")
def analyze_cmd(outdir: str, rundir: str | None) -> None:
    """The table and the plot again from finished runs."""
    click.echo(markdown_table(analyze(outdir, rundir)))


if __name__ == "__main__":
    cli()
