"""accel/: the speed plan's resolution, what applying it changes in a network (exactly the attention and dropout
modules, the input layout; never a parameter), and that the network it gives computes the reference's function."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import edm2
from accel import FastDropout, FusedCosineAttention, SpeedPlan, resolve_speed_plan
from accel.kernels import kernels_available
from networks import CosineAttention, Dropout

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny networks: one thread is faster

BOOLS = ("channels_last", "fused_step", "fast_dropout", "fused_attention")


def test_cpu_resolves_to_the_reference_everywhere():
    plan = resolve_speed_plan("cpu")
    assert plan == SpeedPlan(compile=False, kernels="reference", channels_last=False, fused_step=False,
                             fast_dropout=False, fused_attention=False, grad_sync="ddp", cudnn_benchmark=True,
                             cuda=False)  # fmt: skip
    assert resolve_speed_plan(torch.device("cpu"), 2, compile=True).grad_sync == "flat"  # compiled: flat
    assert resolve_speed_plan("cpu", 2, compile=True, grad_sync="ddp").grad_sync == "ddp"
    fast = resolve_speed_plan("cpu", kernels="fast")  # fused attention; the Triton kernels only where they run
    assert fast.fused_attention and not fast.channels_last
    assert fast.fused_step == fast.fast_dropout == kernels_available("cpu")
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.compile = True  # type: ignore[misc]


def test_cuda_defaults_to_the_fast_kernels():
    plan = resolve_speed_plan("cuda", compile=True)  # resolving touches no GPU
    assert plan.kernels == "fast" and plan.cuda and plan.channels_last and plan.fused_attention
    assert plan.fused_step == plan.fast_dropout == kernels_available("cuda")
    ref = resolve_speed_plan("cuda", kernels="reference", cudnn_benchmark=False)
    assert not any(getattr(ref, k) for k in BOOLS) and not ref.cudnn_benchmark


def test_compiled_by_default_where_the_fast_kernels_run(monkeypatch):
    import accel

    assert not resolve_speed_plan("cpu").compile and not resolve_speed_plan("cpu", kernels="fast").compile
    monkeypatch.setattr(accel, "kernels_available", lambda device: torch.device(device).type == "cuda")
    assert resolve_speed_plan("cuda").compile  # fast kernels on CUDA with Triton: compiled
    assert not resolve_speed_plan("cuda", kernels="reference").compile  # the reference runs eagerly
    assert not resolve_speed_plan("cuda", compile=False).compile  # --no-compile
    assert resolve_speed_plan("cpu", compile=True).compile  # asked for: honoured
    monkeypatch.setattr(accel, "kernels_available", lambda device: False)  # CUDA without Triton
    assert not resolve_speed_plan("cuda").compile


def test_training_compiles_runs_long_enough_to_pay(monkeypatch):
    import accel
    from training.config import TrainingConfig
    from training.training_loop import COMPILE_MIN_STEPS, speed_plan

    monkeypatch.setattr(accel, "kernels_available", lambda device: torch.device(device).type == "cuda")
    cuda = torch.device("cuda")
    long_run = TrainingConfig(duration=COMPILE_MIN_STEPS * 64, batch=64)
    short_run = dataclasses.replace(long_run, duration=(COMPILE_MIN_STEPS - 1) * 64)
    assert speed_plan(long_run, cuda, 1).compile and not speed_plan(short_run, cuda, 1).compile
    assert speed_plan(dataclasses.replace(short_run, compile=True), cuda, 1).compile  # asked for
    assert not speed_plan(dataclasses.replace(long_run, compile=False), cuda, 1).compile
    assert not speed_plan(long_run, torch.device("cpu"), 1).compile
    # The logs say why a plan is not compiled.
    assert speed_plan(long_run, cuda, 1).not_compiled_because == ""
    because = f"fewer than {COMPILE_MIN_STEPS} steps (--compile compiles)"
    assert speed_plan(short_run, cuda, 1).not_compiled_because == because
    assert speed_plan(short_run, cuda, 1).grad_sync == "ddp"  # the uncompiled default, not the compiled plan's
    assert speed_plan(dataclasses.replace(long_run, compile=False), cuda, 1).not_compiled_because == "turned off"
    assert speed_plan(long_run, torch.device("cpu"), 1).not_compiled_because == "no CUDA device"
    reference = dataclasses.replace(long_run, kernels="reference")
    assert speed_plan(reference, cuda, 1).not_compiled_because == "reference kernels"


def test_gpus_triton_cannot_serve_run_the_reference_uncompiled(monkeypatch):
    import accel.kernels as kernels

    if kernels.triton is None:
        pytest.skip("Triton is not installed")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 0))  # Pascal
    assert not kernels.kernels_available("cuda")
    plan = resolve_speed_plan("cuda")
    assert not plan.compile and not plan.fused_step and not plan.fast_dropout
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # Hopper
    assert kernels.kernels_available("cuda") and resolve_speed_plan("cuda").compile


def test_compile_cache_outlives_tmp(monkeypatch, tmp_path):
    from accel import compile_cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert compile_cache_dir() == str(tmp_path / "cache" / "edm2" / "torchinductor")
    assert compile_cache_dir() == str(tmp_path / "cache" / "edm2" / "torchinductor")  # set once, kept
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "shared"))  # the user's choice wins
    assert compile_cache_dir() == str(tmp_path / "shared")


def test_sampling_compiles_only_where_it_pays(monkeypatch):
    import accel
    import edm2.generation as generation

    monkeypatch.setattr(accel, "kernels_available", lambda device: torch.device(device).type == "cuda")
    plan, few, many = generation.sampling_plan, generation.COMPILE_MIN_IMAGES - 1, generation.COMPILE_MIN_IMAGES
    assert plan("cuda", num_images=many).compile and plan("cuda").compile  # the plan's default on CUDA
    assert not plan("cuda", num_images=few).compile
    assert plan("cuda", num_images=few).not_compiled_because.startswith(f"fewer than {few + 1} images per process")
    assert plan("cuda", compile=True, num_images=few).compile  # asked for
    assert plan("cuda", compile=False, num_images=many).not_compiled_because == "turned off"
    assert plan("cpu", num_images=many).not_compiled_because == "no CUDA device"
    assert plan("cuda", reference=True).not_compiled_because == "reference kernels"
    # The Speed: line of generate.py and of the training log.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/cache")
    compiled = "kernels fast, compiled (cache in /cache; the first batch waits)"
    assert plan("cuda").describe("the first batch waits") == compiled
    assert plan("cpu").describe("unused") == "kernels reference, not compiled: no CUDA device"
    with pytest.raises(ValueError, match="drop compile"):
        plan("cuda", compile=True, reference=True)
    # What prepare_for_sampling applies is that plan (on the CPU: the reference kernels, uncompiled).
    seen = []
    real = generation.sampling_plan
    monkeypatch.setattr(generation, "sampling_plan", lambda *a: seen.append(a) or real(*a))
    generation.prepare_for_sampling(tiny(), num_images=few)
    assert seen == [(torch.device("cpu"), None, False, few, False)]
    assert generation.images_per_process(range(100), 32) == 100  # one process samples every batch


@pytest.mark.parametrize("kwargs,message", [
    (dict(kernels="x"), "kernels must be 'fast' or 'reference', got 'x'"),
    (dict(grad_sync="grouped"), "grad_sync must be 'ddp' or 'flat', got 'grouped'"),
    (dict(grad_sync="overlap"), "grad_sync must be 'ddp' or 'flat', got 'overlap'"),
    (dict(compile="yes"), "compile must be true or false"),
    (dict(compile=1), "compile must be true or false"),
    (dict(cudnn_benchmark=None), "cudnn_benchmark must be true or false"),
    (dict(world_size=0), "world_size must be a positive integer"),
])  # fmt: skip
def test_bad_values_name_the_option(kwargs, message):
    with pytest.raises(ValueError, match=message):
        resolve_speed_plan("cpu", **kwargs)


def test_training_config_errors_name_the_option():
    import dataclasses

    from training.config import TrainingConfig
    from training.training_loop import TrainingError, speed_plan

    config = TrainingConfig()
    assert config.kernels is None and "fused_step" not in config.to_dict() and "ddp_overlap" not in config.to_dict()
    with pytest.raises(TrainingError, match="--kernels: kernels must be 'fast' or 'reference', got 'x'"):
        speed_plan(dataclasses.replace(config, kernels="x"), torch.device("cpu"), 1)
    with pytest.raises(TrainingError, match="--grad-sync: grad_sync must be"):
        speed_plan(dataclasses.replace(config, grad_sync="grouped"), torch.device("cpu"), 2)
    assert speed_plan(dataclasses.replace(config, compile=True), torch.device("cpu"), 2).grad_sync == "flat"
    with pytest.raises(TrainingError, match="--kernels"):  # checked with the rest, before a run directory is made
        dataclasses.replace(config, data="data.zip", kernels="turbo").validate(1)


def tiny(arch: str = "edm2-unet", dropout: float = 0.0) -> edm2.Precond:
    torch.manual_seed(0)
    kwargs = (dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8, 4], channels_per_head=8)
              if arch == "edm2-unet" else dict(arch="uvit", model_channels=16, depth=3, channels_per_head=8))
    net = edm2.Precond(img_resolution=8, img_channels=3, label_dim=4, dropout=dropout, **kwargs)
    with torch.no_grad():  # gains away from their zero init, so that every branch reaches the output
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(1.0)
    return net


def inputs():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 8, 8, generator=gen)
    return x, torch.tensor([0.1, 1.0, 10.0]), torch.eye(4)[[0, 2, 3]]


@pytest.mark.parametrize("arch", ["edm2-unet", "uvit"])
def test_apply_swaps_exactly_the_attention_and_dropout_modules(arch):
    net = tiny(arch, dropout=0.1)
    before = dict(net.named_modules())
    state = {k: v.clone() for k, v in net.state_dict().items()}
    plan = dataclasses.replace(resolve_speed_plan("cpu", kernels="fast"), fast_dropout=True)
    assert plan.apply(net) is net
    after = dict(net.named_modules())
    assert after.keys() == before.keys()
    swapped = {name for name in after if after[name] is not before[name]}
    assert swapped == {n for n, m in before.items() if isinstance(m, (CosineAttention, Dropout))} and swapped
    for name in swapped:
        fast = FusedCosineAttention if isinstance(before[name], CosineAttention) else FastDropout
        assert isinstance(after[name], fast)
        assert {k: v for k, v in vars(after[name]).items() if not k.startswith("_")} == {
            k: v for k, v in vars(before[name]).items() if not k.startswith("_")}  # num_heads / p / training kept
    assert net.state_dict().keys() == state.keys()  # parameterless: no state-dict keys added
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    resolve_speed_plan("cpu").apply(net)  # and back to the reference's modules
    swappable = [m for m in net.modules() if isinstance(m, (CosineAttention, Dropout))]
    assert swappable and all(type(m) in (CosineAttention, Dropout) for m in swappable)
    assert {type(m) for m in net.modules()} == {type(m) for m in before.values()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("arch", ["edm2-unet", "uvit"])
def test_network_after_a_plan_computes_the_reference_function(arch):
    x, sigma, labels = inputs()
    reference = tiny(arch)
    fast = dataclasses.replace(resolve_speed_plan("cpu", kernels="fast"), channels_last=True).apply(tiny(arch))
    assert any(isinstance(m, FusedCosineAttention) for m in fast.modules())
    outs, grads = [], []
    for net in (reference, fast):
        net.zero_grad()
        out = net(x, sigma, labels)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
    assert rel_err(outs[1], outs[0]) < 1e-5 and rel_err(grads[1], grads[0]) < 1e-5
    assert not torch.equal(outs[1], outs[0])  # other kernels: rounded differently, not a no-op


def test_channels_last_input_hook_is_added_once_and_removed():
    net = tiny()
    plan = dataclasses.replace(resolve_speed_plan("cpu"), channels_last=True)
    plan.apply(net, weights_channels_last=False)
    plan.apply(net, weights_channels_last=False)
    assert len(net.unet._forward_pre_hooks) == 1
    seen = []
    net.unet.enc["8x8_conv"].register_forward_pre_hook(lambda m, a: seen.append(a[0].stride(1) == 1))
    with torch.no_grad():
        net(*inputs())
    assert seen == [True]  # the backbone's input (with its constant channel) reaches the first conv as NHWC
    resolve_speed_plan("cpu").apply(net)
    assert not net.unet._forward_pre_hooks


def test_post_step_and_distribute_follow_the_plan():
    from accel import PostStep

    net = tiny()
    plan = resolve_speed_plan("cpu")
    opt = plan.adam(net, lr=0.01)
    post = plan.post_step(net, opt)
    assert isinstance(post, PostStep) and not post.fused
    assert plan.distribute(net, torch.device("cpu"), 1) == (net, None)
    assert plan.compile_for_training(net) is net and plan.compile_for_sampling(net) is net


def test_prepare_for_sampling_goes_through_the_plan():
    from edm2.generation import prepare_for_sampling

    net = tiny()
    assert prepare_for_sampling(net, channels_last=True) is net and not net.training
    assert len(net.unet._forward_pre_hooks) == 1 and not any(p.requires_grad for p in net.parameters())
    prepare_for_sampling(net, reference=True)
    assert not net.unet._forward_pre_hooks
    assert not any(isinstance(m, FusedCosineAttention) for m in net.modules())


def test_old_options_resume(tmp_path):
    """An options file written before issue 23 (with the removed speed keys) does not block a resume."""
    from training.run_dir import config_differences
    from training.config import TrainingConfig

    new = TrainingConfig().to_dict()
    old = {k: v for k, v in new.items() if k != "kernels"}
    old.update(channels_last=None, fused_step=None, batched_weights=True, fast_dropout=None, ddp_overlap=False,
               grad_sync="grouped")
    assert config_differences(old, new) == []
    assert json.loads(json.dumps(new))["kernels"] is None


def test_networks_never_import_the_speed_layer():
    """networks/ is the reference network alone: no import of accel/, Triton or a speed switch by name."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "networks"
    for path in sorted(root.glob("*.py")):
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [m for m in names if m.split(".")[0] in ("accel", "triton")], path
        text = path.read_text()
        for switch in ("batched_weights", "fast_dropout", "reference_order", "graph_breaks", "channels_last = "):
            assert switch not in text, (path, switch)


def test_accel_is_packaged():
    """An installed (non-editable) project must ship the speed layer that training and sampling import."""
    import pathlib
    import tomllib

    pyproject = tomllib.loads((pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert "accel*" in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]


def test_fused_attention_keeps_the_layout_and_the_reference_values():
    """FusedCosineAttention: the reference's values and gradients within float rounding, channels-last in and out
    (the CUDA layout: no transposes into the neighbouring convolutions), contiguous in and out otherwise."""
    gen = torch.Generator().manual_seed(2)
    qkv = torch.randn(2, 3 * 4 * 8, 6, 5, generator=gen)
    g = torch.randn(2, 4 * 8, 6, 5, generator=gen)
    results = []
    cases = [(CosineAttention(4), torch.contiguous_format), (FusedCosineAttention(4), torch.channels_last),
             (FusedCosineAttention(4), torch.contiguous_format)]
    for module, layout in cases:
        x = qkv.contiguous(memory_format=layout).requires_grad_(True)
        y = module(x)
        assert y.is_contiguous(memory_format=layout)
        (grad,) = torch.autograd.grad(y, x, g)
        results.append((y.detach(), grad))
    for y, grad in results[1:]:
        assert rel_err(y, results[0][0]) < 1e-5 and rel_err(grad, results[0][1]) < 1e-5
