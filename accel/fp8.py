"""FP8 sampling: the network's 1x1 and 3x3 convolutions as float8 (e4m3) matrix products, for Ada / Hopper GPUs
(docs/design.md §15). Sampling only (no gradients); the rest of the network runs in bf16.

What is quantized (`FP8Conv`, swapped in for MPConv by accel.SpeedPlan with fp8 'on' or 'emulate'):

- the weight: Eq. 47's normalized weight normalize(w) / sqrt(fan_in), once (the network is frozen for sampling),
  with one scale per output channel: scale = amax / 448, so every channel spans e4m3's whole range. The gain of
  Eq. 47 (a scalar) is folded into those per-channel scales at call time: it may be zero (out_gain at
  initialization) and is a parameter of the module that calls the convolution, not of the convolution;
- the input activation: one scale per tensor and call, amax / 448 ('dynamic', the default), or 1 ('unit': values
  past +-448 saturate). e4m3 is a floating-point format, so the scale only decides which values leave its range
  (above 448 or below 2^-9); magnitude preservation keeps activations near unit RMS, well inside it, so 'unit'
  costs little accuracy and saves the amax pass; 'dynamic' never saturates, whatever the layer;
- the products accumulate in float32; the output (bf16) is acc * x_scale * w_scale[channel] * gain.

`fp8_conv_emulated` computes exactly the same quantization in plain PyTorch (float32 convolution of the dequantized
values): it defines what the kernels compute and runs anywhere (the CPU tests use it). The kernels: 1x1 as
torch._scaled_mm with row-wise scales on the channels-last [N*H*W, C] matrix; 3x3 (padding 1) as a Triton
implicit-GEMM kernel on NHWC e4m3 input (`fp8_conv3x3`, a torch custom op, so torch.compile and CUDA graphs take
it), or as torch._scaled_mm on an explicit im2col matrix ('im2col': nine shifted copies of the fp8 input).
Only convolutions whose channel counts suit the FP8 matrix units (input a multiple of 32, output of 16) are
swapped: the network's first convolution (image channels + 1 in) and last (image channels out) stay in bf16.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from networks.mp import MPConv, normalize

from .kernels import triton

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # the largest finite e4m3fn value
FP8_MODES = ("off", "on", "emulate")  # accel.resolve_speed_plan's fp8 option
ACT_SCALES = ("dynamic", "unit")
CONV3X3_IMPLS = ("triton", "im2col")
MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (8.9) and Hopper (9.0) or newer

__all__ = [
    "ACT_SCALES", "CONV3X3_IMPLS", "E4M3_MAX", "FP8Conv", "FP8_MODES", "activation_scale", "check_fp8_device",
    "conv3x3_triton", "fp8_conv1x1_scaled_mm", "fp8_conv3x3", "fp8_conv3x3_im2col", "fp8_conv_emulated",
    "fp8_eligible", "quantize_activation", "quantize_weight", "swap_fp8",
]


def check_fp8_device(device: torch.device | str) -> None:
    """ValueError (one line) unless FP8 matrix products run on `device`: CUDA of compute capability 8.9 or newer,
    with Triton."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"fp8 needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper), not {device.type}; "
                         "use bf16 here")
    if not torch.cuda.is_available():
        raise ValueError("fp8 needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper); CUDA is not "
                         "available here")
    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise ValueError(f"fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper); {name} is "
                         f"{capability[0]}.{capability[1]}: use bf16")
    if triton is None:
        raise ValueError("fp8 needs Triton (it comes with CUDA builds of PyTorch); use bf16")


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, float32 scale per output channel [O]) of a float weight [O, ...]: weight ~ q * scale[o], with
    scale = the channel's amax / 448 (1 for an all-zero channel)."""
    w = weight.to(torch.float32)
    amax = w.abs().flatten(1).amax(dim=1)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (w / scale.view(-1, *[1] * (w.ndim - 1))).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale


def activation_scale(x: torch.Tensor, mode: str = "dynamic") -> torch.Tensor:
    """The per-tensor scale of an activation, a float32 scalar tensor on x's device: amax / 448 ('dynamic'; a
    tiny floor keeps an all-zero tensor finite) or 1 ('unit')."""
    if mode == "unit":
        return torch.ones([], dtype=torch.float32, device=x.device)
    if mode != "dynamic":
        raise ValueError(f"act_scale must be one of {', '.join(ACT_SCALES)}, got {mode!r}")
    return x.abs().amax().to(torch.float32).clamp(min=1e-30) / E4M3_MAX


def quantize_activation(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale in e4m3 (saturating at +-448: the cast itself would give NaN past 464), same memory layout."""
    return (x.to(torch.float32) / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def fp8_conv_emulated(
    xq: torch.Tensor, wq: torch.Tensor, out_scale: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """What the FP8 kernels compute, in plain PyTorch: conv2d (stride 1, 'same' padding) of the dequantized e4m3
    input [N, C, H, W] and weight [O, C, kh, kw], accumulated in float32 (every product of two e4m3 values is
    exact there), times out_scale [O] (= x_scale * w_scale * gain), rounded once to out_dtype."""
    y = F.conv2d(xq.to(torch.float32), wq.to(torch.float32), padding=wq.shape[-1] // 2)
    return (y * out_scale.view(1, -1, 1, 1)).to(out_dtype)


def _nhwc_matrix(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> the [N*H*W, C] matrix of its pixels (a view for channels-last storage)."""
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(n * h * w, c)


def _from_nhwc_matrix(y: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """[N*H*W, O] -> [N, O, H, W] stored channels-last (a view)."""
    return y.view(n, h, w, -1).permute(0, 3, 1, 2)


def _scaled_mm(a: torch.Tensor, wq: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """a [M, K] e4m3 @ wq [O, K]^T e4m3 with row-wise scales (torch._scaled_mm's form for per-channel weight
    scales: scale_a [M, 1], scale_b [1, O], both float32 and contiguous; out bf16)."""
    scale_a = x_scale.reshape(1, 1).expand(a.shape[0], 1).contiguous()
    return torch._scaled_mm(a, wq.t(), scale_a=scale_a, scale_b=w_scale.reshape(1, -1).contiguous(),
                            out_dtype=torch.bfloat16)


def fp8_conv1x1_scaled_mm(xq: torch.Tensor, wq: torch.Tensor, x_scale: torch.Tensor,
                          w_scale: torch.Tensor) -> torch.Tensor:
    """1x1 convolution of xq [N, C, H, W] (e4m3) by wq [O, C] (e4m3): one torch._scaled_mm; bf16, channels-last."""
    n, _, h, w = xq.shape
    return _from_nhwc_matrix(_scaled_mm(_nhwc_matrix(xq).contiguous(), wq, x_scale, w_scale), n, h, w)


def fp8_conv3x3_im2col(xq: torch.Tensor, wq: torch.Tensor, x_scale: torch.Tensor,
                       w_scale: torch.Tensor) -> torch.Tensor:
    """3x3 convolution (padding 1) of xq [N, C, H, W] (e4m3) by wq [O, 9*C] (e4m3, K ordered (ky, kx, c)) as
    torch._scaled_mm on an explicit im2col matrix [N*H*W, 9*C]: nine shifted copies of the input (moved as bytes:
    zero bytes are e4m3 zeros). bf16, channels-last."""
    n, c, h, w = xq.shape
    xb = F.pad(xq.permute(0, 2, 3, 1).view(torch.uint8), (0, 0, 1, 1, 1, 1))  # [N, H+2, W+2, C]
    cols = torch.cat([xb[:, dy : dy + h, dx : dx + w, :] for dy in range(3) for dx in range(3)], dim=3)
    a = cols.view(E4M3).reshape(n * h * w, 9 * c)
    return _from_nhwc_matrix(_scaled_mm(a, wq, x_scale, w_scale), n, h, w)


# ------------------------------------------------------------------------------------------------------------
# The Triton implicit-GEMM 3x3 convolution

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _conv3x3_kernel(
        x_ptr, w_ptr, scale_ptr, out_ptr, H, W, C, O, M,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISE: tl.constexpr,
    ):
        # out[m, o] = scale[o] * sum over (tap, c) of x[pixel m shifted by tap, c] * w[o, tap, c]; rows m are the
        # N*H*W output pixels (NHWC), K runs over the 9 taps times C channels in BLOCK_K steps (C % BLOCK_K == 0,
        # so a step never straddles two taps). Out-of-image taps read zeros (the padding).
        # One flat grid, output-channel tiles varying fastest: the tiles that read the same pixels run together, so
        # the activations come from HBM about once (the weights, at most a few MB, stay in L2).
        pid = tl.program_id(0)
        tiles_n = tl.cdiv(O, BLOCK_N)
        pid_m = pid // tiles_n
        pid_n = pid % tiles_n
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = offs_m < M
        n_ok = offs_n < O
        hw = H * W
        img = offs_m // hw
        py = (offs_m % hw) // W
        px = offs_m % W
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        K = 9 * C
        for k0 in range(0, K, BLOCK_K):
            tap = k0 // C
            c0 = k0 - tap * C
            iy = py + (tap // 3 - 1)
            ix = px + (tap % 3 - 1)
            ok = m_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            row = ((img * H + iy) * W + ix).to(tl.int64) * C + c0
            a = tl.load(x_ptr + row[:, None] + offs_k[None, :], mask=ok[:, None], other=0.0)
            b = tl.load(w_ptr + offs_n[None, :].to(tl.int64) * K + (k0 + offs_k)[:, None], mask=n_ok[None, :],
                        other=0.0)
            # Hopper's FP8 tensor cores add in reduced precision; promoting every BLOCK_K products into the float32
            # accumulator keeps the sum as exact as the emulation's (PRECISE; the benchmark times both).
            if PRECISE:
                acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K)
            else:
                acc = tl.dot(a, b, acc)
        scale = tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0)
        y = (acc * scale[None, :]).to(tl.bfloat16, fp_downcast_rounding="rtne")
        out = out_ptr + offs_m[:, None].to(tl.int64) * O + offs_n[None, :]
        tl.store(out, y, mask=m_ok[:, None] & n_ok[None, :])


def _conv3x3_blocks(c: int, o: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K): K steps of 64 channels where C allows (else 32), 128 x 128 output tiles
    (narrower for few output channels)."""
    block_k = 64 if c % 64 == 0 else 32
    block_n = min(128, max(16, triton.next_power_of_2(o)))
    return 128, block_n, block_k


def conv3x3_triton(
    xq: torch.Tensor, wq: torch.Tensor, out_scale: torch.Tensor, blocks: tuple[int, int, int] | None = None,
    num_warps: int | None = None, num_stages: int = 3, precise: bool = True,
) -> torch.Tensor:
    """fp8_conv3x3's computation with a chosen tiling (BLOCK_M, BLOCK_N, BLOCK_K; None = _conv3x3_blocks), for
    benchmarks/bench_fp8.py to try others; BLOCK_K must divide C. precise=False leaves Hopper's reduced-precision
    accumulation of FP8 products unpromoted (faster, less exact)."""
    n, c, h, w = xq.shape
    o = wq.shape[0]
    if c % 32 != 0 or wq.shape[1] != 9 * c:
        raise ValueError(f"fp8_conv3x3: expected C a multiple of 32 and a weight [O, 9*C], got C={c}, "
                         f"weight {list(wq.shape)}")
    block_m, block_n, block_k = blocks or _conv3x3_blocks(c, o)
    if c % block_k != 0:
        raise ValueError(f"fp8_conv3x3: BLOCK_K {block_k} does not divide C={c}")
    x = xq.permute(0, 2, 3, 1).contiguous()
    out = torch.empty([n, h, w, o], dtype=torch.bfloat16, device=xq.device)
    m = n * h * w
    grid = (triton.cdiv(m, block_m) * triton.cdiv(o, block_n),)
    warps = num_warps or (8 if block_m * block_n >= 128 * 128 else 4)
    _conv3x3_kernel[grid](x, wq.contiguous(), out_scale.contiguous(), out, h, w, c, o, m, BLOCK_M=block_m,
                          BLOCK_N=block_n, BLOCK_K=block_k, PRECISE=precise, num_warps=warps, num_stages=num_stages)
    return out.permute(0, 3, 1, 2)


@torch.library.custom_op("edm2::fp8_conv3x3", mutates_args=())
def fp8_conv3x3(xq: torch.Tensor, wq: torch.Tensor, out_scale: torch.Tensor) -> torch.Tensor:
    """3x3 convolution (stride 1, padding 1) of xq [N, C, H, W] (e4m3, channels-last storage) by wq [O, 9*C] (e4m3,
    K ordered (ky, kx, c)), times out_scale [O] (float32): bf16 [N, O, H, W], channels-last. The Triton
    implicit-GEMM kernel; C must be a multiple of 32."""
    return conv3x3_triton(xq, wq, out_scale)


@fp8_conv3x3.register_fake
def _(xq: torch.Tensor, wq: torch.Tensor, out_scale: torch.Tensor) -> torch.Tensor:
    n, _, h, w = xq.shape
    return xq.new_empty([n, h, w, wq.shape[0]], dtype=torch.bfloat16).permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------------------------------------
# The module


def fp8_eligible(conv: MPConv) -> bool:
    """Whether an MPConv is swapped for FP8Conv: a 1x1 or 3x3 convolution with channel counts that suit the FP8
    matrix units (input a multiple of 32, output of 16)."""
    shape = tuple(conv.weight.shape[2:])
    return shape in ((1, 1), (3, 3)) and conv.in_channels % 32 == 0 and conv.out_channels % 16 == 0


class FP8Conv(MPConv):
    """MPConv for sampling with FP8 matrix products (module docstring): same parameter (the float weight, shared
    with the MPConv it replaces, so state-dict keys and `parameters()` are unchanged), same forward(x, gain).
    `emulate`: fp8_conv_emulated (any device) instead of the kernels. Weights loaded into the module afterwards
    are quantized again at the next eager call; a compiled network keeps the weights it was compiled with."""

    def __init__(self, conv: MPConv, emulate: bool = False, act_scale: str = "dynamic", conv3x3: str = "triton"):
        torch.nn.Module.__init__(self)
        if not fp8_eligible(conv):
            raise ValueError(f"FP8Conv: needs a 1x1 or 3x3 convolution with input channels a multiple of 32 and "
                             f"output channels of 16, got {conv.extra_repr()}")
        if act_scale not in ACT_SCALES:
            raise ValueError(f"act_scale must be one of {', '.join(ACT_SCALES)}, got {act_scale!r}")
        if conv3x3 not in CONV3X3_IMPLS:
            raise ValueError(f"conv3x3 must be one of {', '.join(CONV3X3_IMPLS)}, got {conv3x3!r}")
        self.in_channels = conv.in_channels
        self.out_channels = conv.out_channels
        self.weight = conv.weight
        self._cache = None
        self.emulate = emulate
        self.act_scale = act_scale
        self.conv3x3 = conv3x3
        self.register_buffer("weight_fp8", torch.empty(0, dtype=E4M3), persistent=False)
        self.register_buffer("weight_scale", torch.empty(0), persistent=False)
        self._quantized_key: tuple | None = None
        self.quantize_()

    def to_mpconv(self) -> MPConv:
        """The plain MPConv with this module's weight (the reference path)."""
        conv = MPConv.__new__(MPConv)
        torch.nn.Module.__init__(conv)
        conv.in_channels, conv.out_channels, conv.weight, conv._cache = (
            self.in_channels, self.out_channels, self.weight, None)
        return conv

    def _weight_key(self) -> tuple:
        return (self.weight.data_ptr(), self.weight._version, self.weight.device)

    @torch.no_grad()
    def quantize_(self) -> None:
        """Quantize Eq. 47's weight (gain 1) per output channel, stored [O, kh*kw*C] (K ordered (ky, kx, c), as the
        NHWC activations are laid out)."""
        w = normalize(self.weight.to(torch.float32))
        w = w / math.sqrt(w[0].numel())
        q, scale = quantize_weight(w)
        self.weight_fp8 = q.permute(0, 2, 3, 1).reshape(q.shape[0], -1).contiguous()
        self.weight_scale = scale
        self._quantized_key = self._weight_key()

    def _weight_oihw(self) -> torch.Tensor:
        k = self.weight.shape[-1]
        return self.weight_fp8.view(self.out_channels, k, k, self.in_channels).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1) -> torch.Tensor:
        if not torch.compiler.is_compiling() and self._weight_key() != self._quantized_key:
            self.quantize_()
        if torch.is_tensor(gain):
            gain = gain.to(torch.float32)
        w_scale = self.weight_scale * gain
        x_scale = activation_scale(x, self.act_scale)
        xq = quantize_activation(x, x_scale)
        if self.emulate:
            y = fp8_conv_emulated(xq, self._weight_oihw(), x_scale * w_scale)
        elif self.weight.shape[-1] == 1:
            y = fp8_conv1x1_scaled_mm(xq, self.weight_fp8, x_scale, w_scale)
        elif self.conv3x3 == "im2col":
            y = fp8_conv3x3_im2col(xq, self.weight_fp8, x_scale, w_scale)
        else:
            y = fp8_conv3x3(xq, self.weight_fp8, x_scale * w_scale)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        mode = "emulated" if self.emulate else ("scaled_mm" if self.weight.shape[-1] == 1 else self.conv3x3)
        return f"{super().extra_repr()}, fp8 e4m3 ({mode}), act_scale={self.act_scale}"


def swap_fp8(net: torch.nn.Module, mode: str = "on", act_scale: str = "dynamic", conv3x3: str = "triton") -> int:
    """Put FP8Conv in place of every eligible MPConv of `net` (mode 'on': the kernels; 'emulate': the emulation),
    or back to MPConv (mode 'off'); in place. Returns the number of FP8 convolutions afterwards."""
    if mode not in FP8_MODES:
        raise ValueError(f"fp8 must be one of {', '.join(FP8_MODES)}, got {mode!r}")
    count = 0
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if not isinstance(child, MPConv):
                continue
            if mode == "off":
                if isinstance(child, FP8Conv):
                    setattr(module, name, child.to_mpconv())
                continue
            if not fp8_eligible(child):
                continue
            emulate = mode == "emulate"
            if isinstance(child, FP8Conv):
                if (child.emulate, child.act_scale, child.conv3x3) == (emulate, act_scale, conv3x3):
                    count += 1
                    continue
                child = child.to_mpconv()
            setattr(module, name, FP8Conv(child, emulate=emulate, act_scale=act_scale, conv3x3=conv3x3))
            count += 1
    return count
