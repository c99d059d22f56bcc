"""Image generation from model files: per-seed sampling, decoding, PNG output and grids (docs/design.md §7).

    images = edm2.generate_batch(net, seeds=[0, 1, 2], gnet=gnet, guidance=1.7)   # uint8 [3, 3, H, W]
    summary = edm2.generate_images(net, seeds=range(64), outdir='out', grid_path='grid.png')

Sampling: any solver of edm2.solvers along any schedule of edm2.schedules (edm2.sampling.sampling_settings:
solver='heun', num_steps=32, schedule='karras', ...; Heun on the EDM schedule by default).
Reproducibility: image k's noise, class and the noise of a stochastic solver (churn, ancestral, SDE steps) come
from a generator seeded with k mod 2^32 on the
noise device (edm2.seeds; by default the compute device, as the official generate_images.py does).
With torchrun the seeds are cut into global batches of consecutive seeds (as few batches of at most
`batch_size` as hold them, sizes balanced as by the official generator on one GPU), independent of the
number of processes, and whole batches are dealt to ranks; so each image is computed in the same batch
whatever the number of GPUs, and the output is bit-identical across GPU counts (same device type). A
different batch size gives the same noise and classes; batched float kernels may then round differently
in the last bits (see tests/test_generate.py for how much that changes the PNGs).
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import tqdm

from accel import SpeedPlan, resolve_speed_plan
from torch_utils import distributed as dist
from torch_utils.state_io import atomic_write_bytes
from training.encoders import StandardRGBEncoder, encoder_from_config

from .guidance import GuidedDenoiser, SamplerStats
from .model_files import NetworkFile, load_network
from .sampling import SamplingSettings, sampling_settings
from .seeds import seed_noise_and_labels
from .solvers import seed_noise


VAE_DECODE_BATCH = 4  # latents per VAE decoder call when generating, as the official generate_images.py


@dataclasses.dataclass
class GenerationSummary:
    """What generate_images did, summed over all ranks."""

    num_images: int  # images generated (all ranks)
    seconds: float  # wall time of the sampling loop
    evals_per_image: float  # network evaluations per image (a guided evaluation costs two)
    world_size: int  # processes that shared the work

    @property
    def images_per_second(self) -> float:
        return self.num_images / max(self.seconds, 1e-9)

    def line(self) -> str:
        return (
            f"Generated {self.num_images} images in {self.seconds:.1f} s ({self.images_per_second:.2f} img/s, "
            f"{self.evals_per_image:g} network evaluations per image, {self.world_size} process"
            f"{'es' if self.world_size != 1 else ''})"
        )


def encoder_for(net: torch.nn.Module, encoder_settings: dict[str, Any] | None):
    """The encoder that turns this network's output into images (pixel networks need none in the file)."""
    if encoder_settings is not None:
        return encoder_from_config(encoder_settings)
    if getattr(net, "img_channels", None) == 3:
        return StandardRGBEncoder()
    raise ValueError(
        f"the model file names no encoder and the network has {getattr(net, 'img_channels', '?')} channels: "
        "only 3-channel pixel networks can be written as images without one"
    )


def generation_encoder(net: torch.nn.Module, encoder_settings: dict[str, Any] | None):
    """encoder_for, set up as the official generator sets it up: the VAE decodes VAE_DECODE_BATCH latents per call
    (the size of a call can change the rounding of every image in it)."""
    encoder = encoder_for(net, encoder_settings)
    if hasattr(encoder, "batch_size"):
        encoder.batch_size = VAE_DECODE_BATCH
    return encoder


def prepare_encoder(
    net: torch.nn.Module, encoder_settings: dict[str, Any] | None, vae: str | None, device: torch.device | str
) -> dict[str, Any] | None:
    """The encoder settings to sample with (--vae NAME|DIR replacing the model file's VAE), with the VAE loaded now,
    before any sampling, so that a missing VAE fails at once. Raises ValueError (--vae for a pixel network) or
    training.encoders.VAELoadError (a few lines: what was tried, how to get the VAE)."""
    if vae is not None:
        if not encoder_settings or encoder_settings.get("class") != "stability_vae":
            raise ValueError("--vae: this network's outputs are pixels; it needs no VAE")
        encoder_settings = dict(encoder_settings, vae_name=vae)
    encoder = encoder_for(net, encoder_settings)
    if hasattr(encoder, "vae"):
        encoder.vae(device)  # loaded once per process; generate_images' encoder reuses it
    return encoder_settings


def check_class_index(net: torch.nn.Module, class_idx: int | None) -> None:
    """ValueError unless class_idx is None or a valid class of the network."""
    if class_idx is None:
        return
    label_dim = getattr(net, "label_dim", 0)
    if label_dim == 0:
        raise ValueError(f"class {class_idx} given, but the network is unconditional (label_dim 0)")
    if not 0 <= class_idx < label_dim:
        raise ValueError(f"class {class_idx} is out of range: the network has {label_dim} classes (0..{label_dim - 1})")


def sampling_precision(net_precision: str, device: torch.device | str, requested: str | None = None) -> str:
    """The activation precision to sample with: `requested` if given, else the network's, except that fp16
    runs only on CUDA. That is the official rule (its Precond ignores use_fp16 off CUDA, and official pickles
    say use_fp16=True), so an official pickle on the CPU gives the official CPU images, and in fp32 time.
    'fp8' runs the network in bf16 apart from its FP8 convolutions (prepare_for_sampling's fp8): 'bf16'."""
    if requested == "fp8":
        return "bf16"
    if requested is not None:
        return requested
    if net_precision == "fp16" and torch.device(device).type != "cuda":
        return "fp32"
    return net_precision


SAMPLING_PRECISIONS = (None, "auto", "fp32", "fp16", "bf16", "fp8")


def load_for_sampling(
    path_or_url: str | os.PathLike, device: torch.device | str, precision: str | None = None
) -> NetworkFile:
    """load_network onto the device that samples, with the activation precision for that device: `precision`
    ('fp32', 'fp16', 'bf16'; 'fp8': bf16, the FP8 convolutions come with prepare_for_sampling(fp8=True)), or
    None / 'auto' for sampling_precision's choice (the file's, fp16 only on CUDA)."""
    if precision not in SAMPLING_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(map(str, SAMPLING_PRECISIONS))}, got {precision!r}")
    loaded = load_network(path_or_url, device=device)
    if hasattr(loaded.net, "precision"):
        requested = None if precision == "auto" else precision
        loaded.net.precision = sampling_precision(loaded.net.precision, device, requested)
    return loaded


def seed_batches(seeds: Sequence[int], batch_size: int) -> list[list[int]]:
    """Consecutive batches of seeds, the same for any number of processes: as few batches of at most batch_size as
    hold them all, their sizes balanced (the first ones one larger), as the official generator cuts them on one GPU
    (e.g. 40 seeds, batch 32: 20 + 20), so that each image is computed in a batch of the official size."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    seeds = list(seeds)
    count = max(math.ceil(len(seeds) / batch_size), 1)
    size, larger = divmod(len(seeds), count)
    bounds = [0]
    for k in range(count):
        bounds.append(bounds[-1] + size + (k < larger))
    return [seeds[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def process_batches(seeds: Sequence[int], batch_size: int) -> list[list[int]]:
    """This process's share of seed_batches(seeds, batch_size): every world_size-th global batch, so each image is
    computed in the same batch whatever the number of processes."""
    return dist.split_for_rank(seed_batches(seeds, batch_size))


def images_per_process(seeds: Sequence[int], batch_size: int) -> int:
    """How many of `seeds` this process samples (process_batches)."""
    return sum(len(b) for b in process_batches(seeds, batch_size))


# Below this many images per process, compiling for sampling costs more time than it saves, even with the
# compiler's cache warm (figures in docs/design.md §14).
COMPILE_MIN_IMAGES = 2048


def sampling_plan(
    device: torch.device | str,
    compile: bool | None = None,
    reference: bool = False,
    num_images: int | None = None,
    fp8: bool = False,
) -> SpeedPlan:
    """The speed plan that prepare_for_sampling applies (its arguments; ValueError for a bad combination)."""
    if reference and compile:
        raise ValueError("prepare_for_sampling: reference runs the network as the official code does, uncompiled; "
                         "drop compile")
    few = num_images is not None and num_images < COMPILE_MIN_IMAGES
    return resolve_speed_plan(
        device, compile=compile, kernels="reference" if reference else None, cudnn_benchmark=not reference,
        fp8="on" if fp8 else "off",
        not_worth_compiling=f"fewer than {COMPILE_MIN_IMAGES} images per process (--compile compiles)" if few else "",
    )


def prepare_for_sampling(
    net: torch.nn.Module,
    compile: bool | None = None,
    channels_last: bool | None = None,
    cuda_graphs: bool | None = None,
    freezing: bool | None = None,
    reference: bool = False,
    num_images: int | None = None,
    fp8: bool = False,
) -> torch.nn.Module:
    """The network set up for sampling by the speed layer (accel.resolve_speed_plan): eval mode, no parameter
    gradients, and on CUDA the fast kernels (fused attention, NHWC activations: `channels_last` None = on CUDA),
    cuDNN picking its fastest algorithms for the fixed shapes, and with `compile` torch.compile (a minute once,
    seconds when cached; the elementwise chains then run fused). `compile` None = on CUDA unless `num_images`, the
    images this process will sample, is below COMPILE_MIN_IMAGES. `cuda_graphs` (None = with `compile` on CUDA)
    replays each evaluation as one CUDA graph; `freezing` (None = with `compile` on CUDA) lets the compiler treat
    the weights as constants, so load other weights into this module afterwards and the compiled function keeps
    using the old ones (prepare again). The outputs are the plain network's within float rounding; the module's
    attributes stay readable. `reference`: kernels 'reference', the official code's operations in its order and
    layout (attention with explicit scores, NCHW, cuDNN's default algorithms; what the CPU always does), for its
    images per seed on CUDA as far as the kernels allow; slower, and not with `compile`. `fp8`: the 1x1 and 3x3
    convolutions as FP8 matrix products (accel/fp8.py; a CUDA GPU of compute capability 8.9 or newer, not with
    `reference`; ValueError otherwise), the rest of the network in its precision (bf16 for --precision fp8)."""
    plan = sampling_plan(next(net.parameters()).device, compile, reference, num_images, fp8)
    if channels_last is not None:
        plan = dataclasses.replace(plan, channels_last=bool(channels_last))
    plan.apply(net.eval().requires_grad_(False), weights_channels_last=False)
    return plan.compile_for_sampling(net, cuda_graphs, freezing)


def resolve_settings(settings: SamplingSettings | None, sampler_kwargs: dict[str, Any]) -> SamplingSettings:
    """`settings`, or sampling_settings(**sampler_kwargs) (ValueError naming the setting); not both."""
    if settings is None:
        return sampling_settings(**sampler_kwargs)
    if sampler_kwargs:
        raise ValueError(f"give settings or sampler keyword arguments ({', '.join(sampler_kwargs)}), not both")
    return settings


@torch.no_grad()
def generate_batch(
    net: torch.nn.Module,
    seeds: Sequence[int],
    gnet: torch.nn.Module | None = None,
    encoder: Any = None,
    class_idx: int | None = None,
    device: torch.device | str | None = None,
    stats: SamplerStats | None = None,
    noise_device: torch.device | str | None = None,
    settings: SamplingSettings | None = None,
    denoiser: GuidedDenoiser | None = None,
    **sampler_kwargs: Any,
) -> torch.Tensor:
    """uint8 images [len(seeds), 3, H, W] (on the CPU), one per seed. The sampler: `settings`, or sampler_kwargs
    for edm2.sampling.sampling_settings (solver, num_steps, schedule, guidance, solver options, dtype ...).
    The per-seed generators draw on noise_device ('cpu' or the compute device; None = the compute device).
    denoiser: the run's GuidedDenoiser.from_settings(net, None, gnet, settings), when the caller has built (and
    so checked) it once for many batches; None = built here."""
    settings = resolve_settings(settings, sampler_kwargs)
    if denoiser is None:
        denoiser = GuidedDenoiser.from_settings(net, None, gnet, settings)
    device = torch.device(device) if device is not None else next(net.parameters()).device
    encoder = encoder if encoder is not None else encoder_for(net, None)
    shape = [net.img_channels, net.img_resolution, net.img_resolution]
    label_dim = getattr(net, "label_dim", 0)
    noise, labels, gens = seed_noise_and_labels(seeds, shape, label_dim, class_idx, device, noise_device)
    den = denoiser.with_labels(labels, stats)
    # The official generator keeps the ODE state (and so draws the churn noise) in float32: settings.dtype.
    sigmas = settings.sigmas(noise.device)
    x = settings.run(den, noise.to(settings.dtype) * sigmas[0], sigmas, noise=seed_noise(gens))
    return encoder.decode(x.to(torch.float32)).cpu()


def image_path(outdir: str | os.PathLike, seed: int, subdirs: bool = False) -> pathlib.Path:
    """outdir/000123.png, or outdir/000000/000123.png with subdirs (1000 images per folder)."""
    outdir = pathlib.Path(outdir)
    if subdirs:
        outdir = outdir / f"{seed - seed % 1000:06d}"
    return outdir / f"{seed:06d}.png"


def save_png(path: str | os.PathLike, image: torch.Tensor | np.ndarray) -> None:
    """Write one uint8 image ([3, H, W] tensor or [H, W, 3] array) as PNG, atomically."""
    import PIL.Image

    if isinstance(image, torch.Tensor):
        image = image.permute(1, 2, 0).numpy()
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"save_png: expected a uint8 RGB image, got {image.dtype} {list(image.shape)}")
    buffer = io.BytesIO()
    PIL.Image.fromarray(image, "RGB").save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def make_grid(images: torch.Tensor | np.ndarray, columns: int | None = None) -> np.ndarray:
    """Tile uint8 images [N, 3, H, W] into one [rows*H, columns*W, 3] array (row-major; blanks are black)."""
    images = np.asarray(images)
    n, c, h, w = images.shape
    columns = columns or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / columns)
    grid = np.zeros([rows * h, columns * w, c], dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = image.transpose(1, 2, 0)
    return grid


def generate_images(
    net: torch.nn.Module,
    seeds: Sequence[int],
    gnet: torch.nn.Module | None = None,
    encoder_settings: dict[str, Any] | None = None,
    class_idx: int | None = None,
    batch_size: int = 32,
    outdir: str | os.PathLike | None = None,
    subdirs: bool = False,
    grid_path: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    noise_device: torch.device | str | None = None,
    settings: SamplingSettings | None = None,
    denoiser: GuidedDenoiser | None = None,
    **sampler_kwargs: Any,
) -> GenerationSummary:
    """Generate one image per seed, writing PNGs named by seed and/or one grid; works under torchrun.

    Each rank takes every world_size-th batch of `seed_batches(seeds, batch_size)`. The grid (rank 0
    writes it) holds the images in the order of `seeds`. The sampler: `settings` or sampler_kwargs, as for
    generate_batch, checked once before the first image; `denoiser` as for generate_batch.
    """
    if outdir is None and grid_path is None:
        raise ValueError("generate_images: nothing to write; give outdir and/or grid_path")
    settings = resolve_settings(settings, sampler_kwargs)
    if denoiser is None:  # the guidance and the networks, checked once
        denoiser = GuidedDenoiser.from_settings(net, None, gnet, settings)
    check_class_index(net, class_idx)
    encoder = generation_encoder(net, encoder_settings)
    device = torch.device(device) if device is not None else dist.device()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    my_batches = process_batches(seeds, batch_size)
    kept: dict[int, np.ndarray] = {}  # seed -> image, only for the grid
    stats = SamplerStats()
    start = time.perf_counter()
    bar = tqdm.tqdm(
        total=sum(len(b) for b in my_batches),
        unit="img",
        desc=f"rank 0 of {world_size}" if world_size > 1 else "generating",
        disable=not (progress and rank == 0),
    )
    with bar:
        for batch in my_batches:
            images = generate_batch(
                net, batch, gnet, encoder, class_idx, device, stats, noise_device, settings, denoiser
            )
            for seed, image in zip(batch, images):
                if outdir is not None:
                    save_png(image_path(outdir, seed, subdirs), image)
                if grid_path is not None:
                    kept[seed] = image.numpy()
            bar.update(len(batch))
    local_images = sum(len(b) for b in my_batches)
    num_images = int(dist.all_reduce_sum(local_images))
    evals = dist.all_reduce_sum(stats.total_evals * (local_images / max(len(my_batches), 1)))
    seconds = time.perf_counter() - start
    if grid_path is not None:
        gathered: dict[int, np.ndarray] = {}
        for part in dist.all_gather_objects(kept):
            gathered.update(part)
        if rank == 0:
            grid = make_grid(np.stack([gathered[s] for s in seeds]))
            save_png(grid_path, grid)
    dist.barrier()
    return GenerationSummary(
        num_images=num_images,
        seconds=seconds,
        evals_per_image=evals / max(num_images, 1),
        world_size=world_size,
    )
