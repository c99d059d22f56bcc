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

import os

import click

from edm2.cli import (
    check_output_path, check_speed_options, load_option, make_output_dir, model_click_options, out_of_memory_names,
    prepare_option, resolve_model_options, sampling_settings_from_cli, seeds_option, solver_click_options,
    speed_click_options,
)
from edm2.generation import check_class_index, generate_images, prepare_encoder
from edm2.guidance import GuidedDenoiser
from edm2.seeds import check_noise_device
from torch_utils import distributed as dist
from training.encoders import VAELoadError


@click.command(context_settings={"show_default": True, "max_content_width": 120})
@model_click_options
@click.option("--outdir", type=click.Path(file_okay=False), help="Where to write one PNG per seed (000123.png)")
@click.option("--subdirs", is_flag=True, help="Put 1000 images per sub-folder (000000/, 001000/, ...)")
@click.option("--grid", "grid_path", type=click.Path(dir_okay=False), help="Also write all images as one PNG grid")
@click.option(
    "--seeds", default="0-63", callback=seeds_option, help="Seeds, e.g. 0-63,100,200-299 (one image each)"
)
@click.option(
    "--class", "class_idx", type=int, default=None, help="Class index for every image  [default: random per seed]"
)
@click.option("--batch", "batch_size", type=click.IntRange(min=1), default=32, help="Images per batch and process")
@solver_click_options
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "bf16", "fp8"]),
    default=None,
    help="Network activation precision; fp8: bf16 with the 1x1 and 3x3 convolutions as FP8 (e4m3) matrix "
    "products (GPUs of compute capability 8.9+: Ada, Hopper; experimental: slower than bf16 so far and less "
    "exact, see the README)  [default: the "
    "model file's; fp16 only on CUDA, as the official code]",
)
@click.option(
    "--noise-device",
    type=click.Choice(["cpu", "cuda"]),
    default=None,
    help="Where each seed's generator draws noise and class  [default: the compute device, as the official code]",
)
@speed_click_options
@click.option("--vae", metavar="NAME|DIR", default=None,
              help="Latent networks: the VAE decoder, a hub name or a local folder  [default: the model file's]")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar")
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
    settings = sampling_settings_from_cli(solver_params, guidance, guidance_interval, gnet_path)
    check_speed_options(kernels, compile_net, precision)
    outputs = {"--outdir": outdir and os.path.join(outdir, "000000.png"), "--grid": grid_path}
    outputs = {option: path for option, path in outputs.items() if path is not None}
    for option, path in outputs.items():
        check_output_path(option, path)

    dist.init()
    try:
        device = dist.device()  # the sampling precision follows it (load_option)
        if noise_device is not None:
            try:
                check_noise_device(noise_device, device)
            except ValueError as e:
                raise click.BadParameter(str(e), param_hint="'--noise-device'") from None
        loaded = load_option("--net", net_path, device, precision)
        net = loaded.net
        try:
            check_class_index(net, class_idx)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="'--class'") from None
        try:
            encoder_settings = prepare_encoder(net, loaded.encoder, vae, device)
        except ValueError as e:
            raise click.BadParameter(f"{net_path}: {e}", param_hint="'--net'" if vae is None else "'--vae'") from None
        except VAELoadError as e:
            raise click.ClickException(str(e)) from None
        # w = 1 never evaluates the guiding network
        gnet = load_option("--gnet", gnet_path, device, precision).net if settings.needs_guide else None
        net = prepare_option(net, kernels, compile_net, seeds, batch_size, precision, announce=True)
        gnet = prepare_option(gnet, kernels, compile_net, seeds, batch_size, precision) if gnet is not None else None
        try:  # the guidance of the settings with these networks, checked once for the whole run
            denoiser = GuidedDenoiser.from_settings(net, None, gnet, settings)
        except ValueError as e:
            raise click.BadParameter(f"{gnet_path} does not fit {net_path}: {e}", param_hint="'--gnet'") from None
        for option, path in outputs.items():  # made once everything passed, before the sampling
            make_output_dir(option, os.path.dirname(os.path.abspath(path)))
        with out_of_memory_names("--batch", f"{batch_size} images per batch and process; each image comes from "
                                 "its own seed, whatever the batch"):
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
                denoiser=denoiser,
            )
        dist.print0(summary.line())
    finally:
        dist.shutdown()


if __name__ == "__main__":
    main()
