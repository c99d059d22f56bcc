"""The EDM2 training loop: one or many GPUs (torchrun), power-function EMA snapshots, crash-safe checkpoints
and exact resume (docs/design.md §5, §6, §11).

Reproducibility by construction: the images of every optimizer step, their sigma and their noise are
functions of (seed, step) for the whole global batch, and each process takes its slice. So one process and
N processes with the same total batch compute the same update, and a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import math
import os
import signal
import time
from typing import Any

import torch

from accel import PostStep, SpeedPlan, resolve_speed_plan  # noqa: F401 (PostStep re-exported)
from accel.post_step import fused_available, zero_nonfinite_grads_  # noqa: F401 (re-exported)
from networks import Precond
from torch_utils import distributed as dist
from torch_utils.state_io import load_state, non_utf8_path_problem, save_state

from .config import MAX_NONFINITE_STATUS, TrainingConfig, TrainingError  # noqa: F401 (re-exported)
from .dataset import DatasetError, ImageFolderDataset, InfiniteSampler, batch_chunk, share_worker_temp_dir
from .encoders import encoder_from_config
from .instruments import SkipInstruments
from .loss import EDM2Loss, reduce_batch_loss
from .model_files import save_network
from .phema import PowerFunctionEMA, TraditionalEMA
from .progress import LOG_FILE, Progress, RunLog
from .run_dir import (  # noqa: F401 (list_checkpoints, SNAPSHOT_PATTERN, ... re-exported)
    CHECKPOINT_PATTERN, KEEP_CHECKPOINTS, OPTIONS_FILE, RESUMABLE_CHANGES, SNAPSHOT_PATTERN, STATS_FILE,
    TRADITIONAL_SNAPSHOT_PATTERN, RunDirError, RunLock, check_config, checkpoint_path, dataset_identity,
    list_checkpoints, load_latest_checkpoint, prune_checkpoints, read_options, remove_temp_files, truncate_stats,
    write_json,
)
from .schedule import learning_rate_schedule

EMA = PowerFunctionEMA | TraditionalEMA


class TrainingStopped(Exception):
    """SIGINT / SIGTERM stopped the run after its checkpoint was saved; `exit_code` is the shell's 128 + signal."""

    def __init__(self, nimg: int, signum: int) -> None:
        super().__init__(
            f"Stopped by signal at {nimg} images; the checkpoint is saved. Run the same command to resume."
        )
        self.nimg, self.signum, self.exit_code = nimg, signum, 128 + signum


# --- setup -----------------------------------------------------------------------------------------------


# Runs shorter than this many optimizer steps (the demo: 512) train uncompiled by default: the minute of compiling
# would cost more than the compiled steps save (docs/design.md §14).
COMPILE_MIN_STEPS = 2000


def speed_plan(config: TrainingConfig, device: torch.device, world_size: int) -> SpeedPlan:
    """The configuration's speed options resolved (accel.resolve_speed_plan; compile None = its default, except for
    runs of fewer than COMPILE_MIN_STEPS steps); a bad value is a TrainingError naming the option."""
    whole = all(isinstance(v, int) for v in (config.duration, config.batch)) and config.batch > 0
    short = whole and config.duration // config.batch < COMPILE_MIN_STEPS
    try:
        return resolve_speed_plan(
            device, world_size, compile=config.compile, kernels=config.kernels, grad_sync=config.grad_sync,
            cudnn_benchmark=config.cudnn_benchmark,
            not_worth_compiling=f"fewer than {COMPILE_MIN_STEPS} steps (--compile compiles)" if short else "",
        )
    except ValueError as e:
        raise TrainingError(f"--{str(e).split()[0].replace('_', '-')}: {e}") from None


def _dataset_and_network_kwargs(config: TrainingConfig) -> tuple[ImageFolderDataset, dict[str, Any]]:
    """The dataset (checked against the configuration) and the network's constructor arguments."""
    dataset = ImageFolderDataset(config.data, use_labels=config.cond, xflip=config.xflip)
    if config.cond and dataset.labels is None:
        raise TrainingError(
            f"--cond needs labels, but {config.data} has no dataset.json with 'labels' (or train with --uncond)"
        )
    is_vae = config.encoder["class"] != "standard_rgb"
    if dataset.is_latent != is_vae:
        kind = "latent .npy" if dataset.is_latent else "image .png"
        raise TrainingError(
            f"--data {config.data} holds {kind} files, which the {config.encoder['class']} encoder cannot take"
        )
    channels = dataset.num_channels // 2 if is_vae else dataset.num_channels  # raw latents hold mean and std
    kwargs = dict(config.network)
    for key, value in dict(
        img_resolution=dataset.resolution, img_channels=channels, label_dim=dataset.label_dim
    ).items():
        if kwargs.setdefault(key, value) != value:
            raise TrainingError(
                f"--data {config.data}: the dataset gives {key} {value}, but the network expects {kwargs[key]} "
                "(pick a preset that fits the data)"
            )
    return dataset, kwargs


def _make_network(kwargs: dict[str, Any], meta: bool = False) -> Precond:
    # On the meta device a RuntimeError can only come from the arguments; on a real one it may be out of memory.
    errors = (ValueError, TypeError, IndexError, ZeroDivisionError) + ((RuntimeError,) if meta else ())
    try:
        if meta:
            with torch.device("meta"):
                return Precond(**kwargs)
        return Precond(**kwargs)
    except errors as e:
        raise TrainingError(f"network arguments (--channels, --network-kwargs or the preset): {e}") from None


def check_dataset_and_network(config: TrainingConfig) -> ImageFolderDataset:
    """Everything build_dataset_and_net checks, without side effects: no file written, no VAE loaded, and the network
    built on the meta device (no memory, however large). Raises TrainingError or DatasetError."""
    dataset, kwargs = _dataset_and_network_kwargs(config)
    _make_network(kwargs, meta=True)
    return dataset


def build_dataset_and_net(config: TrainingConfig) -> tuple[ImageFolderDataset, Any, Precond]:
    dataset, kwargs = _dataset_and_network_kwargs(config)
    encoder = encoder_from_config(config.encoder)
    return dataset, encoder, _make_network(kwargs)


def build_ema(net: torch.nn.Module, config: TrainingConfig) -> EMA:
    """The configuration's EMA of the trained weights: the power-function EMAs of ema_stds (Eq. 127), or with
    ema_halflife the traditional EMA, its ramp-up counting the images before each step as EDM's loop does
    (docs/design.md §13)."""
    if config.ema_halflife is None:
        return PowerFunctionEMA(net, config.ema_stds)
    return TraditionalEMA(net, config.ema_halflife, config.ema_rampup, count_before_step=True)


def _step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device).manual_seed((seed * 1_000_003 + step) % (2**63))


def _init_worker(_worker_id: int) -> None:
    """DataLoader workers leave SIGINT / SIGTERM to the main process (Ctrl-C signals the whole process
    group), which finishes its step, checkpoints and then shuts the workers down. On Linux a worker is also
    killed the moment its parent dies (kill -9 included), instead of lingering until it notices."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)
    except (OSError, AttributeError):
        pass  # not Linux: workers notice a dead parent at their next status check


def _shutdown_workers(batches: Any) -> None:
    """End the DataLoader's workers now. Left to garbage collection, an exception's traceback keeps the iterator
    alive, and the interpreter's exit then waits forever for workers that ignore SIGTERM."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def _worker_error(e: Exception) -> str | None:
    """The one-line message of a DatasetError raised in a DataLoader worker (which re-raises it in the main process
    with the worker's whole traceback as its text), or None for other errors."""
    if not isinstance(e, DatasetError):
        return None
    text = str(e).strip()
    last = text.splitlines()[-1] if text else text
    marker = "DatasetError: "
    return last[last.index(marker) + len(marker):] if marker in last else last


class _StopFlag:
    """SIGTERM / SIGINT ask the loop to checkpoint and stop after the current step."""

    def __init__(self) -> None:
        self.raised, self.signum = False, int(signal.SIGTERM)
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.raised, self.signum = True, signum

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class _StopVote:
    """Whether any process has been asked to stop, agreed every `every` steps. On CUDA the vote is an asynchronous
    all-reduce whose result is read at the next vote, from pinned memory, long after it is done: a blocking
    all-reduce would drain the GPU's queue every few steps."""

    def __init__(self, device: torch.device, every: int = 8) -> None:
        self.device, self.every, self.pending = device, every, None

    def __call__(self, step: int, raised: bool) -> bool:
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return raised
        if step % self.every:
            return False
        if self.device.type != "cuda":
            return dist.all_reduce_sum(float(raised)) > 0
        agreed = False
        if self.pending is not None:
            event, host = self.pending
            event.synchronize()  # recorded `every` steps ago
            agreed = bool(host.item() > 0)
        vote = torch.tensor([float(raised)], device=self.device)
        torch.distributed.all_reduce(vote)
        host = torch.empty(1, pin_memory=True)
        host.copy_(vote, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending = (event, host)
        return agreed


# --- the loop --------------------------------------------------------------------------------------------


def training_loop(
    run_dir: str, config: TrainingConfig | dict[str, Any], device: torch.device | None = None
) -> dict[str, Any]:
    """Train (or resume) in run_dir; returns a summary. Call under torchrun for several GPUs.

    Raises TrainingError (a bad configuration, dataset file or run directory, a failed write, a diverged run:
    one line naming what is wrong; the last good checkpoint is intact) or TrainingStopped (SIGINT / SIGTERM:
    checkpoint saved)."""
    dist.init()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = device or dist.device()
    # precision 'auto' is resolved here, where the device is known
    config = TrainingConfig.coerce(config).for_device(device).validate(world)
    check_dataset_and_network(config)  # before the run directory is made
    problem = non_utf8_path_problem(run_dir)
    if problem is not None:  # its checkpoints could not be read back: a resume would set them aside as damaged
        raise TrainingError(f"--outdir {problem}")
    lock = RunLock(run_dir)
    if rank == 0:
        if os.path.exists(run_dir) and not os.path.isdir(run_dir):
            raise TrainingError(f"--outdir {run_dir}: is a file; expected a directory (new or an earlier run's)")
        try:
            os.makedirs(run_dir, exist_ok=True)
        except OSError as e:
            raise TrainingError(f"--outdir {run_dir}: cannot create the run directory ({e.strerror})") from None
        try:
            lock.acquire()
        except RunDirError as e:
            raise TrainingError(str(e)) from None
    try:
        return _train(run_dir, config, device, rank, world)
    except RunDirError as e:
        raise TrainingError(str(e)) from None
    except torch.OutOfMemoryError:
        raise TrainingError(out_of_memory_message(config.batch_gpu, device)) from None
    finally:
        lock.release()


def out_of_memory_message(batch_gpu: int, device: torch.device) -> str:
    """The one line for a GPU that ran out of memory: what to change, and that nothing is lost."""
    size = ""
    if device.type == "cuda":
        size = f", on a GPU of {torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB"
    return (
        f"out of memory with --batch-gpu {batch_gpu} (images per GPU and accumulation round{size}); give a smaller "
        "--batch-gpu, which changes only the accumulation rounds, not the training (README, Speed: the batch per "
        "GPU memory). Rerun the same command to resume from the last checkpoint"
    )


def _train(run_dir: str, config: TrainingConfig, device: torch.device, rank: int, world: int) -> dict[str, Any]:
    log = RunLog(run_dir, rank)  # the terminal and RUN/log.txt
    if rank == 0:
        removed = remove_temp_files(run_dir)
        if removed:
            log(f"Removed {len(removed)} temp file(s) of an interrupted save: {', '.join(removed)}")

    plan = speed_plan(config, device, world)
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    dataset, encoder, net = build_dataset_and_net(config)
    config.data_identity = dataset_identity(dataset)
    if rank == 0:
        check_config(run_dir, config.to_dict(), read_options(run_dir), os.path.join(run_dir, OPTIONS_FILE))
    dist.barrier()
    torch.manual_seed(config.seed * world + rank)  # dropout; restored on resume
    plan.apply(net.to(device).train())  # attention / dropout modules, layouts, cuDNN's autotuner (fixed shapes)
    optimizer = plan.adam(net, lr=config.lr.ref_lr, betas=tuple(config.betas), eps=config.eps)
    ema = build_ema(net, config) if rank == 0 else None
    try:
        post_step = plan.post_step(net, optimizer, ema, normalize=config.force_weight_norm)
    except ValueError as e:
        raise TrainingError(f"--kernels {plan.kernels}: {e}") from e
    use_instruments = config.instruments
    use_instruments = not plan.compile if use_instruments is None else bool(use_instruments)
    instruments = SkipInstruments(net)  # ScaleLong figures per skip and stage on status steps
    loss_fn = EDM2Loss(**dataclasses.asdict(config.loss))
    batch, batch_gpu = config.batch, config.batch_gpu
    rounds = batch // (batch_gpu * world)

    cur_nimg, training_time = 0, 0.0
    state = load_latest_checkpoint(run_dir, log) if rank == 0 else None
    # Every rank resumes from rank 0's choice (rank 0 alone renames damaged files aside).
    resume_path = dist.broadcast_object(checkpoint_path(run_dir, int(state["cur_nimg"])) if state is not None else None)
    if rank != 0 and resume_path is not None:
        state = load_state(resume_path)
    if state is not None:
        check_config(run_dir, config.to_dict(), state.get("config"), resume_path)
        net.load_state_dict(state["net"])
        optimizer.load_state_dict(state["optimizer"])
        for p in net.parameters():  # checkpoints hold contiguous moments: lay them out like the weights again
            for key, value in optimizer.state.get(p, {}).items():
                if key != "step" and value.stride() != p.stride():
                    optimizer.state[p][key] = torch.empty_like(p).copy_(value)
        if ema is not None:
            ema.load_state_dict(state["ema"])
        cur_nimg, training_time = int(state["cur_nimg"]), float(state["training_time"])
        rng = state["rng"][rank] if rank < len(state["rng"]) else None
        if rng is not None:
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], device)
        log(f"Resuming from {cur_nimg} images ({cur_nimg // batch} steps).")
        del state
    if rank == 0:
        with _write_errors(run_dir, "the run's options and status lines"):
            truncate_stats(run_dir, cur_nimg)  # the status lines written after that checkpoint come again
            config.to_json(os.path.join(run_dir, OPTIONS_FILE))
        log(json.dumps(dict(dataset=dataset.describe(), network=net.init_kwargs), indent=2), file_only=True)
        log(f"Options in {os.path.join(run_dir, OPTIONS_FILE)}; dataset and network details and this output in "
            f"{os.path.join(run_dir, LOG_FILE)}.")
        log(f"Parameters: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M; {world} process(es), "
            f"batch {batch} = {batch_gpu} x {world} x {rounds} round(s).")
        log(f"Speed: {plan.describe('the first steps wait for the compiler')}.")

    ddp, averager = plan.distribute(net, device, world)  # DDP, or the flat buffer's all-reduces ('flat')
    # Steps with instruments armed (hooks) run eagerly, the others through the compiled module.
    compiled = plan.compile_for_training(ddp)
    step = cur_nimg // batch
    sampler = InfiniteSampler(len(dataset), batch, batch_gpu, rank, world, config.seed, start_step=step)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_gpu, sampler=sampler, num_workers=config.workers,
        pin_memory=device.type == "cuda", prefetch_factor=4 if config.workers else None,
        worker_init_fn=_init_worker,
        # Its own generator for the workers' base seed: drawn from the global one, it would shift the dropout
        # stream of a resumed run (restored from the checkpoint before this draw) against an uninterrupted one.
        generator=torch.Generator().manual_seed(config.seed),
    )
    if config.workers:
        share_worker_temp_dir()
    batches = iter(loader)
    stop, vote = _StopFlag(), _StopVote(device)
    stats_path = os.path.join(run_dir, STATS_FILE)
    nonfinite_streak = 0  # status intervals in a row with a non-finite loss
    loss_sum = torch.zeros([], device=device, dtype=torch.float64)
    loss_count = 0
    tick_nimg, tick_time, start_nimg = cur_nimg, time.time(), cur_nimg
    # EDM2_SYNC_DEBUG=1 (benchmarks/bench_train.py --sync-debug): from the third step on, torch warns where the host
    # waits for the GPU. Only status, snapshot and checkpoint steps should; any other wait drains the GPU's queue.
    sync_debug_from = step + 2 if os.environ.get("EDM2_SYNC_DEBUG") == "1" and device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def crossed(interval: int, before: int, after: int) -> bool:
        return interval > 0 and after // interval > before // interval

    def next_status(nimg: int) -> int:
        interval = config.status
        return min((nimg // interval + 1) * interval if interval > 0 else config.duration, config.duration)

    if cur_nimg < config.duration:
        every = f"a status line every {config.status} images" if config.status > 0 else "a status line at the end"
        log(f"Training from {cur_nimg} to {config.duration} images; {every}.")
    progress = Progress(rank)  # a bar up to the next status line, on a terminal only
    log.progress = progress
    progress.start(cur_nimg, next_status(cur_nimg))

    try:
        while cur_nimg < config.duration:
            if step == sync_debug_from:
                torch.cuda.set_sync_debug_mode("warn")
            lr = learning_rate_schedule(cur_nimg, batch, **dataclasses.asdict(config.lr))
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            status_step = (
                crossed(config.status, cur_nimg, cur_nimg + batch) or cur_nimg + batch >= config.duration
            )
            instruments.arm(use_instruments and status_step)
            gen = _step_generator(config.seed, step, device)
            sigma_all = loss_fn.sample_sigma(batch, device, gen)
            noise_all = torch.randn(
                [batch, net.img_channels, net.img_resolution, net.img_resolution], device=device, generator=gen
            )
            for rnd in range(rounds):
                try:
                    images, labels = next(batches)
                except DatasetError as e:
                    raise TrainingError(_worker_error(e)) from None
                chunk = batch_chunk(rnd, rank, world, batch_gpu)  # the sampler's images of this round
                images = images.to(device, non_blocking=True)
                latent_gen = _step_generator(config.seed + 1, step * batch + chunk.start, device)
                images = encoder.encode_latents(images, generator=latent_gen)
                # non_blocking: a blocking copy drains the GPU
                labels = labels.to(device, non_blocking=True) if net.label_dim else None
                sync = contextlib.nullcontext() if (ddp is net or rnd == rounds - 1) else ddp.no_sync()
                with sync:
                    loss = loss_fn(
                        ddp if instruments.armed else compiled, images, labels, sigma=sigma_all[chunk],
                        noise=noise_all[chunk],
                    )
                    reduce_batch_loss(loss, batch // world).backward()
                loss_sum += loss.detach().sum(dtype=torch.float64)
                loss_count += loss.numel()
            if averager is not None:
                # gathers and all-reduces chunk by chunk; the post-step updates each once averaged
                averager.start_average()
            # Non-finite grads zeroed, Adam, the EMAs (Eq. 127, or the traditional one), forced weight normalization
            # (Eq. 66).
            post_step(cur_nimg + batch, batch, ready=averager)
            before, cur_nimg, step = cur_nimg, cur_nimg + batch, step + 1
            progress.update(batch)

            stopping = vote(step, stop.raised)  # all processes stop at the same step
            done = cur_nimg >= config.duration
            if crossed(config.status, before, cur_nimg) or done or stopping:
                now = time.time()
                training_time += now - tick_time
                total_loss = dist.all_reduce_sum(float(loss_sum)) / max(dist.all_reduce_sum(loss_count), 1)
                entry = dict(
                    kimg=cur_nimg / 1e3, nimg=cur_nimg, loss=total_loss, lr=lr,
                    img_per_s=(cur_nimg - tick_nimg) / max(now - tick_time, 1e-9), time_s=training_time,
                )
                entry.update(instruments.collect())
                if device.type == "cuda":  # this interval's peak (the first one's includes compiling)
                    entry["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                    torch.cuda.reset_peak_memory_stats(device)
                if rank == 0:
                    with _write_errors(run_dir, "a status line"), open(stats_path, "a") as f:
                        f.write(json.dumps(entry) + "\n")
                log(f"kimg {entry['kimg']:<9.1f} loss {total_loss:<8.4f} lr {lr:<9.3g} img/s {entry['img_per_s']:<8.1f}"
                    + (f" mem {entry['peak_mem_gib']:.2f} GiB" if "peak_mem_gib" in entry else ""), flush=True)
                progress.start(cur_nimg, next_status(cur_nimg))
                loss_sum.zero_()
                loss_count = 0
                tick_nimg, tick_time = cur_nimg, time.time()
                nonfinite_streak = 0 if math.isfinite(total_loss) else nonfinite_streak + 1
                if nonfinite_streak >= config.max_nonfinite_status:
                    raise TrainingError(
                        f"the loss has been non-finite for {nonfinite_streak} status interval(s) in a row, up to "
                        f"{cur_nimg} images: the run diverged (try a lower --lr) or the data holds nan/inf; "
                        "stopped without saving, "
                        f"the last good checkpoint is kept (--max-nonfinite-status {config.max_nonfinite_status})"
                    )
            snapshot_due = crossed(config.snapshot, before, cur_nimg) or done
            checkpoint_due = crossed(config.checkpoint, before, cur_nimg) or done or stopping
            if snapshot_due or checkpoint_due:
                check_finite(net, ema, cur_nimg, optimizer)  # a diverged state is never saved, nor counted as good
            if rank == 0 and ema is not None and snapshot_due:
                with _write_errors(run_dir, "EMA snapshots"):
                    save_snapshots(run_dir, ema, encoder, cur_nimg)
            if checkpoint_due:
                training_time += time.time() - tick_time
                tick_time = time.time()
                with _write_errors(run_dir, "a training checkpoint"):
                    save_checkpoint(
                        run_dir, net, optimizer, ema, cur_nimg, training_time, config.to_dict(), device, rank
                    )
            if stopping and not done:
                raise TrainingStopped(cur_nimg, stop.signum)
    finally:
        if sync_debug_from is not None:
            torch.cuda.set_sync_debug_mode("default")
        stop.restore()
        progress.clear()
        log.close()
        _shutdown_workers(batches)
        del batches
    return dict(cur_nimg=cur_nimg, steps=step, images_this_run=cur_nimg - start_nimg, training_time=training_time)


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold a nan or an inf."""
    bad = [name for name, t in tensors.items() if t.is_floating_point()]
    if not bad:
        return []
    flags = torch.stack([torch.isfinite(tensors[name]).all() for name in bad]).tolist()  # one host sync
    return [name for name, ok in zip(bad, flags) if not ok]


def check_finite(
    net: torch.nn.Module, ema: EMA | None, cur_nimg: int, optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Raise TrainingError if the weights, (rank 0) the EMAs or the optimizer's moments hold nan / inf; every rank
    raises together. An infinite second moment (a finite gradient above 1.8e19 squared) leaves its weight finite but
    frozen for good, so it counts as a diverged state too."""
    bad = nonfinite_tensors(dict(net.named_parameters()))
    if optimizer is not None:
        names = {id(p): name for name, p in net.named_parameters()}
        moments = {f"optimizer {key}: {names.get(id(p), '?')}": value for p, state in optimizer.state.items()
                   for key, value in state.items() if isinstance(value, torch.Tensor) and key != "step"}
        bad += nonfinite_tensors(moments)
    if ema is not None:
        for std, ema_net in ema:
            label = "traditional" if std is None else f"{std:.3f}"
            bad += [f"ema {label}: {name}" for name in nonfinite_tensors(dict(ema_net.named_parameters()))]
    if dist.all_reduce_sum(len(bad)) > 0:
        where = f" ({len(bad)} tensor(s), e.g. {bad[0]})" if bad else ""
        raise TrainingError(
            f"the weights became non-finite by {cur_nimg} images{where}: the run diverged (try a lower --lr); "
            "nothing of this state was saved, the last good checkpoint is kept"
        )


@contextlib.contextmanager
def _write_errors(run_dir: str, what: str):
    """A failed write (disk full, file-size limit, permissions) ends the run with one line; atomic_write has
    removed its temp file, so what was saved before is intact."""
    try:
        yield
    except OSError as e:
        reason = e.strerror or str(e)
        filename = getattr(e, "filename", None)
        where = f" ({os.path.basename(os.fspath(filename))})" if filename else ""
        raise TrainingError(
            f"cannot write {what} into {run_dir}{where}: {reason}; the last good checkpoint is kept"
        ) from None


def save_snapshots(run_dir: str, ema: EMA, encoder, cur_nimg: int) -> None:
    """One file per power-function EMA (network-snapshot-KIMG-STD), or the traditional EMA's network-snapshot-KIMG-ema
    (a name the post-hoc tools' PREFIX-KIMG-STD selection never matches; its header says what it averages)."""
    from .plot_stats import plot_loss_curves

    for std, ema_net in ema:
        if std is None:
            path = os.path.join(run_dir, TRADITIONAL_SNAPSHOT_PATTERN.format(kimg=cur_nimg // 1000))
            extra = dict(ema=ema.describe())
        else:
            path = os.path.join(run_dir, SNAPSHOT_PATTERN.format(kimg=cur_nimg // 1000, std=std))
            extra = None
        save_network(path, ema_net, encoder=encoder.config(), ema_std=std, training_nimg=cur_nimg, extra=extra)
    if os.path.isfile(os.path.join(run_dir, STATS_FILE)):
        plot_loss_curves([run_dir], os.path.join(run_dir, "loss.png"))  # a picture of the run so far


def save_checkpoint(run_dir, net, optimizer, ema, cur_nimg, training_time, config, device, rank) -> None:
    rng = dict(cpu=torch.get_rng_state())
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    rngs = dist.all_gather_objects(rng)
    if rank == 0:
        state = dict(
            cur_nimg=cur_nimg, training_time=training_time, config=config, rng=rngs,
            net=net.state_dict(), optimizer=optimizer.state_dict(), ema=ema.state_dict(),
        )
        save_state(checkpoint_path(run_dir, cur_nimg), state)
        prune_checkpoints(run_dir, cur_nimg)
    dist.barrier()
