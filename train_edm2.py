"""Train an EDM2 model: presets of the paper, the built-in demo, one or many GPUs (torchrun).

    python train_edm2.py --outdir runs/demo --data demo --preset demo
    torchrun --nproc_per_node=8 train_edm2.py --outdir runs/s --data latents.zip --preset edm2-img512-s

Rerunning the same command resumes from the newest checkpoint in --outdir.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from typing import TypeVar

import click

import edm2
from networks.skip_scaling import SKIP_SCALING_MODES
from torch_utils import distributed as dist
from torch_utils.state_io import atomic_write, non_utf8_path_problem
from training.config import TrainingConfig
from training.dataset import DatasetError, ImageFolderDataset
from training.encoders import STABILITY_VAE_DEFAULTS, VAE_PIXEL_RANGES
from training.training_loop import TrainingError, TrainingStopped, check_dataset_and_network, training_loop

DEMO_DATA = "demo-data.zip"  # --data demo: written into the run directory once the options are checked
SUFFIXES = {"": 1, "K": 2**10, "KI": 2**10, "M": 2**20, "MI": 2**20, "G": 2**30, "GI": 2**30}


def parse_nimg(value: str | int, option: str = "value") -> int:
    """'128Ki' -> 131072; '2048Mi' -> 2147483648; plain integers as they are. Suffixes are powers of two."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?)?\s*", str(value), flags=re.IGNORECASE)
    if not m:
        raise click.BadParameter(f"expected a count such as 4096, 128Ki, 8Mi or 2Gi, got {value!r}", param_hint=option)
    n = float(m.group(1)) * SUFFIXES[(m.group(2) or "").upper()]
    if n != int(n):
        raise click.BadParameter(f"{value!r} is not a whole number of images", param_hint=option)
    return int(n)


def parse_float_list(value: str, option: str) -> list[float]:
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}", param_hint=option) from None


T = TypeVar("T")


def parse_optional(value: str, option: str, parse: Callable[[str, str], T]) -> T | None:
    """'none', or what `parse` makes of the value (its error names the option)."""
    return None if value.strip().lower() == "none" else parse(value, option)


def parse_float(value: str, option: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter(f"expected a number or 'none', got {value!r}", param_hint=option) from None


def select_arch(net: dict, arch: str | None, preset: str | None) -> dict:
    """--arch: keep the preset's network, or swap in a U-ViT (the demo preset has one: uvit-demo)."""
    if arch is None or arch == net.get("arch", "edm2-unet"):
        return net
    if arch == "uvit" and preset is None:
        return dict(net, arch="uvit")
    if arch == "uvit" and preset == "demo":
        return edm2.presets.uvit_network_kwargs("uvit-demo", dropout=net.get("dropout", 0.0))
    raise click.BadParameter(
        f"no U-ViT configuration for --preset {preset}; use --preset demo, or no preset and --network-kwargs",
        param_hint="--arch",
    )


def set_skip_scaling(net: dict, mode: str | None, kappa: float | None) -> None:
    """--skip-scaling / --kappa (ScaleLong, networks/skip_scaling.py) into the network arguments."""
    if mode is not None:
        net["skip_scaling"] = mode
    if kappa is not None:
        net["kappa"] = kappa  # TrainingConfig.validate: for --skip-scaling cs only


def build_config(opts: dict) -> TrainingConfig:
    """The training configuration from the command-line options (parsed here, checked by TrainingConfig.validate)."""
    c = TrainingConfig()
    if opts["preset"] is not None:
        try:
            train = edm2.preset_training_kwargs(opts["preset"])
            c.network = edm2.preset_network_kwargs(opts["preset"])
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--preset") from None
        for key in ("duration", "batch", "status", "snapshot", "checkpoint"):
            setattr(c, key, train[key])
        c.loss = dataclasses.replace(c.loss, **train["loss"])
        c.lr = dataclasses.replace(c.lr, **train["lr"])
        c.force_weight_norm = train.get("force_weight_norm", True)  # off in the ablation ladder's A-D
        c.ema_halflife, c.ema_rampup = train.get("ema_halflife"), train.get("ema_rampup")  # A-B: traditional EMA
    net = c.network = select_arch(c.network, opts["arch"], opts["preset"])
    if opts["network_kwargs"]:
        try:
            extra = json.loads(opts["network_kwargs"])
            assert isinstance(extra, dict)
        except (json.JSONDecodeError, AssertionError):
            raise click.BadParameter(
                f"expected a JSON object, got {opts['network_kwargs']!r}", param_hint="--network-kwargs"
            ) from None
        net.update(extra)
    for opt, key in (("channels", "model_channels"), ("dropout", "dropout")):
        if opts[opt] is not None:
            net[key] = opts[opt]
    for opt, group, key in (
        ("P_mean", "loss", "P_mean"), ("P_std", "loss", "P_std"), ("lr", "lr", "ref_lr"), ("decay", "lr", "ref_batches")
    ):
        if opts[opt] is not None:
            setattr(getattr(c, group), key, opts[opt])
    for opt in ("duration", "batch", "status", "snapshot", "checkpoint"):
        if opts[opt] is not None:
            setattr(c, opt, parse_nimg(opts[opt], f"--{opt}"))
    set_skip_scaling(net, opts["skip_scaling"], opts["kappa"])
    if opts["rampup"] is not None:
        c.lr.rampup_img = parse_nimg(opts["rampup"], "--rampup")
    if opts["batch_gpu"] is not None:
        c.batch_gpu = parse_nimg(opts["batch_gpu"], "--batch-gpu")
    net["precision"] = opts["precision"]  # 'auto' is resolved for the device by the training loop
    c.ema_stds = parse_float_list(opts["ema_stds"], "--ema-stds")
    if opts["ema_halflife"] is not None:
        c.ema_halflife = parse_optional(opts["ema_halflife"], "--ema-halflife", parse_nimg)
        if c.ema_halflife is None:
            c.ema_rampup = None  # the power-function EMAs have no ramp-up
    if opts["ema_rampup"] is not None:
        c.ema_rampup = parse_optional(opts["ema_rampup"], "--ema-rampup", parse_float)
    ctx = click.get_current_context(silent=True)
    stds_given = ctx is not None and ctx.get_parameter_source("ema_stds") == click.core.ParameterSource.COMMANDLINE
    if stds_given and c.ema_halflife is not None:
        raise click.BadParameter(
            "the power-function EMA stds do not apply to a run with the traditional EMA (--ema-halflife, or the "
            "preset's); drop --ema-stds, or pass --ema-halflife none", param_hint="'--ema-stds'"
        )
    c.cond, c.xflip, c.seed, c.workers = opts["cond"], opts["xflip"], opts["seed"], opts["workers"]
    c.max_nonfinite_status = opts["max_nonfinite_status"]
    c.compile, c.kernels, c.grad_sync = opts["compile_net"], opts["kernels"], opts["grad_sync"]
    c.instruments, c.cudnn_benchmark = opts["instruments"], opts["cudnn_benchmark"]

    if not c.cond and "label_dim" in net:
        net["label_dim"] = 0  # --uncond whatever the preset's network (the demo's has 10 classes)
    data = opts["data"]
    c.data = os.path.abspath(os.path.join(opts["outdir"], DEMO_DATA) if data == "demo" else data)
    return c


def check_data_and_network(
    config: TrainingConfig, data_path: str, vae: str | None, vae_pixel_range: str = "0,1"
) -> TrainingConfig:
    """The dataset at data_path (the demo's may lie in a temp folder until this passes) and the network arguments
    checked without side effects (for the device this process trains on); the encoder settings of a latent dataset
    filled in. One-line errors."""
    config = copy.deepcopy(config)
    try:
        dataset = ImageFolderDataset(data_path, use_labels=config.cond)
        if dataset.is_latent:
            config.encoder = dict(
                STABILITY_VAE_DEFAULTS, vae_name=vae or STABILITY_VAE_DEFAULTS["vae_name"], pixel_range=vae_pixel_range
            )
            config.encoder["class"] = "stability_vae"
        check_dataset_and_network(dataclasses.replace(config.for_device(dist.device()), data=data_path))
    except DatasetError as e:
        raise click.BadParameter(str(e), param_hint="--data") from None
    except TrainingError as e:
        raise click.ClickException(str(e)) from None
    return config


def describe_default_recipe(config: TrainingConfig) -> str:
    """The start-up line of a run without --preset: the paper's full recipe is long, so say so."""
    n = config.duration
    size = f"{n // 2**30}Gi" if n % 2**30 == 0 else f"{n // 2**20}Mi" if n % 2**20 == 0 else str(n)
    return (
        f"No --preset: training the default recipe (edm2-img512-s's network width and learning rate, batch "
        f"{config.batch}) for {size} images; give --preset (e.g. demo) for a shorter run."
    )


@click.command(context_settings=dict(show_default=True, max_content_width=120))
@click.option("--outdir", required=True, help="Run directory (checkpoints, snapshots, logs); resumed if it exists")
@click.option("--data", required=True, help="Dataset folder or zip (.png pixels or .npy latents), or 'demo'")
@click.option("--cond", type=click.BOOL, default=None, is_flag=False, flag_value=True, metavar="BOOL",
              help="Class-conditional (labels from dataset.json); --cond=False as --uncond  [default: True]")
@click.option("--uncond", is_flag=True, help="Unconditional: labels ignored (also with a conditional preset)")
@click.option("--preset", default=None, help=f"Configuration preset: {', '.join(edm2.PRESETS)}")
@click.option("--duration", default=None, help="Training duration in images, e.g. 2048Mi")
@click.option("--batch", default=None, help="Total batch size in images")
@click.option("--batch-gpu", "batch_gpu", default=None,
              help="Images per GPU per round (gradient accumulation) [default: batch / GPUs]")
@click.option("--channels", type=click.IntRange(min=1), default=None, help="Base channel count (model_channels)")
@click.option("--network-kwargs", "network_kwargs", default=None,
              help='More network arguments as JSON, e.g. \'{"channel_mult": [1, 2], "num_blocks": 1}\'')
@click.option("--arch", type=click.Choice(["edm2-unet", "uvit"]), default=None,
              help="Backbone [default: the preset's, edm2-unet]")
@click.option("--skip-scaling", "skip_scaling", type=click.Choice(SKIP_SCALING_MODES), default=None,
              help="ScaleLong scaling of the long skips [default: none]")
@click.option("--kappa", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="CS: skip i (1 = outermost) is multiplied by kappa^(i-1) [default: 0.7]")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=None, help="Dropout probability")
@click.option("--P_mean", "--P-mean", "P_mean", type=float, default=None, help="Mean of ln(sigma) in training")
@click.option("--P_std", "--P-std", "P_std", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Std of ln(sigma) in training")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None, help="Reference learning rate")
@click.option("--decay", type=click.FloatRange(min=0), default=None,
              help="Learning-rate decay start t_ref, in batches (0 = none)")
@click.option("--rampup", default=None, help="Learning-rate ramp-up in images [default: 10000000, not 10Mi]")
@click.option("--ema-stds", "ema_stds", default="0.050,0.100",
              help="Power-function EMA stds to track and snapshot (not with the traditional EMA, --ema-halflife)")
@click.option("--ema-halflife", "ema_halflife", default=None,
              help="A traditional EMA (EDM) with this half-life in images instead of the power-function EMAs, e.g. "
              "40Mi; 'none' = the power-function EMAs [default: the preset's, none but for ablation-a/b]")
@click.option("--ema-rampup", "ema_rampup", default=None,
              help="Traditional EMA: half-life at most this fraction of the images seen, in [0, 1]; 'none' = no "
              "ramp-up [default: the preset's]")
@click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto",
              help="Forward precision (auto: fp16 on GPU, fp32 on CPU)")
@click.option("--fp16", type=click.BOOL, default=None, metavar="BOOL",
              help="The official tool's switch: True = --precision fp16, False = fp32")
@click.option("--xflip", is_flag=True, help="Augment with x-flips")
@click.option("--status", default=None,
              help="Images between status lines, 0 = at the end only [default: preset's, else 128Ki]")
@click.option("--snapshot", default=None,
              help="Images between EMA network snapshots, 0 = at the end only [default: preset's, else 8Mi]")
@click.option("--checkpoint", default=None,
              help="Images between training checkpoints, 0 = at the end and on signals only "
              "[default: preset's, else 128Mi]")
@click.option("--seed", type=int, default=0, help="Random seed")
@click.option("--workers", type=click.IntRange(min=0), default=2, help="DataLoader worker processes per GPU")
@click.option(
    "--vae-pixel-range", "vae_pixel_range", type=click.Choice(VAE_PIXEL_RANGES), default="0,1",
    help="Pixel range the VAE of a latent dataset was encoded with: 0,1 as the official code and this project's "
    "dataset_tool.py encode; -1,1 for latents encoded by this project before that (runs recorded then resume with it)",
)  # fmt: skip
@click.option("--vae", default=None,
              help="VAE for latent datasets: a hub name or a local directory [default: stabilityai/sd-vae-ft-mse]")
@click.option("--compile/--no-compile", "compile_net", default=None,
              help="torch.compile the network: about 1.5x the training speed on a GPU after minutes of compiling, "
              "seconds when a run on this machine compiled the same network before (accel.compile_cache_dir) "
              "[default: on with CUDA and --kernels fast]")
@click.option("--kernels", type=click.Choice(["fast", "reference"]), default=None,
              help="fast: Triton kernels for the optimizer step (Adam, forced weight normalization, EMAs) and "
              "dropout, channels-last activations and fused attention (same results, faster on CUDA); reference: "
              "plain PyTorch in the reference order [default: fast with CUDA, else reference]")
@click.option("--cudnn-benchmark/--no-cudnn-benchmark", "cudnn_benchmark", default=True,
              help="cuDNN's autotuner on CUDA: faster, but CUDA runs and their resumes repeat bit for bit only "
              "without it")
@click.option("--grad-sync", "grad_sync", type=click.Choice(["ddp", "flat"]), default=None,
              help="Several GPUs: average gradients with DDP or with chunked all-reduces of one flat buffer that "
              "overlap the optimizer step (flat) [default: flat when compiled, else ddp]")
@click.option("--instruments/--no-instruments", default=None,
              help="Per-skip and per-stage feature/gradient figures on status steps "
              "[default: on unless compiled, as they run eagerly]")
@click.option("--max-nonfinite-status", "max_nonfinite_status", type=click.IntRange(min=1), default=3,
              help="Stop (non-zero, nothing saved) when the loss stays nan/inf for this many status intervals in a row")
@click.option("-n", "--dry-run", "dry_run", is_flag=True,
              help="Check everything, print the resolved configuration as JSON and exit; writes nothing")
def main(**opts) -> None:
    """Train an EDM2 diffusion model, or resume the run in --outdir.

    Runs on the GPU(s) when CUDA is available, else on the CPU. Without --preset: the paper's EDM2-S recipe
    (2Gi images). Everything is checked before anything is written; --dry-run only checks and prints."""
    try:
        run(opts)
    except click.ClickException as e:
        if not is_rank0():  # under torchrun every process fails alike: rank 0 says why
            raise SystemExit(e.exit_code) from None
        raise


def is_rank0() -> bool:
    """Rank 0 of torchrun (or no torchrun), before torch.distributed is set up."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def run(opts: dict) -> None:
    # Every option, the dataset and the network arguments are checked before anything is written.
    if opts["cond"] is True and opts["uncond"]:
        raise click.BadParameter("--cond True and --uncond contradict each other", param_hint="--uncond")
    opts["cond"] = not opts["uncond"] and opts["cond"] is not False
    if opts["fp16"] is not None:
        if opts["precision"] != "auto":
            raise click.BadParameter("give --precision or --fp16, not both", param_hint="--fp16")
        opts["precision"] = "fp16" if opts["fp16"] else "fp32"
    if os.path.exists(opts["outdir"]) and not os.path.isdir(opts["outdir"]):
        raise click.BadParameter(f"{opts['outdir']} is a file; expected a directory", param_hint="--outdir")
    problem = non_utf8_path_problem(opts["outdir"])
    if problem is not None:  # before the demo data go there (the loop checks it too)
        raise click.BadParameter(problem, param_hint="--outdir")
    config = build_config(opts)
    try:
        resolved = config.validate(int(os.environ.get("WORLD_SIZE", "1") or 1))
    except TrainingError as e:
        raise click.ClickException(str(e)) from None
    demo_missing = opts["data"] == "demo" and not os.path.isfile(config.data)
    with tempfile.TemporaryDirectory(prefix="edm2-demo-") as tmp:
        data_path = config.data
        if demo_missing:  # made aside, moved into the run directory only once everything passed
            from training.demo_data import write_demo_dataset

            data_path = write_demo_dataset(os.path.join(tmp, DEMO_DATA))
        config = check_data_and_network(config, data_path, opts["vae"], opts["vae_pixel_range"])
        resolved.encoder = config.encoder
        if is_rank0() and opts["preset"] is None:
            click.echo(describe_default_recipe(resolved), err=opts["dry_run"])
        if opts["dry_run"]:
            click.echo(json.dumps(resolved.for_device(dist.device()).to_dict(), indent=2))
            return
        if demo_missing:  # every process under torchrun: each renames its own complete copy into place
            atomic_write(config.data, lambda path: shutil.copyfile(data_path, path))
    try:
        summary = training_loop(opts["outdir"], config)
    except (TrainingError, DatasetError) as e:
        raise click.ClickException(str(e)) from None
    except TrainingStopped as e:
        # Non-zero, so `train && generate` and schedulers see an unfinished run; 130 / 143 as the shell reports it.
        log_line(opts["outdir"], str(e))
        dist.shutdown()
        raise SystemExit(e.exit_code) from None
    log_line(opts["outdir"], f"Done: {summary['cur_nimg']} images in {summary['training_time']:.0f} s of training; "
                             f"outputs in {opts['outdir']}")
    dist.shutdown()


def log_line(run_dir: str, line: str) -> None:
    """Print on rank 0 and append to the run's log.txt, as the training loop does with its lines."""
    from torch_utils import distributed as dist
    from training.progress import RunLog

    log = RunLog(run_dir, dist.get_rank())
    log(line)
    log.close()


if __name__ == "__main__":
    main()
