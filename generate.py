"""Generate images with the EDM sampler, optionally guided (classifier-free guidance or autoguidance).

Examples:

    # 64 images of a trained model, one PNG per seed
    python generate.py --net runs/00000/network-snapshot-0008388608-0.100.safetensors --outdir out --seeds 0-63

    # an official preset (downloaded once into $EDM2_CACHE_DIR), autoguidance limited to an interval
    python generate.py --preset edm2-img512-s-autog-fid --outdir out --seeds 0-49999 --subdirs \\
        --guidance-interval 0.28,5.42

    # another solver: DPM-Solver++(2M) SDE in 16 evaluations on a log-linear schedule (python generate.py --help)
    python generate.py --net model.safetensors --outdir out --sampler dpmpp_2m_sde --steps 16 --schedule log_linear

    # several GPUs: the seeds are shared out; the images do not depend on the number of GPUs
    torchrun --standalone --nproc_per_node=8 generate.py --preset edm2-img512-xxl-guid-fid \
        --outdir out --seeds 0-49999 --subdirs
"""

from __future__ import annotations

import math

import click

from edm2.generation import (
    check_class_index, generate_images, prepare_encoder, prepare_for_sampling, sampling_precision,
)
from edm2.guidance import check_guidance_interval, check_guiding_network
from edm2.sampling import solver_click_options, settings_from_cli
from edm2.seeds import check_noise_device, parse_seeds
from torch_utils import distributed as dist


def _parse_seeds_option(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    try:
        return parse_seeds(value)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from None


def _parse_interval_option(ctx: click.Context, param: click.Parameter, value: str | None):
    if value is None:
        return None
    try:
        parts = [float(v) for v in value.split(",")]
        return check_guidance_interval(parts)
    except ValueError as e:
        raise click.BadParameter(
            f"expected SIGMA_LO,SIGMA_HI with 0 <= SIGMA_LO < SIGMA_HI (e.g. 0.28,5.42), got {value!r} ({e})",
            ctx=ctx,
            param=param,
        ) from None


def resolve_model_options(
    preset: str | None, net_path: str | None, gnet_path: str | None, guidance: float | None
) -> tuple[str, str | None, float]:
    """--preset fills in --net, --gnet and --guidance; explicit options win. Guidance defaults to 1."""
    if preset is not None:
        from edm2.official import resolve_official_preset

        try:
            settings = resolve_official_preset(preset)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="'--preset'") from None
        net_path, gnet_path = net_path or settings["net"], gnet_path or settings["gnet"]
        guidance = settings["guidance"] if guidance is None else guidance
    if net_path is None:
        raise click.UsageError("give the network: --net PATH|URL or --preset NAME")
    return net_path, gnet_path, 1.0 if guidance is None else guidance


def _load(option: str, path_or_url: str, device):
    """load_network with errors that name the option; rank 0 downloads first, the others then read the cache."""
    from edm2.model_files import load_network

    if not dist.is_main():
        dist.barrier()
    try:
        loaded = load_network(path_or_url, device=device)
    except (OSError, ValueError, RuntimeError) as e:
        raise click.BadParameter(f"cannot load {path_or_url!r}: {e}", param_hint=f"'{option}'") from None
    finally:
        if dist.is_main():
            dist.barrier()
    return loaded


@click.command(context_settings={"show_default": True, "max_content_width": 120})
@click.option(
    "--preset", metavar="NAME", help="Official model preset (sets --net, --gnet, --guidance; explicit options win)"
)
@click.option(
    "--net", "net_path", metavar="PATH|URL", help="Main network: model file or official .pkl, path or http(s) URL"
)
@click.option(
    "--gnet",
    "gnet_path",
    metavar="PATH|URL",
    help="Guiding network (unconditional, or smaller / less trained); used when --guidance is not 1",
)
@click.option(
    "--guidance", type=float, default=None, help="Guidance weight w in D_g + w (D - D_g)  [default: preset's, else 1]"
)
@click.option(
    "--guidance-interval", metavar="LO,HI", callback=_parse_interval_option, help="Guide only for sigma in (LO, HI]"
)
@click.option("--outdir", type=click.Path(file_okay=False), help="Where to write one PNG per seed (000123.png)")
@click.option("--subdirs", is_flag=True, help="Put 1000 images per sub-folder (000000/, 001000/, ...)")
@click.option("--grid", "grid_path", type=click.Path(dir_okay=False), help="Also write all images as one PNG grid")
@click.option(
    "--seeds", default="0-63", callback=_parse_seeds_option, help="Seeds, e.g. 0-63,100,200-299 (one image each)"
)
@click.option(
    "--class", "class_idx", type=int, default=None, help="Class index for every image  [default: random per seed]"
)
@click.option("--batch", "batch_size", type=click.IntRange(min=1), default=32, help="Images per batch and process")
@solver_click_options
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "bf16"]),
    default=None,
    help="Network activation precision  [default: the model file's; fp16 only on CUDA, as the official code]",
)
@click.option(
    "--noise-device",
    type=click.Choice(["cpu", "cuda"]),
    default=None,
    help="Where each seed's generator draws noise and class  [default: the compute device, as the official code]",
)
@click.option(
    "--kernels",
    type=click.Choice(["fast", "reference"]),
    default="fast",
    help="CUDA only: fast (fused attention, channels-last, cuDNN autotuning) or reference (the official code's "
    "operations in its order: its images per seed to the last level as far as the GPU allows; slower, no --compile). "
    "The CPU always computes in the reference order",
)
@click.option("--vae", metavar="NAME|DIR", default=None,
              help="Latent networks: the VAE decoder, a hub name or a local folder  [default: the model file's]")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar")
@click.option(
    "--compile/--no-compile", "compile_net", default=False,
    help="torch.compile the network(s): faster sampling after tens of seconds of compiling (GPU)",
)  # fmt: skip
def main(
    preset,
    net_path,
    gnet_path,
    guidance,
    guidance_interval,
    outdir,
    subdirs,
    grid_path,
    seeds,
    class_idx,
    batch_size,
    precision,
    noise_device,
    kernels,
    vae,
    progress,
    compile_net,
    **solver_params,
):
    """Generate one image per seed (the EDM Heun sampler by default; any of --sampler); works alone or under torchrun.

    Runs on CUDA when available (one GPU per process), else on the CPU. Latent networks decode with the VAE their
    model file names (float32)."""
    net_path, gnet_path, guidance = resolve_model_options(preset, net_path, gnet_path, guidance)
    if outdir is None and grid_path is None:
        raise click.UsageError("nothing to write: give --outdir and/or --grid")
    if not math.isfinite(guidance):
        raise click.BadParameter(f"must be finite, got {guidance}", param_hint="'--guidance'")
    if guidance != 1 and gnet_path is None:
        raise click.BadParameter(
            f"guidance {guidance} needs a guiding network: give --gnet (or use --guidance 1)", param_hint="'--guidance'"
        )
    ctx = click.get_current_context()
    settings = settings_from_cli(solver_params, guidance, guidance_interval,
                                 ctx.get_parameter_source("num_steps") != click.core.ParameterSource.DEFAULT)

    if kernels == "reference" and compile_net:
        raise click.BadParameter(
            "reference kernels run the network uncompiled; drop --compile", param_hint="'--kernels'"
        )

    dist.init()
    try:
        device = dist.device()
        if noise_device is not None:
            try:
                check_noise_device(noise_device, device)
            except ValueError as e:
                raise click.BadParameter(str(e), param_hint="'--noise-device'") from None
        loaded = _load("--net", net_path, device)
        net = loaded.net
        try:
            check_class_index(net, class_idx)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="'--class'") from None
        from training.encoders import VAELoadError

        try:
            encoder_settings = prepare_encoder(net, loaded.encoder, vae, device)
        except ValueError as e:
            raise click.BadParameter(f"{net_path}: {e}", param_hint="'--net'" if vae is None else "'--vae'") from None
        except VAELoadError as e:
            raise click.ClickException(str(e)) from None
        gnet = None
        if gnet_path is not None and guidance != 1:  # w = 1 never evaluates the guiding network
            gnet = _load("--gnet", gnet_path, device).net
            try:
                check_guiding_network(net, gnet, guidance)
            except ValueError as e:
                raise click.BadParameter(f"{gnet_path} does not fit {net_path}: {e}", param_hint="'--gnet'") from None
        for network in (net, gnet):
            if network is not None and hasattr(network, "precision"):
                network.precision = sampling_precision(network.precision, device, precision)
        reference = kernels == "reference"
        net = prepare_for_sampling(net, compile=compile_net, reference=reference)
        gnet = prepare_for_sampling(gnet, compile=compile_net, reference=reference) if gnet is not None else None
        summary = generate_images(
            net,
            seeds,
            gnet=gnet,
            encoder_settings=encoder_settings,
            class_idx=class_idx,
            batch_size=batch_size,
            outdir=outdir,
            subdirs=subdirs,
            grid_path=grid_path,
            device=device,
            progress=progress,
            noise_device=noise_device,
            settings=settings,
        )
        dist.print0(summary.line())
    finally:
        dist.shutdown()


if __name__ == "__main__":
    main()
