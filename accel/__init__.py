"""The speed layer: everything that makes training and sampling fast, applied from outside the reference network
(networks/), which never imports it (docs/design.md).

One `SpeedPlan`, resolved once by `resolve_speed_plan` from the training / sampling options, says what runs:

- kernels 'fast' (the default on CUDA): cosine attention through fused scaled-dot-product attention
  (accel/attention.py), dropout keep-masks from one Philox call per four elements (accel/dropout.py), NHWC
  (channels-last) activations and weights on CUDA, and Adam + power-function EMA + forced weight normalization in
  one Triton kernel (accel/post_step.py). Same functions as the reference, rounded differently (other random draws
  for dropout);
- kernels 'reference' (the default elsewhere): plain PyTorch in the reference's order and layout, the official
  values to the last bit on the CPU;
- compile (the default where the Triton kernels run, i.e. CUDA): torch.compile (training: the whole step's
  network; sampling: with CUDA graphs and frozen weights). Its results are cached on disk (`compile_cache_dir`),
  so a second process with the same network and shapes starts in seconds instead of minutes;
- grad_sync (several processes): 'ddp' (torch's DistributedDataParallel, whose buckets overlap an eager backward)
  or 'flat' (accel/grad_sync.py: one buffer, chunked all-reduces that overlap the post-step; for compiled steps);
- cudnn_benchmark: cuDNN's autotuner (faster convolutions; CUDA runs repeat bit for bit only without it);
- fp8 (sampling, off by default): 'on' runs the 1x1 and 3x3 convolutions as FP8 (e4m3) matrix products on Ada /
  Hopper GPUs (accel/fp8.py), 'emulate' the same quantization in plain PyTorch on any device (tests). Never with
  the reference kernels.

    plan = resolve_speed_plan(device, world_size)     # compiled on CUDA by default
    plan.apply(net)                                   # swaps modules, sets layouts and the cuDNN flag
    post_step = plan.post_step(net, optimizer, ema)   # after every backward
    ddp, averager = plan.distribute(net, device, world_size)
    step_net = plan.compile_for_training(ddp)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from networks.mp import CosineAttention, Dropout

from .attention import FusedCosineAttention
from .dropout import FastDropout
from .fp8 import FP8_MODES, FP8Conv, check_fp8_device, swap_fp8
from .grad_sync import FlatGradients
from .kernels import kernels_available
from .post_step import PostStep

KERNELS = ("fast", "reference")
GRAD_SYNCS = ("ddp", "flat")

__all__ = [
    "FP8_MODES", "GRAD_SYNCS", "KERNELS", "FP8Conv", "FastDropout", "FlatGradients", "FusedCosineAttention",
    "PostStep", "SpeedPlan", "compile_cache_dir", "kernels_available", "resolve_speed_plan",
]


@dataclasses.dataclass(frozen=True)
class SpeedPlan:
    """What runs, resolved (see the module docstring); make it with `resolve_speed_plan`."""

    compile: bool  # torch.compile
    kernels: str  # 'fast' or 'reference'
    channels_last: bool  # NHWC activations (and, for training, weights)
    fused_step: bool  # the Triton post-step (Adam + EMA + forced weight normalization)
    fast_dropout: bool  # FastDropout in place of the network's Dropout modules
    fused_attention: bool  # FusedCosineAttention in place of CosineAttention
    grad_sync: str  # 'ddp' or 'flat' (several processes)
    cudnn_benchmark: bool  # cuDNN's autotuner (CUDA)
    cuda: bool  # the device is a CUDA device
    fp8: str = "off"  # sampling: FP8 convolutions, 'off', 'on' (the kernels) or 'emulate' (accel/fp8.py)
    not_compiled_because: str = dataclasses.field(default="", compare=False)  # for the logs ('' when compiled)

    def describe(self, waiting: str) -> str:
        """What runs, for a log line: 'kernels fast, compiled (cache in ...; WAITING)' with WAITING e.g. 'the first
        steps wait for the compiler', or 'kernels reference, not compiled: no CUDA device'."""
        if self.compile:
            return f"kernels {self.kernels}, compiled (cache in {compile_cache_dir()}; {waiting})"
        return f"kernels {self.kernels}, not compiled: {self.not_compiled_because}"

    def apply(self, net: torch.nn.Module, weights_channels_last: bool = True) -> torch.nn.Module:
        """Put the plan's modules and layouts into `net` (in place; returned for chaining): attention and dropout
        modules swapped either way (so a network can go back to the reference), the backbone's input made
        channels-last (or not), the weights too with `weights_channels_last` (training: laid out like their
        gradients, so no transposes into .grad), and cuDNN's autotuner flag on CUDA. With fp8 'on' / 'emulate' the
        eligible convolutions become FP8Conv (for sampling: their weights are quantized now), with 'off' MPConv
        again. Parameters and state-dict keys are unchanged."""
        swap_fp8(net, self.fp8)
        for module in list(net.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, CosineAttention):
                    kind = FusedCosineAttention if self.fused_attention else CosineAttention
                    if type(child) is not kind:
                        setattr(module, name, kind(child.num_heads))
                elif isinstance(child, Dropout):
                    kind = FastDropout if self.fast_dropout else Dropout
                    if type(child) is not kind:
                        replacement = kind(child.p)
                        replacement.train(child.training)
                        setattr(module, name, replacement)
        backbone = getattr(net, "backbone", net)
        for key, hook in list(backbone._forward_pre_hooks.items()):
            if hook is _channels_last_input:
                del backbone._forward_pre_hooks[key]
        if self.channels_last:
            backbone.register_forward_pre_hook(_channels_last_input)
            if weights_channels_last:
                net.to(memory_format=torch.channels_last)
        if self.cuda:
            torch.backends.cudnn.benchmark = self.cudnn_benchmark
        return net

    def adam(self, net: torch.nn.Module, **kwargs: Any) -> torch.optim.Adam:
        """torch.optim.Adam over net's parameters; torch's one-kernel Adam on CUDA when the fused post-step is off."""
        return torch.optim.Adam(net.parameters(), fused=self.cuda and not self.fused_step, **kwargs)

    def post_step(
        self, net: torch.nn.Module, optimizer: torch.optim.Adam, ema: Any = None, normalize: bool = True
    ) -> PostStep:
        """Everything between backward and the next forward (accel/post_step.py), fused or the library calls;
        `normalize`: forced weight normalization (off for the ablation ladder's configs A-D)."""
        return PostStep(net, optimizer, ema, fused=self.fused_step, normalize=normalize)

    def distribute(
        self, net: torch.nn.Module, device: torch.device, world_size: int
    ) -> tuple[torch.nn.Module, FlatGradients | None]:
        """(the module to run forward / backward through, the gradient averager or None). One process: (net, None).
        'ddp': (DistributedDataParallel(net), None). 'flat': every rank takes rank 0's parameters and buffers (what
        DDP does at construction), then (net, FlatGradients): call its start_average() after the last backward of
        a step and hand it to the post-step as `ready`."""
        if world_size <= 1:
            return net, None
        if self.compile:
            # Splitting the compiled graph at DDP's buckets (so the all-reduces overlap the backward) measured
            # slower than one whole graph (the shared brief of issue 23: 1271.7 against 1304.3 img/s on two H200).
            torch._dynamo.config.optimize_ddp = False
        if self.grad_sync == "ddp":
            ids = [device] if device.type == "cuda" else None
            return torch.nn.parallel.DistributedDataParallel(net, device_ids=ids), None
        for t in list(net.parameters()) + list(net.buffers()):
            torch.distributed.broadcast(t.data, 0)
        return net, FlatGradients(net.parameters())

    def compile_for_training(self, module: torch.nn.Module) -> torch.nn.Module:
        """torch.compile(module) with `compile` (caches in `compile_cache_dir()`), else the module itself."""
        if not self.compile:
            return module
        compile_cache_dir()
        return torch.compile(module)

    def compile_for_sampling(
        self, net: torch.nn.Module, cuda_graphs: bool | None = None, freezing: bool | None = None
    ) -> torch.nn.Module:
        """torch.compile for the sampler's fixed shapes with `compile`, else net. `cuda_graphs` (None = on CUDA)
        replays each evaluation as one CUDA graph; `freezing` (None = on CUDA) treats the weights as constants, so
        the normalized weights are computed once at compile time (weights loaded afterwards are not seen). Shapes
        are static: a last, smaller batch gets its own compiled graph rather than one for every batch size."""
        if not self.compile:
            return net
        compile_cache_dir()
        graphs = self.cuda if cuda_graphs is None else bool(cuda_graphs)
        freeze = self.cuda if freezing is None else bool(freezing)
        return torch.compile(net, dynamic=False, options={"triton.cudagraphs": graphs, "freezing": freeze})


def compile_cache_dir() -> str:
    """Where torch.compile keeps what it compiled, so that the next process (a resumed run, a second generate.py)
    loads the kernels instead of compiling them again: $TORCHINDUCTOR_CACHE_DIR when set (e.g. a disk that every
    node of a cluster sees), else ~/.cache/edm2/torchinductor ($XDG_CACHE_HOME respected), which, unlike
    torch's default in /tmp, outlives a reboot. Triton's own kernel cache stays where Triton keeps it (~/.triton).
    Set before the first compilation; returns the directory."""
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(base, "edm2", "torchinductor")
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def _channels_last_input(module: torch.nn.Module, args: tuple) -> tuple:
    """Forward pre-hook of the backbone: its image input NHWC, so that every activation after it stays NHWC."""
    x = args[0]
    return (x.contiguous(memory_format=torch.channels_last), *args[1:]) if x.ndim == 4 else args


def resolve_speed_plan(
    device: torch.device | str,
    world_size: int = 1,
    compile: bool | None = None,
    kernels: str | None = None,
    grad_sync: str | None = None,
    cudnn_benchmark: bool = True,
    fp8: str = "off",
    not_worth_compiling: str = "",
) -> SpeedPlan:
    """The one place that decides what the defaults mean. kernels None = 'fast' on CUDA, 'reference' elsewhere;
    'fast' = fused attention everywhere, and where the Triton kernels run (CUDA with Triton) the fused post-step
    and the fast dropout, plus channels-last on CUDA. compile None = on where the fast kernels run on CUDA with
    Triton (torch.compile's GPU code generator), off for the reference kernels and elsewhere. grad_sync None =
    'flat' when compiled, else 'ddp'. fp8 'on' needs the fast kernels on a CUDA GPU of compute capability 8.9 or
    newer (accel.fp8.check_fp8_device); 'emulate' runs anywhere, with the fast kernels. `not_worth_compiling`: why
    compiling would not pay for this work (e.g. a run of few steps); with compile None the plan is then not
    compiled, and says so. A bad value raises ValueError naming the option."""
    if kernels is not None and kernels not in KERNELS:
        raise ValueError(f"kernels must be 'fast' or 'reference', got {kernels!r}")
    if grad_sync is not None and grad_sync not in GRAD_SYNCS:
        raise ValueError(f"grad_sync must be 'ddp' or 'flat', got {grad_sync!r}")
    for name, value in dict(compile=compile, cudnn_benchmark=cudnn_benchmark).items():
        if not isinstance(value, bool) and not (name == "compile" and value is None):
            raise ValueError(f"{name} must be true or false, got {value!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if fp8 not in FP8_MODES:
        raise ValueError(f"fp8 must be one of {', '.join(FP8_MODES)}, got {fp8!r}")
    device = torch.device(device)
    cuda = device.type == "cuda"
    if fp8 != "off" and kernels == "reference":
        raise ValueError("fp8: the reference kernels never use FP8; use the fast kernels")
    if fp8 == "on":
        check_fp8_device(device)
    kernels = kernels or ("fast" if cuda or fp8 != "off" else "reference")
    fast = kernels == "fast"
    triton_kernels = fast and kernels_available(device)
    if compile is None:
        compile = triton_kernels and cuda and not not_worth_compiling
        because = "" if compile else (
            "no CUDA device" if not cuda else "reference kernels" if not fast
            else "no Triton for this GPU" if not triton_kernels else not_worth_compiling
        )
    else:
        because = "" if compile else "turned off"
    return SpeedPlan(
        compile=compile, kernels=kernels, channels_last=fast and cuda, fused_step=triton_kernels,
        fast_dropout=triton_kernels, fused_attention=fast, grad_sync=grad_sync or ("flat" if compile else "ddp"),
        cudnn_benchmark=cudnn_benchmark, cuda=cuda, fp8=fp8, not_compiled_because=because,
    )
