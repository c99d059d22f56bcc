"""NFE sweep: score several solvers at several step counts on one model and plot the score against the network
evaluations per image (edm2.solver_sweep).

    # the demo model on the CPU: no reference statistics needed (distance to a 128-step Heun run)
    python sweep_solvers.py --net runs/demo/network-snapshot-0000032-0.050.safetensors --seeds 0-63 --outdir sweep

    # a real model: FID against reference statistics (calculate_metrics.py ref), 10k images per point
    python sweep_solvers.py --net model.safetensors --metric fid --ref img512.npz --seeds 0-9999 --outdir sweep

Writes solver_sweep.json, solver_sweep.md (the table, and per solver the fewest steps that reach Heun-32's
score) and solver_sweep.png in --outdir. One process; no image is written.
"""

from __future__ import annotations

import math

import click

from edm2.detectors import DetectorWeightsError
from edm2.guidance import check_guidance_interval, check_guiding_network
from edm2.sampling import SamplingOptionError, sampling_settings
from edm2.seeds import parse_seeds
from edm2.solver_sweep import PROXY, fd_score, image_distance_score, sweep_solvers, write_sweep
from edm2.solvers import SOLVERS

_CLI = {"solver": "--solvers", "num_steps": "--steps", "eta": "--eta", "schedule": "--schedule",
        "guidance_interval": "--guidance-interval", "guidance": "--guidance"}


def _int_list(ctx, param, value: str) -> list[int]:
    try:
        items = [int(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}", ctx=ctx, param=param) from None
    if any(v < 1 for v in items):
        raise click.BadParameter(f"step counts must be at least 1, got {value!r}", ctx=ctx, param=param)
    return sorted(set(items))


def _solver_list(ctx, param, value: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in SOLVERS]
    if not items or unknown:
        raise click.BadParameter(f"expected solvers from {', '.join(SOLVERS)}, got {value!r}", ctx=ctx, param=param)
    return list(dict.fromkeys(items))


def _seeds(ctx, param, value: str) -> list[int]:
    try:
        seeds = parse_seeds(value)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from None
    if len(seeds) < 2:
        raise click.BadParameter(f"need at least 2 seeds, got {value!r}", ctx=ctx, param=param)
    return seeds


def _load(option: str, path: str, device):
    from edm2.model_files import load_network

    try:
        return load_network(path, device=device)
    except (OSError, ValueError, RuntimeError) as e:
        raise click.BadParameter(f"cannot load {path!r}: {e}", param_hint=f"'{option}'") from None


@click.command(context_settings={"show_default": True, "max_content_width": 120})
@click.option("--net", "net_path", metavar="PATH|URL", required=True, help="The model file")
@click.option("--gnet", "gnet_path", metavar="PATH|URL", help="Guiding network (with --guidance other than 1)")
@click.option("--guidance", type=float, default=1.0, help="Guidance weight")
@click.option("--guidance-interval", metavar="LO,HI", default=None, help="Guide only for sigma in (LO, HI]")
@click.option("--solvers", default=",".join(s for s in SOLVERS if s != "heun") + ",heun", callback=_solver_list,
              help="Comma-separated solvers to sweep")
@click.option("--steps", "steps", default="4,6,8,12,16,24,32", callback=_int_list, help="Step counts to sweep")
@click.option("--baseline-steps", type=click.IntRange(min=1), default=32, help="Heun steps whose score is matched")
@click.option("--schedule", type=click.Choice(["karras", "log_linear"]), default="karras", help="Noise schedule")
@click.option("--eta", type=float, default=None, help="Noise amount of the ancestral / SDE solvers  [default: 1]")
@click.option("--metric", type=click.Choice([PROXY, "fid", "fd_dinov2"]), default=PROXY,
              help=f"{PROXY}: mean RMS distance (0-255) to a --reference-steps Heun run, no download; fid / "
              "fd_dinov2: against --ref (detector weights needed)")
@click.option("--reference-steps", type=click.IntRange(min=2), default=128, help=f"{PROXY}: Heun steps of the target")
@click.option("--ref", "ref_path", metavar="PATH|URL", help="fid / fd_dinov2: reference statistics")
@click.option("--seeds", default="0-63", callback=_seeds, help="One image per seed for every point")
@click.option("--class", "class_idx", type=int, default=None, help="Class of every image  [default: random per seed]")
@click.option("--batch", "batch_size", type=click.IntRange(min=1), default=32, help="Images per batch")
@click.option("--outdir", type=click.Path(file_okay=False), required=True, help="Where the table and plot go")
@click.option("--inception-weights", metavar="PATH|URL", default=None, help="fid: Inception weights")
@click.option("--dinov2-weights", metavar="PATH|URL", default=None, help="fd_dinov2: DINOv2 weights")
def main(net_path, gnet_path, guidance, guidance_interval, solvers, steps, baseline_steps, schedule, eta, metric,
         reference_steps, ref_path, seeds, class_idx, batch_size, outdir, inception_weights, dinov2_weights):
    """Sweep solvers and step counts on one model; write the table and the plot of score against evaluations."""
    import torch

    from torch_utils import distributed as dist

    if not math.isfinite(guidance) or (guidance != 1 and gnet_path is None):
        raise click.BadParameter(f"guidance {guidance} needs a finite value and, unless 1, --gnet",
                                 param_hint="'--guidance'")
    if metric != PROXY and ref_path is None:
        raise click.BadParameter(f"--metric {metric} needs reference statistics", param_hint="'--ref'")
    try:
        interval = None if guidance_interval is None else check_guidance_interval(guidance_interval.split(","))
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--guidance-interval'") from None
    settings_kwargs = dict(schedule=schedule, guidance=guidance, guidance_interval=interval)
    if eta is not None:
        settings_kwargs["eta"] = eta
    try:  # every point's settings, before any network is loaded
        for solver in solvers:
            options = {"eta": eta} if eta is not None and "eta" in SOLVERS[solver].options else {}
            for n in steps:
                sampling_settings(solver, n, schedule=schedule, guidance=guidance, guidance_interval=interval,
                                  **options)
    except SamplingOptionError as e:
        raise click.BadParameter(str(e), param_hint=f"'{_CLI.get(e.option, e.option)}'") from None

    device = dist.device() if torch.cuda.is_available() else torch.device("cpu")
    loaded = _load("--net", net_path, device)
    net = loaded.net.eval().requires_grad_(False)
    gnet = None
    if gnet_path is not None and guidance != 1:
        gnet = _load("--gnet", gnet_path, device).net.eval().requires_grad_(False)
        try:
            check_guiding_network(net, gnet, guidance)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="'--gnet'") from None
    common = dict(gnet=gnet, class_idx=class_idx, batch_size=batch_size, encoder_settings=loaded.encoder)
    try:
        if metric == PROXY:
            target = sampling_settings("heun", reference_steps, schedule=schedule, guidance=guidance,
                                       guidance_interval=interval)
            note = (f"mean RMS distance (0-255) to heun with {reference_steps} steps on the same {len(seeds)} seeds; "
                    "stochastic solvers (eta > 0, churn) end on other samples, so it ranks only deterministic ones")
            score = image_distance_score(net, seeds, target, **common)
        else:
            note = f"{len(seeds)} images against {ref_path}"
            score = fd_score(net, seeds, ref_path, metric, device=device,
                             weights={"fid": inception_weights, "fd_dinov2": dinov2_weights}, **common)
        sweep = sweep_solvers(score, solvers, steps, baseline_steps, metric, note, progress=click.echo,
                              **settings_kwargs)
    except (ValueError, DetectorWeightsError) as e:  # class, encoder, reference, detector: the message names them
        raise click.ClickException(str(e)) from None
    paths = write_sweep(sweep, outdir)
    click.echo(sweep.markdown())
    click.echo("Written: " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
