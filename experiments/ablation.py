"""The EDM2 paper's ablation ladder at small scale: train configurations A-G (presets ablation-{a..g}-demo, the demo
data) side by side, then compare the loss and the drift of activation and weight magnitudes (docs/design.md §13).

    python experiments/ablation.py run --outdir runs/ablation --setting cpu            # CPU, one run at a time
    python experiments/ablation.py run --outdir out/ablation --rundir /tmp/abl --setting gpu   # one GPU, 7 at once
    python experiments/ablation.py analyze --outdir runs/ablation                      # the figures again
    python experiments/ablation.py analyze --outdir runs/ablation --metric fid         # and FID of the best EMAs

Every run is a plain `train_edm2.py --preset ablation-X-demo` training (same seed, data and batch) whose status lines
carry the per-stage magnitudes of training/instruments.py. Runs past --time-limit are stopped with SIGTERM (they
checkpoint and stop cleanly); the comparison then uses the image range that every run reached. Outputs in --outdir:
ablation.json (settings and figures), ablation.md (the table), ablation.png (loss and magnitudes).

The loss: A trains with the EDM loss weighting (no learned u(sigma)), so its loss is on another scale than B-G's
(which can go negative); A is compared with the rest through its magnitudes, and the losses from B on.

The EMA: runs that finish write their EMA snapshots at the end: A-B the traditional EMA (its half-life scaled to
the run's duration as the presets scale it, docs/design.md §13), C-G the power-function EMAs. Each snapshot is scored
by the EDM-weighted loss (no u(sigma): one scale for all seven) on held-out demo images with fixed sigma and noise.

With --metric fid / fd_dinov2 (edm2.metrics, docs/design.md §8), each configuration's best EMA snapshot by that loss
also gets FID / FD_DINOv2: one image per --seed from generate.py's default sampler (Heun, 32 steps), never written,
against --ref, by default the statistics of all of the runs' training images (RUNDIR/demo-data.zip), made once and
kept as OUTDIR/ref.npz for the next analysis. The detectors are loaded once for the seven.
"""

from __future__ import annotations

import glob
import json
import math
import os
import signal
import subprocess
import sys
import time
from typing import Any, NamedTuple

import click
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from edm2.presets import ABLATION_CONFIGS, EDM_EMA_HALFLIFE_FRACTION, Ki, get_preset, preset_training_kwargs
from edm2.seeds import format_seeds, parse_seeds
from training.instruments import read_stats
from training.plot_stats import magnitude_series, save_figure
from torch_utils import distributed as dist
from torch_utils.state_io import atomic_write_bytes, write_json

# Images per run and per step, images between status lines, runs at once, demo images, seconds per run, and the
# activation dtype: bf16 on the GPU, since A-F have no activation clipping and A-D's magnitudes grow (fp16's range).
# With --metric: the seeds of the images per score (few on the CPU, where the detectors are slow) and their batch.
SETTINGS: dict[str, dict[str, Any]] = {
    "cpu": dict(duration=4 * Ki, batch=32, status=256, parallel=1, num_images=512, time_limit=600, precision="fp32",
                metric_seeds="0-255", metric_batch=32),  # fmt: skip
    "gpu": dict(
        duration=640 * Ki, batch=256, status=16 * 256, parallel=7, num_images=2000, time_limit=480, precision="bf16",
        metric_seeds="0-1999", metric_batch=256,
    ),
}
METRIC_LABELS = {"fid": "FID", "fd_dinov2": "FD_DINOv2"}


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

    rundir = os.path.abspath(rundir)  # the runs start in the repository (cwd=ROOT), not where we were started
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


class MetricPlan(NamedTuple):  # not a dataclass, which needs its module in sys.modules (the tests load the file)
    """What --metric asks for, checked and loaded before any training or sampling."""

    metrics: list[str]  # 'fid', 'fd_dinov2'
    seeds: list[int]  # one generated image per seed and configuration
    batch: int  # images per sampler call and detector call
    detectors: dict[str, torch.nn.Module]  # loaded once for the seven configurations
    ref: str | None  # --ref; None: the runs' training data, kept as OUTDIR/ref.npz
    reference: dict[str, Any] | None  # --ref's statistics, loaded
    device: torch.device
    progress: bool = True


def prepare_metrics(metrics: list[str], ref: str | None, seeds: str, batch: int,
                    weights: dict[str, str | None] | None = None, device: torch.device | str | None = None,
                    progress: bool = True) -> MetricPlan:  # fmt: skip
    """Parse the seeds, load --ref and the detectors; each problem as one line naming the option or file."""
    from edm2 import metrics as M
    from edm2.detectors import DetectorWeightsError

    try:
        seed_list = parse_seeds(seeds)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--seeds") from None
    if len(seed_list) < 2:
        raise click.BadParameter(f"need at least 2 seeds for a covariance, got {seeds!r}", param_hint="--seeds")
    reference = None
    if ref is not None:
        try:
            reference = M.load_reference(ref)
        except (OSError, ValueError) as error:  # MetricsError names the file
            raise click.BadParameter(str(error), param_hint="--ref") from None
        missing = [m for m in metrics if m not in reference]
        if missing:
            raise click.BadParameter(f"{ref} holds statistics for {', '.join(reference) or 'nothing'}, not for "
                                     f"{', '.join(missing)}", param_hint="--ref")  # fmt: skip
    device = torch.device(device) if device is not None else dist.device()
    try:
        detectors = M.load_detectors(metrics, weights, device, progress)
    except DetectorWeightsError as error:  # names the option, the file and where to get it
        raise click.ClickException(str(error)) from None
    return MetricPlan(metrics, seed_list, batch, detectors, ref, reference, device, progress)


def reference_meta(path: str) -> dict[str, Any]:
    """The metadata of a reference .npz of edm2.metrics.save_reference (its source and counts)."""
    with np.load(path, allow_pickle=False) as data:
        return json.loads(bytes(data["meta_json"]))


def default_reference(outdir: str, rundir: str, plan: MetricPlan) -> dict[str, Any]:
    """The statistics of all of the runs' training images, from OUTDIR/ref.npz where it holds them for these
    detectors and this data, else computed (only the metrics it lacks) and saved there."""
    from edm2 import metrics as M

    data = os.path.join(rundir, "demo-data.zip")
    if not os.path.isfile(data):
        raise click.ClickException(f"{data}: no training data to make reference statistics from; give --ref "
                                   "(calculate_metrics.py ref)")  # fmt: skip
    path, source = os.path.join(outdir, "ref.npz"), os.path.abspath(data)
    count = len(M.open_image_dataset(data))
    saved: dict[str, Any] = {}
    if os.path.isfile(path):
        try:
            if reference_meta(path).get("source") == source:
                saved = M.load_reference(path)
        except (OSError, ValueError, KeyError):  # unreadable or another tool's file: made again
            saved = {}

    def same_detector(stats: Any, metric: str) -> bool:  # the description as it reads back from JSON
        return stats.detector == json.loads(json.dumps(plan.detectors[metric].description))

    kept = {m: saved[m] for m in plan.metrics if m in saved and saved[m].num_images == count
            and same_detector(saved[m], m)}  # fmt: skip
    missing = [m for m in plan.metrics if m not in kept]
    if missing:
        made = M.dataset_statistics(data, missing, batch_size=plan.batch, detectors=plan.detectors,
                                    device=plan.device, workers=0, progress=plan.progress)  # fmt: skip
        M.save_reference(path, {**saved, **kept, **made}, source=source)
        kept.update(made)
    return kept


def metric_figures(outdir: str, rundir: str, ema: dict[str, dict[str, Any]], plan: MetricPlan) -> dict[str, Any]:
    """FID / FD_DINOv2 of each configuration's best EMA snapshot (by the held-out loss), written into its `best`
    entry; returns the settings of the scores."""
    from edm2 import metrics as M
    from edm2.generation import load_for_sampling, prepare_for_sampling

    if not ema:
        raise click.ClickException(f"--metric {','.join(plan.metrics)}: no run in {rundir} wrote an EMA snapshot "
                                   "(runs stopped by the time limit write none), so there is nothing to score")
    reference = plan.reference if plan.reference is not None else default_reference(outdir, rundir, plan)
    source = plan.ref if plan.ref is not None else os.path.join(outdir, "ref.npz")
    try:
        for letter, figures in ema.items():
            best = figures["best"]
            loaded = load_for_sampling(os.path.join(rundir, letter, best["file"]), plan.device)
            net = prepare_for_sampling(loaded.net, num_images=len(plan.seeds))
            # generate.py's default sampler; one set of images for all the metrics
            stats = M.model_statistics(net, plan.seeds, plan.metrics, batch_size=plan.batch,
                                       encoder_settings=loaded.encoder, detectors=plan.detectors, device=plan.device,
                                       progress=plan.progress)  # fmt: skip
            best.update(M.compare_to_reference(stats, reference, source))
    except ValueError as error:  # MetricsError, ModelFileError: they name the file
        raise click.ClickException(str(error)) from None
    return dict(metrics=plan.metrics, reference=source, seeds=format_seeds(plan.seeds), num_images=len(plan.seeds),
                sampler="heun, 32 steps (generate.py's default)",
                detectors={m: plan.detectors[m].description for m in plan.metrics})  # fmt: skip


def read_runs(rundir: str) -> dict[str, list[dict[str, Any]]]:
    """Per configuration letter, the status lines with a loss of its run folder; an error if there is none."""
    runs = {}
    for letter in ABLATION_CONFIGS:
        if os.path.isfile(os.path.join(rundir, letter, "stats.jsonl")):
            try:
                entries = [e for e in read_stats(os.path.join(rundir, letter)) if "loss" in e]
            except ValueError as e:  # a line that is no status entry
                raise click.ClickException(str(e)) from None
            if entries:
                runs[letter] = entries
    if not runs:
        raise click.ClickException(f"{rundir}: no run folder with a stats.jsonl (a..g)")
    return runs


def analyze(outdir: str, rundir: str | None = None, settings: dict[str, Any] | None = None,
            plan: MetricPlan | None = None) -> dict[str, Any]:  # fmt: skip
    """Figures per configuration from the runs in rundir (default: outdir), cut to the common image range, and with
    a MetricPlan FID / FD_DINOv2 of the best EMA snapshots; writes ablation.json / .md / .png to outdir."""
    rundir = rundir or outdir
    runs = read_runs(rundir)
    common = min(e[-1]["nimg"] for e in runs.values())
    cut = {k: [e for e in v if e["nimg"] <= common] for k, v in runs.items()}
    results = dict(settings=settings, common_images=common, configs={k: run_figures(v) for k, v in cut.items()})
    results["ema"] = ema_figures(rundir, list(runs))
    os.makedirs(outdir, exist_ok=True)
    try:
        if plan is not None:
            results["metrics"] = metric_figures(outdir, rundir, results["ema"], plan)
    finally:  # without the scores (an error above) the rest of the analysis is written all the same
        write_json(os.path.join(outdir, "ablation.json"), results)
        atomic_write_bytes(os.path.join(outdir, "ablation.md"), markdown_table(results).encode())
        plot(os.path.join(outdir, "ablation.png"), cut)
    return results


def markdown_table(results: dict[str, Any]) -> str:
    lines = [
        f"Compared over the first {results['common_images']} images that every run reached; the EMA columns: each "
        "run's final EMA snapshot with the lowest held-out loss in EDM weighting (runs stopped early wrote none); "
        "— in a magnitude column: the run's status lines carry no magnitudes (trained without --instruments).",
    ]
    scored = results.get("metrics")
    metrics = scored["metrics"] if scored else []
    if scored:
        lines[-1] += (f" {' and '.join(METRIC_LABELS[m] for m in metrics)} of that snapshot: {scored['num_images']} "
                      f"images (seeds {scored['seeds']}, {scored['sampler']}) against {scored['reference']}.")
    lines += [
        "",
        "| config | final loss | activation drift (last / first) | weight drift (last / first) "
        "| final activation RMS | EMA (images) | EMA loss (EDM weighting, held out) |"
        + "".join(f" {METRIC_LABELS[m]} |" for m in metrics),
        "| --- | --- | --- | --- | --- | --- | --- |" + " --- |" * len(metrics),
    ]
    emas = results.get("ema") or {}
    for letter, f in results["configs"].items():
        loss = f"{f['final_loss']:.4f}" + (" (EDM weighting)" if letter == "a" else "")
        best = emas.get(letter, {}).get("best")
        ema = f"{best['ema']} ({best['images']}) | {best['loss']:.4f}" if best else "— | —"
        ema += "".join(f" | {best[m]:.2f}" if best and m in best else " | —" for m in metrics)
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


def metric_options(f):
    """--metric and its settings, on run and analyze."""
    options = [
        click.option("--metric", "metrics", multiple=True, metavar="LIST", help="Also score the best EMA "
                     "snapshots: fid, fd_dinov2 (repeat or comma-separate)  [default: none]"),
        click.option("--ref", "ref", metavar="PATH|URL", help="Reference statistics (calculate_metrics.py ref)  "
                     "[default: of RUNDIR/demo-data.zip, all images, kept as OUTDIR/ref.npz]"),
        click.option("--seeds", metavar="LIST", help="One generated image per seed and configuration  [default: "
                     f"the setting's: {', '.join(k + ' ' + v['metric_seeds'] for k, v in SETTINGS.items())}]"),
        click.option("--inception-weights", metavar="PATH|URL",
                     help="FID Inception weights  [default: $EDM2_INCEPTION_WEIGHTS, else download]"),
        click.option("--dinov2-weights", metavar="PATH|URL",
                     help="DINOv2 ViT-L/14 weights  [default: $EDM2_DINOV2_WEIGHTS, else download]"),
    ]  # fmt: skip
    for option in reversed(options):
        f = option(f)
    return f


def metric_plan(setting: str, metrics: tuple[str, ...], ref: str | None, seeds: str | None,
                inception_weights: str | None, dinov2_weights: str | None) -> MetricPlan | None:  # fmt: skip
    """The MetricPlan of the options (None without --metric); the others alone are an error."""
    from edm2.detectors import METRICS

    names = [m.strip() for m in ",".join(metrics).split(",") if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or (metrics and not names):
        raise click.BadParameter(f"expected {' or '.join(METRICS)} (repeat or comma-separate), got "
                                 f"{','.join(metrics)!r}", param_hint="--metric")  # fmt: skip
    if not names:
        given = [o for o, v in (("--ref", ref), ("--seeds", seeds), ("--inception-weights", inception_weights),
                                ("--dinov2-weights", dinov2_weights)) if v is not None]  # fmt: skip
        if given:
            raise click.BadParameter("given without --metric, to whose scores it applies", param_hint=given[0])
        return None
    s = SETTINGS[setting]
    return prepare_metrics(list(dict.fromkeys(names)), ref, seeds or s["metric_seeds"], s["metric_batch"],
                           {"fid": inception_weights, "fd_dinov2": dinov2_weights})  # fmt: skip


@cli.command()
@click.option("--outdir", required=True, type=click.Path(file_okay=False),
              help="Experiment directory (table, figures; run folders a..g)")
@click.option("--setting", type=click.Choice(list(SETTINGS)), default="cpu", show_default=True, help="Budget")
@click.option("--configs", default=ABLATION_CONFIGS, show_default=True, help="Letters of the configurations to run")
@click.option("--duration", type=click.IntRange(min=1), default=None, help="Images per run [default: the setting's]")
@click.option("--time-limit", type=click.IntRange(min=1), default=None, help="Seconds per run [the setting's]")
@click.option("--seed", type=int, default=0, show_default=True, help="Training seed (the same for every run)")
@click.option("--rundir", default=None, type=click.Path(file_okay=False),
              help="Folder of the run folders and data [default: --outdir]")
@metric_options
def run(outdir: str, setting: str, configs: str, duration: int | None, time_limit: int | None, seed: int,
        rundir: str | None, **metric_kwargs: Any) -> None:  # fmt: skip
    """Train the configurations, then write the table and the plot."""
    letters = sorted(set(configs.lower()))
    bad = [c for c in letters if c not in ABLATION_CONFIGS]
    if bad or not letters:
        raise click.BadParameter(f"expected letters of {ABLATION_CONFIGS}, got {configs!r}", param_hint="--configs")
    plan = metric_plan(setting, **metric_kwargs)  # its errors before hours of training, not after
    s = dict(SETTINGS[setting], setting=setting, seed=seed)
    s.update({k: v for k, v in dict(duration=duration, time_limit=time_limit).items() if v is not None})
    rundir = rundir or outdir
    os.makedirs(rundir, exist_ok=True)
    train_all(rundir, letters, s, seed)
    results = analyze(outdir, rundir, s, plan)
    click.echo(markdown_table(results))


@cli.command(name="analyze")
@click.option("--outdir", required=True, type=click.Path(file_okay=False), help="Experiment directory")
@click.option("--rundir", default=None, type=click.Path(exists=True, file_okay=False), help="Run folders [--outdir]")
@metric_options
def analyze_cmd(outdir: str, rundir: str | None, **metric_kwargs: Any) -> None:
    """The table and the plot again from finished runs."""
    read_runs(rundir or outdir)  # no runs: said before the detectors are loaded (or downloaded)
    settings = previous_settings(outdir)
    plan = metric_plan((settings or {}).get("setting", "cpu"), **metric_kwargs)
    click.echo(markdown_table(analyze(outdir, rundir, settings, plan)))


def previous_settings(outdir: str) -> dict[str, Any] | None:
    """The settings that `run` wrote to OUTDIR/ablation.json (kept by a later analysis; the seeds' default)."""
    try:
        with open(os.path.join(outdir, "ablation.json")) as f:
            settings = json.load(f).get("settings")
    except (OSError, ValueError, AttributeError):
        return None
    return settings if isinstance(settings, dict) and settings.get("setting") in SETTINGS else None


if __name__ == "__main__":
    cli()
