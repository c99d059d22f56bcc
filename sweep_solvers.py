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

import click
import torch

from edm2.cli import (
    bad_option, check_speed_options, guidance_interval_option, load_option, out_of_memory_names, seeds_option,
    speed_click_options,
)
from edm2.detectors import DetectorWeightsError
from edm2.generation import prepare_for_sampling
from edm2.guidance import check_guide_fits
from edm2.sampling import SamplingOptionError, sampling_settings
from edm2.solver_sweep import PROXY, fd_score, image_distance_score, plan_sweep, run_sweep, write_sweep
from edm2.solvers import SOLVERS
from torch_utils import distributed as dist

_CLI = {"solver": "--solvers", "num_steps": "--steps"}  # where this tool's option names differ from edm2.cli's


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
    seeds = seeds_option(ctx, param, value)
    if len(seeds) < 2:
        raise click.BadParameter(f"need at least 2 seeds, got {value!r}", ctx=ctx, param=param)
    return seeds


@click.command(context_settings={"show_default": True, "max_content_width": 120})
@click.option("--net", "net_path", metavar="PATH|URL", required=True, help="The model file")
@click.option("--gnet", "gnet_path", metavar="PATH|URL", help="Guiding network (with --guidance other than 1)")
@click.option("--guidance", type=float, default=1.0, help="Guidance weight")
@click.option("--guidance-interval", metavar="LO,HI", default=None, callback=guidance_interval_option,
              help="Guide only for sigma in (LO, HI]")
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
@speed_click_options
def main(net_path, gnet_path, guidance, guidance_interval, solvers, steps, baseline_steps, schedule, eta, metric,
         reference_steps, ref_path, seeds, class_idx, batch_size, outdir, inception_weights, dinov2_weights,
         kernels, compile_net):
    """Sweep solvers and step counts on one model; write the table and the plot of score against evaluations."""
    if metric != PROXY and ref_path is None:
        raise click.BadParameter(f"--metric {metric} needs reference statistics", param_hint="'--ref'")
    if metric == PROXY and ref_path is not None:  # it would be ignored: the user meant fid or fd_dinov2
        raise click.BadParameter(f"--metric {PROXY} uses no reference statistics; give --metric fid or fd_dinov2",
                                 param_hint="'--ref'")
    settings_kwargs = dict(schedule=schedule, guidance=guidance, guidance_interval=guidance_interval)
    if eta is not None:
        settings_kwargs["eta"] = eta
    try:  # every point's settings, checked once, before any network is loaded
        plan = plan_sweep(solvers, steps, baseline_steps, **settings_kwargs)
        target = sampling_settings("heun", reference_steps, schedule=schedule, guidance=guidance,
                                   guidance_interval=guidance_interval)
    except SamplingOptionError as e:
        raise bad_option(e.option, str(e), _CLI) from None
    if plan.baseline.needs_guide and gnet_path is None:
        raise bad_option("guidance", f"guidance {guidance} needs a guiding network: give --gnet")
    check_speed_options(kernels, compile_net)

    device = dist.device() if torch.cuda.is_available() else torch.device("cpu")
    loaded = load_option("--net", net_path, device)
    net = loaded.net
    gnet = None
    if plan.baseline.needs_guide:
        gnet = load_option("--gnet", gnet_path, device).net
        try:
            check_guide_fits(net, gnet, guidance)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="'--gnet'") from None
    # every point samples all seeds, and so does the baseline (and the proxy metric's target)
    speed = dict(compile=compile_net, reference=kernels == "reference", num_images=len(seeds) * (len(plan.points) + 2))
    net = prepare_for_sampling(net, **speed)
    gnet = prepare_for_sampling(gnet, **speed) if gnet is not None else None
    common = dict(gnet=gnet, class_idx=class_idx, batch_size=batch_size, encoder_settings=loaded.encoder)
    try:
        if metric == PROXY:
            note = (f"mean RMS distance (0-255) to heun with {reference_steps} steps on the same {len(seeds)} seeds; "
                    "stochastic solvers (eta > 0, churn) end on other samples, so it ranks only deterministic ones")
            score = image_distance_score(net, seeds, target, **common)
        else:
            note = f"{len(seeds)} images against {ref_path}"
            score = fd_score(net, seeds, ref_path, metric, device=device,
                             weights={"fid": inception_weights, "fd_dinov2": dinov2_weights}, **common)
        with out_of_memory_names("--batch", "images per batch; each image comes from its own seed, whatever the batch"):
            sweep = run_sweep(score, plan, metric, note, progress=click.echo)
    except (ValueError, DetectorWeightsError) as e:  # class, encoder, reference, detector: the message names them
        raise click.ClickException(str(e)) from None
    paths = write_sweep(sweep, outdir)
    click.echo(sweep.markdown())
    click.echo("Written: " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
