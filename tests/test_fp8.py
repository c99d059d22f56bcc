"""FP8 sampling (accel/fp8.py): the quantization, the emulated FP8 convolution against the float one, a whole network
with FP8 convolutions against the float network, the kernel paths that run on the CPU (torch._scaled_mm for 1x1
and im2col 3x3; the Triton implicit-GEMM kernel in Triton's interpreter) against the emulation, and the clear
errors where FP8 cannot run. On a GPU, benchmarks/bench_fp8.py --parts check,accuracy compares the compiled kernels.

Tolerances (relative L2 errors; e4m3 keeps 3 mantissa bits, so one rounding errs by up to 2^-4 relative and by
about 2^-4 / sqrt(3) = 0.036 RMS when the mantissa is uniform):
- one convolution against float32: below 0.05 (two quantized operands; measured 0.036-0.037);
- a small network's denoiser output D (bf16 with FP8 convolutions against float32): below 0.05 over the batch
  (measured 0.021; bf16 alone 0.003) and below 0.15 for every sample (measured up to 0.092 at sigma 20, where D is
  mostly the network's output; bf16 alone 0.014);
- the sampler's final latents (4 Heun steps, same noise), FP8 against bf16: below 0.15 (measured 0.076; bf16
  against float32 0.011): random weights at unit gains are far rougher functions than trained networks;
- a kernel against the emulation: within one bf16 rounding (2^-8 relative, plus 2^-7 in Triton's interpreter,
  which truncates float32 to bf16 instead of rounding to nearest).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import run_in_triton_interpreter

import edm2
from accel import FP8Conv, resolve_speed_plan
from accel import fp8
from networks.mp import MPConv

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _net(seed: int = 0) -> edm2.Precond:
    """A small latent-like network whose inner convolutions all qualify for FP8 (channels multiples of 32)."""
    torch.manual_seed(seed)
    net = edm2.Precond(img_resolution=8, img_channels=4, label_dim=10, model_channels=32, channel_mult=[1, 2],
                       num_blocks=1, attn_resolutions=[4])
    with torch.no_grad():  # non-zero gains, so that every layer shapes the output
        for name, p in net.named_parameters():
            if name.endswith("gain"):
                p.fill_(1.0)
    return net.eval()


def test_quantization_round_trip_and_saturation():
    torch.manual_seed(0)
    # Values that e4m3 holds exactly survive unchanged; 1000 saturates to 448 (the bare cast would give NaN).
    exact = torch.tensor([0.0, 1.0, -1.5, 2**-9, 448.0, -448.0, 0.875, 240.0, 1000.0, -1e6])
    one = fp8.activation_scale(exact, "unit")
    q = fp8.quantize_activation(exact, one)
    assert q.dtype == torch.float8_e4m3fn and float(one) == 1.0
    assert q.float().tolist() == [0.0, 1.0, -1.5, 2**-9, 448.0, -448.0, 0.875, 240.0, 448.0, -448.0]
    # Random values with the dynamic scale: amax lands on 448, every normal value within half a step (2^-4
    # relative), subnormals within half the smallest step (2^-10 times the scale).
    x = torch.randn(4096) * 3
    s = fp8.activation_scale(x, "dynamic")
    assert float(s) == pytest.approx(float(x.abs().max()) / 448, rel=1e-6)
    q = fp8.quantize_activation(x, s).float()
    assert float(q.abs().max()) == 448.0
    err = (q * s - x).abs()
    normal = x.abs() / s >= 2**-6
    assert bool((err[normal] <= x.abs()[normal] * 2**-4 * (1 + 1e-6)).all())
    assert bool((err[~normal] <= s * 2**-10 * (1 + 1e-6)).all())
    assert float(fp8.activation_scale(torch.zeros(8))) > 0  # an all-zero input quantizes to zeros, not NaN
    assert fp8.quantize_activation(torch.zeros(8), fp8.activation_scale(torch.zeros(8))).float().abs().sum() == 0
    with pytest.raises(ValueError, match="act_scale must be one of dynamic, unit"):
        fp8.activation_scale(x, "static")


def test_per_channel_weight_scales():
    torch.manual_seed(1)
    w = torch.randn(4, 8, 3, 3)
    w[0] *= 1e-3
    w[2] *= 1e3
    w[3] = 0
    q, scale = fp8.quantize_weight(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (4,) and scale.dtype == torch.float32
    amax = w.abs().flatten(1).amax(1)
    assert torch.allclose(scale[:3], amax[:3] / 448) and float(scale[3]) == 1.0
    deq = q.float() * scale.view(-1, 1, 1, 1)
    for o in range(3):  # each channel uses the whole range, whatever its magnitude: same relative error
        assert float(q[o].float().abs().max()) == 448.0
        assert rel(deq[o], w[o]) < 0.05
    assert float(deq[3].abs().sum()) == 0


@pytest.mark.parametrize("k", [1, 3])
def test_emulated_conv_against_float_conv(k):
    torch.manual_seed(2)
    x = torch.randn(4, 64, 8, 8)
    w = torch.randn(96, 64, k, k) / (64 * k * k) ** 0.5
    xs = fp8.activation_scale(x)
    q, ws = fp8.quantize_weight(w)
    y = fp8.fp8_conv_emulated(fp8.quantize_activation(x, xs), q, xs * ws, torch.float32)
    ref = F.conv2d(x, w, padding=k // 2)
    assert 0.01 < rel(y, ref) < 0.05  # really quantized, and within what 3 mantissa bits allow
    # The same products exactly: the float conv of the dequantized operands.
    deq = F.conv2d(fp8.quantize_activation(x, xs).float() * xs, q.float() * ws.view(-1, 1, 1, 1), padding=k // 2)
    assert torch.allclose(y, deq, rtol=1e-5, atol=1e-5)


def test_module_swap_keeps_parameters_and_state_dict():
    net = _net()
    keys = list(net.state_dict())
    params = [id(p) for p in net.parameters()]
    plan = resolve_speed_plan("cpu", fp8="emulate")
    assert plan.fp8 == "emulate" and plan.kernels == "fast"
    plan.apply(net)
    convs = [m for m in net.modules() if isinstance(m, FP8Conv)]
    plain = [m for m in net.modules() if type(m) is MPConv]
    # Every 1x1 / 3x3 convolution but the first (5 input channels) and the last (4 output channels); linear layers
    # stay float.
    assert len(convs) == 33 and all(isinstance(m, MPConv) for m in convs)
    assert {m.weight.ndim for m in plain} == {2, 4} and sum(m.weight.ndim == 4 for m in plain) == 2
    assert list(net.state_dict()) == keys and [id(p) for p in net.parameters()] == params
    assert "fp8 e4m3 (emulated), act_scale=dynamic" in repr(convs[0])
    resolve_speed_plan("cpu").apply(net)  # fp8 off: back to MPConv
    assert not any(isinstance(m, FP8Conv) for m in net.modules())
    assert [id(p) for p in net.parameters()] == params


@pytest.mark.parametrize("act_scale", ["dynamic", "unit"])
def test_network_with_fp8_convolutions_against_float(act_scale):
    net = _net()
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * 2
    sigma = torch.tensor([0.05, 0.5, 2.0, 20.0])
    labels = torch.eye(10)[:4]
    bf16, q8 = copy.deepcopy(net), copy.deepcopy(net)
    bf16.precision = q8.precision = "bf16"
    assert fp8.swap_fp8(q8, "emulate", act_scale=act_scale) == 33
    with torch.no_grad():
        ref, yb, y8 = net(x, sigma, labels), bf16(x, sigma, labels), q8(x, sigma, labels)
    assert y8.dtype == torch.float32 and bool(torch.isfinite(y8).all())
    assert rel(y8, ref) < 0.05 and rel(y8, yb) > 2 * rel(yb, ref)  # the FP8 products are in use
    assert max(rel(y8[i], ref[i]) for i in range(4)) < 0.15


def test_weights_loaded_later_are_quantized_again():
    net = _net()
    fp8.swap_fp8(net, "emulate")
    conv = net.unet.enc["8x8_block0"].conv_res0
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        before = conv(x)
        net.load_state_dict(_net(seed=1).state_dict())
        after = conv(x)
        fresh = FP8Conv(conv.to_mpconv(), emulate=True)(x)
    assert not torch.equal(before, after) and torch.equal(after, fresh)


def test_kernel_paths_on_cpu_match_the_emulation():
    """torch._scaled_mm runs on the CPU too: the 1x1 path and the im2col 3x3 path against the emulation."""
    torch.manual_seed(4)
    for k, impl in ((1, "triton"), (3, "im2col")):
        conv = MPConv(64, 48, kernel=[k, k])
        x = torch.randn(2, 64, 5, 7).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        gain = torch.tensor(0.7)
        with torch.no_grad():
            y = FP8Conv(conv, conv3x3=impl)(x, gain)
            e = FP8Conv(conv, emulate=True)(x, gain)
        assert y.dtype == torch.bfloat16 and y.shape == (2, 48, 5, 7)
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert bool(((y.float() - e.float()).abs() <= e.float().abs() * 2**-8 + 1e-6).all())


TRITON_CHECK = r"""
import json, torch
from accel import fp8
from accel.fp8 import FP8Conv
from networks.mp import MPConv
torch.manual_seed(5)
out = {}
for n, c, h, w, o in ((2, 32, 5, 7, 16), (1, 64, 4, 4, 48), (3, 96, 3, 6, 160)):
    conv = MPConv(c, o, kernel=[3, 3])
    x = torch.randn(n, c, h, w).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = FP8Conv(conv)(x, 1.3)
        e = FP8Conv(conv, emulate=True)(x, 1.3)
    # the emulation rounded to bf16 either way (the interpreter truncates): one bf16 step
    ok = ((y.float() - e.float()).abs() <= e.float().abs() * 2**-7 + 1e-6).all()
    out[f"{n}x{c}x{h}x{w}->{o}"] = dict(ok=bool(ok), cl=y.is_contiguous(memory_format=torch.channels_last),
                                        shape=list(y.shape), dtype=str(y.dtype))
xq = fp8.quantize_activation(torch.randn(2, 32, 4, 4).contiguous(memory_format=torch.channels_last), torch.tensor(0.01))
# the fake (meta) implementation that torch.compile traces: same shape, dtype and strides (test_schema compares
# tensors with allclose, which float8 lacks on the CPU)
torch.library.opcheck(fp8.fp8_conv3x3, (xq, torch.randn(16, 288).to(torch.float8_e4m3fn), torch.rand(16)),
                      test_utils=("test_faketensor",))
out["opcheck"] = True
# torch.compile traces the FP8 modules in one graph (the custom op through its fake implementation, _scaled_mm)
# and, run by aot_eager, gives the eager values; then a whole network with FP8 convolutions.
for k in (1, 3):
    m = FP8Conv(MPConv(64, 32, kernel=[k, k]))
    x = torch.randn(2, 64, 6, 6).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    g = torch.nn.Parameter(torch.tensor(0.5))
    with torch.no_grad():
        out[f"compiled_{k}x{k}"] = torch.equal(m(x, g), torch.compile(m, backend="aot_eager", fullgraph=True)(x, g))
from test_fp8 import _net
net = _net()
net.precision = "bf16"
out["swapped"] = fp8.swap_fp8(net, "on")
x, sigma, labels = torch.randn(2, 4, 8, 8), torch.tensor([0.5, 5.0]), torch.eye(10)[:2]
with torch.no_grad():
    out["compiled_net"] = torch.equal(net(x, sigma, labels), torch.compile(net, backend="aot_eager")(x, sigma, labels))
print("RESULT " + json.dumps(out))
"""


def test_triton_conv3x3_in_the_interpreter_matches_the_emulation_and_compiles():
    result = run_in_triton_interpreter(TRITON_CHECK)
    assert result.pop("opcheck") is True
    compiled = [result.pop(k) for k in ("compiled_1x1", "compiled_3x3", "swapped", "compiled_net")]
    assert compiled == [True, True, 33, True]
    assert len(result) == 3
    for name, r in result.items():
        assert r == dict(ok=True, cl=True, shape=r["shape"], dtype="torch.bfloat16"), name


def test_fp8_errors_name_the_option(monkeypatch):
    with pytest.raises(ValueError, match=r"^fp8 needs a CUDA GPU of compute capability 8.9 or newer .*not cpu"):
        resolve_speed_plan("cpu", fp8="on")
    with pytest.raises(ValueError, match="^fp8: the reference kernels never use FP8"):
        resolve_speed_plan("cpu", kernels="reference", fp8="emulate")
    with pytest.raises(ValueError, match="^fp8 must be one of off, on, emulate, got 'yes'"):
        resolve_speed_plan("cpu", fp8="yes")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="^fp8 needs a CUDA GPU .*CUDA is not available here"):
            resolve_speed_plan("cuda", fp8="on")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A10")
    with pytest.raises(ValueError, match=r"^fp8 needs a GPU of compute capability 8.9 .*NVIDIA A10 is 8.6"):
        resolve_speed_plan("cuda", fp8="on")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    plan = resolve_speed_plan("cuda", fp8="on", compile=False)
    assert plan.fp8 == "on" and plan.kernels == "fast"
    with pytest.raises(ValueError, match="FP8Conv: needs a 1x1 or 3x3 convolution"):
        FP8Conv(MPConv(5, 32, kernel=[3, 3]))


def _cli(module: str, *args) -> tuple[int, str]:
    from click.testing import CliRunner

    main = __import__(module).main
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's error")
def test_cli_fp8_errors_before_loading(tmp_path):
    missing = tmp_path / "missing.safetensors"  # fp8 is refused before the network is looked for
    for module, args in (
        ("generate", ["--net", missing, "--outdir", tmp_path / "out", "--precision", "fp8"]),
        ("calculate_metrics", ["gen", "--net", missing, "--ref", tmp_path / "ref.npz", "--precision", "fp8"]),
    ):
        code, out = _cli(module, *args)
        assert code == 2 and "Invalid value for '--precision': fp8 needs a CUDA GPU of compute capability 8.9" in out
        assert "Traceback" not in out and not (tmp_path / "out").exists()
        code, out = _cli(module, *args, "--kernels", "reference")
        assert code == 2 and "'--precision': fp8: the reference kernels never use FP8" in out, out


def test_sampling_with_emulated_fp8_follows_bf16():
    from edm2.generation import generate_batch, sampling_precision

    assert sampling_precision("fp16", "cuda", "fp8") == "bf16"  # the network runs in bf16 around the FP8 products
    f32 = _net()
    bf16 = copy.deepcopy(f32)
    bf16.precision = "bf16"
    q8 = copy.deepcopy(bf16)
    resolve_speed_plan("cpu", fp8="emulate").apply(q8)
    kw = dict(seeds=[0, 1, 2, 3], encoder=_Identity(), num_steps=4)
    a, b, ref = generate_batch(bf16, **kw), generate_batch(q8, **kw), generate_batch(f32, **kw)
    assert a.shape == b.shape == (4, 4, 8, 8)
    # Final latents of this random-weight network: FP8 against bf16 measured 0.076 (bf16 against float32: 0.011).
    assert rel(b, a) < 0.15 and rel(b, ref) > 2 * rel(a, ref)


class _Identity:
    """An encoder that returns the latents themselves (decode), to compare the sampler's outputs."""

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x
