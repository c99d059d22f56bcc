"""ScaleLong skip scaling: coefficients per skip, LS gates, 'none' = the reference network, bad input,
instruments in the training loop, train_edm2 options and the experiment's figures."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import build_reference_net

from networks import Precond
from networks.skip_scaling import SEGate, SkipScaling, TokenGate, cs_coefficients
from networks.unet import UNet

TINY_UNET = dict(model_channels=16, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=16)
TINY_UVIT = dict(arch="uvit", model_channels=32, depth=5, patch_size=4, mlp_ratio=2, channels_per_head=16)


def tiny(arch: str = "edm2-unet", **kw) -> Precond:
    torch.manual_seed(0)
    base = TINY_UNET if arch == "edm2-unet" else TINY_UVIT
    return Precond(16, 3, 4, **base, **kw)


def capture_skips(net: Precond, x: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """index -> (raw skip, scaled skip) from one forward."""
    seen = {}
    h = net.backbone.skip_scale.register_forward_hook(
        lambda m, a, o: seen.__setitem__(int(a[1]), (a[0].detach(), o.detach()))
    )
    net(x, 1.0, torch.arange(x.shape[0]) % 4)
    h.remove()
    return seen


# --- coefficients ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["edm2-unet", "uvit"])
@pytest.mark.parametrize("mode,kappa", [("cs", 0.6), ("cs", 0.9), ("inv_sqrt2", 0.7)])
def test_cs_coefficient_of_every_skip(arch, mode, kappa):
    net = tiny(arch, skip_scaling=mode, kappa=kappa).eval()
    seen = capture_skips(net, torch.randn(2, 3, 16, 16))
    n = net.backbone.skip_scale.num_skips
    assert sorted(seen) == list(range(1, n + 1)) and n == (6 if arch == "edm2-unet" else 2)
    for i, (raw, scaled) in seen.items():
        expected = kappa ** (i - 1) if mode == "cs" else 1 / math.sqrt(2)
        assert net.backbone.skip_scale.coefficient(i) == pytest.approx(expected)
        torch.testing.assert_close(scaled, raw * expected)
    assert cs_coefficients(4, 0.5) == [1, 0.5, 0.25, 0.125]


def test_skip_one_is_the_outermost_unet_skip():
    """Skip 1 is the first encoder output (joined to the last decoder block); skip n the last one."""
    net = tiny(skip_scaling="cs", kappa=0.5).eval()
    enc = list(net.unet.enc.values())
    outs = {}
    hooks = [enc[0].register_forward_hook(lambda m, a, o: outs.__setitem__("first", o)),
             enc[-1].register_forward_hook(lambda m, a, o: outs.__setitem__("last", o))]  # fmt: skip
    seen = capture_skips(net, torch.randn(2, 3, 16, 16))
    for h in hooks:
        h.remove()
    n = max(seen)
    torch.testing.assert_close(seen[1][0], outs["first"])
    torch.testing.assert_close(seen[n][0], outs["last"])
    assert seen[1][0].shape[-1] == 16 and seen[n][0].shape[-1] == 4  # outermost at full resolution


def test_skip_one_is_the_outermost_uvit_skip():
    net = tiny("uvit", skip_scaling="cs", kappa=0.5).eval()
    outs = {}
    net.uvit.in_blocks[0].register_forward_hook(lambda m, a, o: outs.__setitem__("first", o))
    seen = capture_skips(net, torch.randn(2, 3, 16, 16))
    torch.testing.assert_close(seen[1][0], outs["first"])


# --- 'none' is the paper's network -------------------------------------------------------------------------


def test_none_leaves_the_reference_network_unchanged(ref):
    x, sigma, labels = (torch.from_numpy(ref[k]) for k in ("x", "sigma", "labels"))
    out = torch.from_numpy(ref["out_D"]).double()
    for kwargs in (dict(skip_scaling="none"), dict(skip_scaling="cs", kappa=1.0)):
        net = build_reference_net(ref, **kwargs)  # strict load: the same state-dict keys
        assert net.backbone is net.unet
        with torch.no_grad():
            D = net(x, sigma, labels).double()
        assert float((D - out).abs().max() / out.abs().max()) < 1e-5
    scaled = build_reference_net(ref, skip_scaling="inv_sqrt2")
    with torch.no_grad():
        assert float((scaled(x, sigma, labels).double() - out).abs().max() / out.abs().max()) > 1e-3


def test_none_adds_no_parameters_and_returns_the_skip_itself():
    a, b = tiny(), tiny(skip_scaling="none")
    assert list(a.state_dict()) == list(b.state_dict())
    s = torch.randn(2, 4, 3, 3)
    assert b.unet.skip_scale(s, 1) is s
    assert sum(p.numel() for p in tiny(skip_scaling="cs").parameters()) == sum(p.numel() for p in a.parameters())


def test_ls_networks_share_every_other_initial_weight():
    a, b = tiny(), tiny(skip_scaling="ls_nonshared")
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) < set(sb) and all(k.startswith("unet.skip_scale.gates.") for k in set(sb) - set(sa))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# --- LS gates --------------------------------------------------------------------------------------------


def test_se_gate_shapes_and_range():
    gate = SEGate(64, reduction=16)
    assert gate.squeeze.weight.shape == (4, 64) and gate.excite.weight.shape == (64, 4)
    g = gate(torch.randn(3, 64, 8, 8), channel_dim=1)
    assert g.shape == (3, 64, 1, 1) and bool(((g > 0) & (g < 1)).all())
    g = gate(torch.randn(3, 10, 64), channel_dim=2)
    assert g.shape == (3, 1, 64)
    assert SEGate(8, reduction=16).squeeze.weight.shape == (4, 8)  # at least four hidden units


def test_ls_channel_sharing_per_width_and_per_skip():
    unet_ls = tiny(skip_scaling="ls_channel").unet.skip_scale
    unet_ns = tiny(skip_scaling="ls_channel_nonshared").unet.skip_scale
    widths = unet_ls.skip_channels
    assert len(unet_ls.gates) == len(set(widths)) == 2 and len(unet_ns.gates) == len(widths) == 6
    for i, c in enumerate(widths):  # every skip's gate has its width
        assert unet_ls.gates[unet_ls.gate_index[i]].excite.out_channels == c
    assert len(tiny("uvit", skip_scaling="ls_channel").uvit.skip_scale.gates) == 1  # U-ViT: one shared gate
    assert len(tiny("uvit", skip_scaling="ls_channel_nonshared").uvit.skip_scale.gates) == 2


def test_token_gate_shapes_and_range():
    gate = TokenGate(65, reduction=16)
    assert gate.squeeze.weight.shape == (4, 65) and gate.excite.weight.shape == (65, 4)
    g = gate(torch.randn(3, 65, 32), channel_dim=2)
    assert g.shape == (3, 65, 1) and bool(((g > 0) & (g < 1)).all())  # one coefficient per token
    g = TokenGate(64, reduction=16)(torch.randn(3, 32, 8, 8), channel_dim=1)
    assert g.shape == (3, 1, 8, 8)  # feature maps: one coefficient per position


def test_ls_token_gates_sharing_and_shapes():
    """U-ViT: `ls` is one gate over all L = extra tokens + patches, `ls_nonshared` one per skip (as the
    reference); the U-Net shares per resolution."""
    for label_dim, tokens in ((10, 2 + 16), (0, 1 + 16)):  # 16x16 images, 4x4 patches: 16 patch tokens
        shared = Precond(16, 3, label_dim, **TINY_UVIT, skip_scaling="ls").uvit.skip_scale
        per_skip = Precond(16, 3, label_dim, **TINY_UVIT, skip_scaling="ls_nonshared").uvit.skip_scale
        assert len(shared.gates) == 1 and shared.gate_index == [0, 0] and shared.gates[0].positions == tokens
        assert len(per_skip.gates) == 2 and per_skip.gates[0] is not per_skip.gates[1]
    unet_ls, unet_ns = tiny(skip_scaling="ls").unet.skip_scale, tiny(skip_scaling="ls_nonshared").unet.skip_scale
    assert unet_ls.skip_positions == [256, 256, 64, 64, 16, 16]
    assert len(unet_ls.gates) == 3 and len(unet_ns.gates) == 6
    for i, n in enumerate(unet_ls.skip_positions):
        assert unet_ls.gates[unet_ls.gate_index[i]].positions == n
    net = tiny("uvit", skip_scaling="ls")
    for raw, scaled in capture_skips(net, torch.randn(2, 3, 16, 16)).values():
        ratio = scaled / raw  # the same factor for every channel of a token
        assert torch.allclose(ratio, ratio[:, :, :1].expand_as(ratio), rtol=1e-5)
        assert float(ratio[:, :, 0].std()) > 0


def test_token_gate_equals_the_reference_attentionlayer():
    """The reference's Attentionlayer (zero biases, this gate's effective weights) on the same skips:
    tests/data/NOTES.md says how the stored gates were made."""
    ref = np.load(pathlib.Path(__file__).parent / "data" / "scalelong_reference_gates.npz")
    skips = torch.from_numpy(ref["skips"])
    gate = TokenGate(skips.shape[2], int(ref["reduction"]))
    with torch.no_grad():
        gate.squeeze.weight.copy_(torch.from_numpy(ref["raw_w1"]))
        gate.excite.weight.copy_(torch.from_numpy(ref["raw_w2"]))
    assert torch.allclose(gate.squeeze.effective_weight(), torch.from_numpy(ref["w1"]), rtol=0, atol=1e-6)
    assert torch.allclose(gate.excite.effective_weight(), torch.from_numpy(ref["w2"]), rtol=0, atol=1e-6)
    scaler = SkipScaling("ls", [skips.shape[3]] * 2, ls_reduction=int(ref["reduction"]), channel_dim=2,
                         skip_positions=[skips.shape[2]] * 2)
    scaler.gates[0].load_state_dict(gate.state_dict())
    with torch.no_grad():
        for i in range(2):
            g = gate(skips[i], channel_dim=2)
            assert g.shape == ref["gates"][i].shape
            assert float((g - torch.from_numpy(ref["gates"][i])).abs().max()) < 1e-6
            assert float((scaler(skips[i], i + 1) - skips[i] * torch.from_numpy(ref["gates"][i])).abs().max()) < 1e-6


@pytest.mark.parametrize("arch", ["edm2-unet", "uvit"])
def test_version_1_ls_files_load_as_the_per_channel_gate(tmp_path, arch):
    import safetensors.torch

    from edm2.model_files import HEADER_KEY, load_network, save_network

    net = tiny(arch, skip_scaling="ls_channel").eval()
    path = tmp_path / "old.safetensors"
    save_network(path, net)
    tensors = safetensors.torch.load_file(path)
    with safetensors.safe_open(path, framework="pt") as f:
        header = json.loads(f.metadata()[HEADER_KEY])
    header.update(format_version=1, init_kwargs=dict(header["init_kwargs"], skip_scaling="ls"))  # as written then
    safetensors.torch.save_file(tensors, path, metadata={HEADER_KEY: json.dumps(header)})
    loaded = load_network(path)
    assert loaded.net.init_kwargs["skip_scaling"] == "ls_channel"
    assert loaded.meta["init_kwargs"]["skip_scaling"] == "ls_channel"
    x, sigma, labels = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 2.0]), torch.eye(4)[:2]
    with torch.no_grad():
        assert torch.equal(loaded.net.eval()(x, sigma, labels), net(x, sigma, labels))
    save_network(tmp_path / "new.safetensors", tiny(arch, skip_scaling="ls"))  # version 2 keeps 'ls'
    assert load_network(tmp_path / "new.safetensors").net.init_kwargs["skip_scaling"] == "ls"


@pytest.mark.parametrize("arch", ["edm2-unet", "uvit"])
@pytest.mark.parametrize("mode", ["ls", "ls_nonshared", "ls_channel", "ls_channel_nonshared"])
def test_ls_gates_get_gradients(arch, mode):
    net = tiny(arch, skip_scaling=mode).train()
    with torch.no_grad():
        net.backbone.out_gain.fill_(1)  # let the loss reach the network (the gain starts at 0)
    x = torch.randn(2, 3, 16, 16)
    seen = capture_skips(net, x)
    for raw, scaled in seen.values():
        ratio = scaled / raw
        assert bool(((ratio > 0) & (ratio < 1)).all())  # a sigmoid gate
    D = net(x, torch.tensor([0.5, 2.0]), torch.tensor([0, 3]))
    D.square().mean().backward()
    for gate in net.backbone.skip_scale.gates:
        for p in gate.parameters():
            assert p.grad is not None and bool(torch.isfinite(p.grad).all())
        assert float(gate.excite.weight.grad.abs().max()) > 0 and float(gate.squeeze.weight.grad.abs().max()) > 0


def test_ls_gate_gradient_matches_finite_differences():
    torch.manual_seed(1)
    scaler = SkipScaling("ls", [8, 8], ls_reduction=4, skip_positions=[16, 16])
    skip, w = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    param = scaler.gates[0].excite.weight

    def f() -> torch.Tensor:
        return (scaler(skip, 1) * w).sum()

    f().backward()
    eps, idx = 1e-2, (3, 1)
    with torch.no_grad():
        param[idx] += eps
        up = f()
        param[idx] -= 2 * eps
        down = f()
        param[idx] += eps
    assert float(param.grad[idx]) == pytest.approx(float(up - down) / (2 * eps), rel=2e-2, abs=1e-4)


# --- bad input --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(skip_scaling="half"), "skip_scaling must be one of"),
        (dict(skip_scaling="cs", kappa=0.0), "kappa must be a number in"),
        (dict(skip_scaling="cs", kappa=1.5), "kappa must be a number in"),
        (dict(skip_scaling="cs", kappa=float("nan")), "kappa must be a number in"),
        (dict(ls_reduction=0), "ls_reduction"),
        (dict(depth=5), "apply to arch 'uvit' only"),
    ],
)
def test_bad_skip_scaling_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)
    with pytest.raises(ValueError, match="arch must be one of"):
        Precond(16, 3, 0, arch="vit")


def test_ls_on_a_network_without_long_skips():
    with pytest.raises(ValueError, match="needs long skip connections"):
        Precond(16, 3, 0, **dict(TINY_UVIT, depth=1), skip_scaling="ls")
    from networks.uvit import UViT

    with pytest.raises(ValueError, match="needs long skip connections"):
        UViT(16, 3, 0, model_channels=32, depth=5, patch_size=4, long_skips=False, skip_scaling="ls_nonshared")
    with pytest.raises(ValueError, match="apply to arch 'edm2-unet' only"):
        Precond(16, 3, 0, **TINY_UVIT, num_blocks=2)
    with pytest.raises(ValueError, match="unknown constructor argument"):
        Precond(16, 3, 0, skip_scale="cs")
    assert UNet(16, 3, 0, **TINY_UNET, skip_scaling="cs").skip_scale.num_skips == 6


def test_train_edm2_options(tmp_path):
    import train_edm2

    def dry(*args):
        return CliRunner().invoke(
            train_edm2.main, ["--outdir", str(tmp_path), "--data", "demo", "--preset", "demo", "--dry-run", *args]
        )

    r = dry("--arch", "uvit", "--skip-scaling", "cs", "--kappa", "0.8")
    assert r.exit_code == 0, r.output
    net = json.loads(r.output)["network"]
    assert (net["arch"], net["skip_scaling"], net["kappa"], net["depth"]) == ("uvit", "cs", 0.8, 7)
    Precond(**net)  # the dry-run configuration builds
    for args, message in [
        (("--skip-scaling", "ls", "--kappa", "0.8"), "--kappa applies to --skip-scaling cs only"),
        (("--skip-scaling", "cs", "--kappa", "0"), "0<x<=1"),
        (("--skip-scaling", "half"), "'half' is not one of"),
        (("--arch", "unet3"), "'unet3' is not one of"),
    ]:
        r = dry(*args)
        assert r.exit_code != 0 and message in r.output, r.output


# --- instruments in the training loop ----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["edm2-unet", "uvit"])
def test_instruments_in_stats_jsonl(tmp_path, arch):
    from training.demo_data import write_demo_dataset
    from training.instruments import instrument_keys, read_stats
    from training.config import TrainingConfig
    from training.training_loop import training_loop

    c = TrainingConfig(duration=48, batch=8, batch_gpu=4, status=16, snapshot=0, checkpoint=0, workers=0)
    c.data = write_demo_dataset(str(tmp_path / "demo.zip"), num_images=64, resolution=16)
    c.network = (dict(TINY_UNET) if arch == "edm2-unet" else dict(TINY_UVIT)) | dict(skip_scaling="cs", kappa=0.5)
    c.lr.rampup_img = 8
    torch.set_num_threads(1)
    training_loop(str(tmp_path / "run"), c)
    entries = read_stats(str(tmp_path / "run"))
    assert [e["nimg"] for e in entries] == [16, 32, 48]  # a status line every 16 images, each instrumented
    keys = instrument_keys(entries)
    n = 6 if arch == "edm2-unet" else 2
    assert sum(k.endswith("/feat_rms") and k.startswith("skips/") for k in keys) == n
    stages = [k for k in keys if k.startswith("stages/") and k.endswith("/param_grad_norm")]
    assert len(stages) == (6 if arch == "edm2-unet" else 5)
    for e in entries:
        assert all(set(keys) <= set(e) and math.isfinite(e[k]) and e[k] >= 0 for k in keys)
        for i in range(1, n + 1):
            assert e[f"skips/{i:02d}/scale"] == pytest.approx(0.5 ** (i - 1), rel=1e-5)
            assert 0.5 < e[f"skips/{i:02d}/feat_rms"] < 2  # magnitude-preserving features
    assert entries[-1]["grad_norm"] > 0 and entries[-1]["skips/01/grad_norm"] > 0


def test_instruments_measure_only_armed_steps():
    from training.instruments import SkipInstruments

    net = tiny(skip_scaling="inv_sqrt2").train()
    inst = SkipInstruments(net)
    x = torch.randn(2, 3, 16, 16)
    inst.arm(False)
    net(x, 1.0).square().mean().backward()
    assert inst.collect() == {}
    inst.arm(True)
    net.zero_grad()
    first = {}
    h = net.unet.enc["16x16_conv"].register_forward_hook(lambda m, a, o: first.__setitem__("x", o.detach()))
    D = net(x, 1.0)
    h.remove()
    assert len(net.unet.skip_scale._forward_hooks) == 1
    D.square().mean().backward()
    out = inst.collect()
    assert out["skips/03/scale"] == pytest.approx(1 / math.sqrt(2), rel=1e-5)
    assert out["skips/01/feat_rms"] == pytest.approx(float(first["x"].square().mean().sqrt()), rel=1e-5)
    assert not net.unet.skip_scale._forward_hooks  # hooks are gone after collect


# --- the experiment's figures ----------------------------------------------------------------------------


def _experiment_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "scalelong", os.path.join(os.path.dirname(__file__), "..", "experiments", "scalelong.py")
    )
    sl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sl)
    return sl


def test_experiment_reaches_its_own_final_negative_loss():
    # A loss still falling at the end has its minimum smoothed value last; the run reaches it there (1.00x).
    sl = _experiment_module()
    entries = [{"nimg": 16 * t, "loss": -2.0 - 0.01 * t} for t in range(1, 41)]
    target = sl.run_figures(entries, None)["final_smoothed_loss"]
    assert target < 0 and sl.run_figures(entries, target)["images_to_none_final_loss"] == 16 * 40


def test_experiment_figures_and_outputs(tmp_path):
    sl = _experiment_module()
    assert sl.mean_abs_log_step(np.array([1.0, 2.0, 1.0, 2.0])) == pytest.approx(math.log(2))
    assert sl.log_std(np.array([3.0, 3.0, 3.0])) == 0
    rng = np.random.default_rng(0)
    for mode, wobble in (("none", 0.5), ("cs", 0.1)):
        run = tmp_path / f"uvit-{mode}"
        run.mkdir()
        with open(run / "stats.jsonl", "w") as f:
            for t in range(1, 41):
                g = math.exp(wobble * (-1) ** t)
                e = {"nimg": 16 * t, "loss": 1 / t + 0.01 * rng.random(), "grad_norm": g, "skips/01/grad_norm": g,
                     "skips/01/feat_rms": 1.0, "skips/01/scale": 1.0 if mode == "none" else 0.5,
                     "stages/out0/feat_rms": 1 + wobble * t / 40}  # fmt: skip
                f.write(json.dumps(e) + "\n")
    results = sl.analyze(str(tmp_path))
    figs = results["backbones"]["uvit"]["modes"]
    assert figs["none"]["grad_norm_osc"] == pytest.approx(1.0) and figs["cs"]["grad_norm_osc"] == pytest.approx(0.2)
    assert figs["cs"]["sum_sq_skip_scale"] == pytest.approx(0.25) and figs["none"]["speedup_vs_none"] == 1.0
    for name in ("scalelong.json", "scalelong.md", "scalelong.png"):
        assert (tmp_path / name).stat().st_size > 100
    with open(tmp_path / "uvit-cs" / "stats.jsonl", "a") as f:
        f.write('{"nimg": 6')  # a kill in the middle of a status line: left out
    assert sl.analyze(str(tmp_path))["backbones"]["uvit"]["modes"]["cs"]["grad_norm_osc"] == pytest.approx(0.2)
    with open(tmp_path / "uvit-cs" / "stats.jsonl", "a") as f:
        f.write("\n")  # the cut line is followed by another: now a damaged file, one line naming it
    r = CliRunner().invoke(sl.cli, ["analyze", "--outdir", str(tmp_path)])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    assert "uvit-cs/stats.jsonl: line 41 is not a status entry (a JSON object)" in r.output, r.output
    r = CliRunner().invoke(sl.cli, ["run", "--outdir", str(tmp_path / "scalelong.json")])  # once FileExistsError
    assert r.exit_code == 2 and "Invalid value for '--outdir'" in r.output and "is a file" in r.output, r.output
    for option in ("--kappa", "--time-limit"):  # nan passed click's range: every run then failed or ran unlimited
        r = CliRunner().invoke(sl.cli, ["run", "--outdir", str(tmp_path / "new"), option, "nan"])
        assert r.exit_code == 2 and f"Invalid value for '{option}'" in r.output, r.output
    assert not (tmp_path / "new").exists()


def test_tensorboard_export(tmp_path):
    pytest.importorskip("tensorboard")
    from training.instruments import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "stats.jsonl").write_text(json.dumps({"nimg": 64, "loss": 1.0, "skips/01/feat_rms": 0.9}) + "\n")
    with pytest.raises(SystemExit) as e:
        main(["tensorboard", str(run)])
    assert e.value.code == 0 and any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())


def test_experiment_runs_end_to_end_on_the_cpu(tmp_path):
    # The experiment in CI size: two real training runs of the U-ViT, then the analysis of their stats.
    script = os.path.join(os.path.dirname(__file__), "..", "experiments", "scalelong.py")
    cmd = [sys.executable, script, "run", "--outdir", str(tmp_path), "--setting", "cpu", "--backbones", "uvit",
           "--modes", "none,ls", "--duration", "96", "--batch", "32", "--status", "32"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "scalelong.json").read_text())["backbones"]["uvit"]
    assert results["common_images"] == 96 and set(results["modes"]) == {"none", "ls"}
    # The seed's per-token gates are sigmoids: every skip is scaled below 1, the unscaled run keeps 1 per skip.
    assert results["modes"]["none"]["sum_sq_skip_scale"] == pytest.approx(results["modes"]["none"]["num_skips"])
    assert results["modes"]["ls"]["sum_sq_skip_scale"] < results["modes"]["ls"]["num_skips"]
    assert (tmp_path / "scalelong.png").stat().st_size > 100


def test_experiment_runs_carry_the_instruments():
    # The GPU setting's runs are long enough to compile, which turns the instruments off unless asked for.
    sl = _experiment_module()
    command = sl.train_command("r", "d.zip", "edm2-unet", "cs", dict(sl.SETTINGS["gpu"]), 0.7, 0)
    assert "--instruments" in command and command[command.index("--kappa") + 1] == "0.7"


@pytest.mark.parametrize("name", ["scalelong", "ablation"])
def test_experiment_runs_find_a_relative_outdir_from_any_working_directory(tmp_path, monkeypatch, name):
    """The runs start in the repository (cwd=ROOT); a relative --outdir / --rundir given from elsewhere must still
    name the user's folder for them (it named ROOT/runs/..., so `train_edm2.py` found no data)."""
    import importlib.util

    path = pathlib.Path(__file__).resolve().parents[1] / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_cwd", path)
    experiment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(experiment)
    started = []

    class Finished:
        returncode = 0

        def poll(self) -> int:
            return 0

    def popen(command, cwd, **kwargs):
        started.append((command, cwd))
        return Finished()

    monkeypatch.setattr(experiment.subprocess, "Popen", popen)
    monkeypatch.setattr(experiment.time, "sleep", lambda seconds: None)
    monkeypatch.chdir(tmp_path)
    settings = dict(experiment.SETTINGS["cpu"], num_images=4)
    if name == "scalelong":
        experiment.train_all("runs", [("edm2-unet", "none")], settings, 0.7, 0)
    else:
        experiment.train_all("runs", ["g"], settings, 0)
    ((command, cwd),) = started
    assert cwd != str(tmp_path)
    run_dir = pathlib.Path(cwd, command[command.index("--outdir") + 1]).resolve()
    data = pathlib.Path(cwd, command[command.index("--data") + 1]).resolve()
    assert run_dir.parent == (tmp_path / "runs").resolve() and run_dir.is_dir()
    assert data == (tmp_path / "runs" / "demo-data.zip").resolve() and data.is_file()
