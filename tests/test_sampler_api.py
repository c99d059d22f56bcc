"""The sampler API of issue 23 (docs/design.md §7): settings checked once where they enter the library, guidance as a
denoiser wrapper checked at construction, edm_sampler as a thin layer over settings, the shared command-line
options of edm2/cli.py, and the sampling precision chosen with the device."""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner

import edm2.guidance as guidance_module
import edm2.phema_reconstruct as phema_reconstruct
import edm2.sampling as sampling_module
from edm2 import schedules, solvers
from edm2.generation import generate_batch, load_for_sampling
from edm2.guidance import GuidedDenoiser, SamplerStats
from edm2.phema_reconstruct import StdList, parse_std_list
from edm2.sampler import count_evaluations, edm_sampler, edm_settings, evaluation_sigmas, step_sigmas
from edm2.sampling import SamplingOptionError, sampling_settings
from networks import Precond
from training.model_files import save_network

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny networks: one thread is faster

TINY = dict(img_resolution=8, img_channels=3, label_dim=4, model_channels=8, channel_mult=[1, 2], num_blocks=1,
            attn_resolutions=[4], channels_per_head=8, logvar_channels=8)


class Toy(torch.nn.Module):
    """D = 0.3 + (x - 0.3) / (1 + sigma^2): a stand-in network with the attributes generation reads."""

    def __init__(self, label_dim: int = 0, res: int = 4, channels: int = 2, mean: float = 0.3):
        super().__init__()
        self.label_dim, self.img_resolution, self.img_channels, self.mean = label_dim, res, channels, mean
        self.labels_seen: list = []

    def forward(self, x, sigma, labels=None):
        self.labels_seen.append(labels)
        return self.mean + (x - self.mean) / (1 + sigma.to(x.dtype) ** 2)


def _tiny(seed: int, **overrides) -> Precond:
    torch.manual_seed(seed)
    net = Precond(**{**TINY, **overrides})
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("gain"):
                p.fill_(0.7)
    return net.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("api")
    out = {"net": d / "net.safetensors", "gnet": d / "gnet.safetensors", "fp16": d / "fp16.safetensors"}
    save_network(out["net"], _tiny(0), encoder={"class": "standard_rgb"})
    save_network(out["gnet"], _tiny(1, label_dim=0))
    save_network(out["fp16"], _tiny(2, precision="fp16"), encoder={"class": "standard_rgb"})
    return out


def _counting(monkeypatch, module, name: str) -> list:
    """Replace module.name by a wrapper that records each call's arguments."""
    calls, original = [], getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


# ----------------------------------------------------------------------------------------------------------
# One check per value


def test_generate_checks_guidance_interval_and_fit_once(files, tmp_path, monkeypatch):
    import generate

    weights = _counting(monkeypatch, guidance_module, "check_guidance")
    monkeypatch.setattr(sampling_module, "check_guidance", guidance_module.check_guidance)  # sampling's own name
    intervals = _counting(monkeypatch, guidance_module, "check_guidance_interval")
    monkeypatch.setattr(sampling_module, "check_guidance_interval", guidance_module.check_guidance_interval)
    fits = _counting(monkeypatch, guidance_module, "check_guide_fits")
    schedule_checks = _counting(monkeypatch, schedules, "check_schedule")
    sigma_checks = _counting(monkeypatch, schedules, "check_sigmas")
    monkeypatch.setattr(solvers, "check_sigmas", schedules.check_sigmas)
    churn_checks = _counting(monkeypatch, solvers, "_check_churn")
    args = ["--net", files["net"], "--gnet", files["gnet"], "--guidance", "1.5", "--guidance-interval", "0.1,20",
            "--seeds", "0-4", "--batch", "2", "--steps", "3", "--s-churn", "5", "--outdir", tmp_path / "out",
            "--no-progress"]
    result = CliRunner().invoke(generate.main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "out").iterdir())) == 5  # three batches
    assert len(weights) == 1 and len(intervals) == 1 and len(schedule_checks) == 1  # steps, sigma bounds, rho
    assert len(sigma_checks) == 1 and len(churn_checks) == 1  # the schedule in the state's dtype; churn
    assert sum(isinstance(args[0], torch.nn.Module) for args in fits) == 1  # the networks' fit (the rest: stand-ins)


def test_outstd_is_parsed_and_checked_once(tmp_path, monkeypatch):
    import reconstruct_phema

    net = _tiny(0)
    (tmp_path / "in").mkdir()
    for kimg in (1, 2):
        for std in (0.05, 0.10):
            name = f"network-snapshot-{kimg:07d}-{std:.3f}.safetensors"
            save_network(tmp_path / "in" / name, net, ema_std=std, training_nimg=kimg * 1024)
    checks = _counting(monkeypatch, phema_reconstruct, "check_std")
    args = ["--indir", tmp_path / "in", "--outdir", tmp_path / "out", "--outstd", "0.06,0.07,...,0.09"]
    result = CliRunner().invoke(reconstruct_phema.main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "out").iterdir())) == 4
    assert sum(1 for args in checks if args[1] == "std") == 4  # once per std (the snapshots' headers aside)


def test_std_list_is_checked_once():
    stds = parse_std_list("0.05,0.1")
    assert isinstance(stds, StdList) and stds == (0.05, 0.1)
    assert parse_std_list(stds) is stds  # taken as it is
    assert parse_std_list([0.1, 0.1, 0.05]) == (0.1, 0.05)
    with pytest.raises(ValueError, match="std"):
        parse_std_list([0.1, -1])


# ----------------------------------------------------------------------------------------------------------
# Guidance as a denoiser wrapper


def test_guided_denoiser_from_settings_checks_only_the_networks(monkeypatch):
    settings = sampling_settings("heun", 4, guidance=2.0, guidance_interval=(0.5, 10))
    weights = _counting(monkeypatch, guidance_module, "check_guidance")
    den = GuidedDenoiser.from_settings(Toy(label_dim=3), None, Toy(), settings)
    assert (den.weight, den.interval) == (2.0, (0.5, 10.0)) and not weights
    with pytest.raises(ValueError, match="needs a guiding network"):
        GuidedDenoiser.from_settings(Toy(), None, None, settings)
    with pytest.raises(ValueError, match="gnet img_resolution"):
        GuidedDenoiser.from_settings(Toy(), None, Toy(res=8), settings)
    with pytest.raises(ValueError, match="gnet label_dim"):
        GuidedDenoiser.from_settings(Toy(label_dim=3), None, Toy(label_dim=5), settings)


def test_with_labels_binds_a_batch_without_checking_again(monkeypatch):
    settings = sampling_settings("euler", 3, guidance=1.7)
    net, gnet = Toy(label_dim=3), Toy(label_dim=0)
    den = GuidedDenoiser.from_settings(net, None, gnet, settings)
    fits = _counting(monkeypatch, guidance_module, "check_guide_fits")
    schedule_checks = _counting(monkeypatch, schedules, "check_schedule")
    labels, stats = torch.eye(3)[:2], SamplerStats()
    batch = den.with_labels(labels, stats)
    assert not fits and batch.weight == 1.7 and batch.interval is None and batch.stats is stats
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    expected = GuidedDenoiser.from_networks(net, labels, gnet, 1.7)(x, 3.0)
    torch.testing.assert_close(batch(x, 3.0), expected, rtol=0, atol=0)
    assert net.labels_seen[-1] is labels and gnet.labels_seen[-1] is None  # unconditional guide: no labels
    assert stats == SamplerStats(net_evals=1, gnet_evals=1)
    with pytest.raises(ValueError, match="with_labels"):
        GuidedDenoiser(lambda x, s: x, None).with_labels(labels)


def test_bad_guidance_values_name_the_setting():
    for kwargs, option in [(dict(guidance=math.inf), "guidance"), (dict(guidance="x"), "guidance"),
                           (dict(guidance_interval=(2, 1)), "guidance_interval"),
                           (dict(guidance_interval=[1]), "guidance_interval")]:
        with pytest.raises(SamplingOptionError, match=option) as info:
            sampling_settings("heun", 4, **kwargs)
        assert info.value.option == option


# ----------------------------------------------------------------------------------------------------------
# Settings instead of loose schedule parameters


def test_schedule_functions_take_settings():
    settings = edm_settings(num_steps=5, sigma_min=0.01, sigma_max=20, rho=3)
    assert settings.solver == "heun" and settings.dtype == torch.float64
    assert torch.equal(step_sigmas(settings), schedules.karras(5, 0.01, 20, 3))
    assert evaluation_sigmas(settings) == pytest.approx([20, *sum(([s, s] for s in step_sigmas(settings)[1:-1]
                                                                    .tolist()), [])][:9], rel=1e-12)
    assert count_evaluations(settings) == settings.evals == SamplerStats(net_evals=9)
    assert count_evaluations(settings) is not settings.evals  # a copy: counting into it leaves the settings alone
    # Any solver: the multistep ones evaluate once per noise level of the schedule.
    dpm = sampling_settings("dpmpp_2m", 6, schedule="log_linear", guidance=1.5, guidance_interval=(0.1, 1))
    levels = schedules.log_linear(6, dtype=torch.float32).tolist()[:-1]
    assert evaluation_sigmas(dpm) == levels
    assert count_evaluations(dpm).gnet_evals == sum(0.1 < s <= 1 for s in levels)


def test_edm_sampler_takes_settings_or_the_old_keywords():
    net, gnet = Toy(label_dim=3), Toy(mean=-0.2)
    noise, labels = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0)), torch.eye(3)[:2]
    old = edm_sampler(net, noise, labels, gnet=gnet, guidance=1.8, num_steps=7, guidance_interval=(0.2, 30))
    settings = edm_settings(guidance=1.8, num_steps=7, guidance_interval=(0.2, 30))
    stats = SamplerStats()
    new = edm_sampler(net, noise, labels, gnet, settings, stats=stats)
    assert torch.equal(old, new) and stats == settings.evals
    other = edm_sampler(net, noise, labels, gnet, sampling_settings("dpmpp_2m", 7, guidance=1.8))
    assert other.dtype == torch.float32 and not torch.equal(other, new)
    with pytest.raises(ValueError, match="not both"):
        edm_sampler(net, noise, labels, gnet, settings, num_steps=3)
    with pytest.raises(ValueError, match="SamplingSettings"):
        edm_sampler(net, noise, labels, gnet, 1.8)


def test_generate_batch_with_a_prebuilt_denoiser(files):
    from edm2.model_files import load_network

    net, gnet = load_network(files["net"]).net, load_network(files["gnet"]).net
    settings = sampling_settings("euler", 3, guidance=1.5)
    den = GuidedDenoiser.from_settings(net, None, gnet, settings)
    assert torch.equal(generate_batch(net, [3, 4], gnet, settings=settings, denoiser=den),
                       generate_batch(net, [3, 4], gnet, settings=settings))


# ----------------------------------------------------------------------------------------------------------
# Precision with the device, and the shared command-line options


def test_sampling_precision_is_chosen_with_the_device(files):
    assert load_for_sampling(files["fp16"], "cpu").net.precision == "fp32"  # fp16 only on CUDA
    assert load_for_sampling(files["fp16"], "cpu", "bf16").net.precision == "bf16"
    assert load_for_sampling(files["fp16"], "cpu", "auto").net.precision == "fp32"
    assert load_for_sampling(files["net"], "cpu").net.precision == "fp32"
    assert load_for_sampling(files["net"], "cpu", "fp8").net.precision == "bf16"  # FP8 convolutions, bf16 around
    with pytest.raises(ValueError, match="precision must be one of"):
        load_for_sampling(files["net"], "cpu", "fp64")


def test_cli_options_only_parse_and_name_the_option():
    import click

    from edm2 import cli

    @click.command()
    @cli.model_click_options
    @cli.solver_click_options
    def command(preset, net_path, gnet_path, guidance, guidance_interval, **solver_params):
        net_path, gnet_path, guidance = cli.resolve_model_options(preset, net_path, gnet_path, guidance)
        settings = cli.sampling_settings_from_cli(solver_params, guidance, guidance_interval, gnet_path)
        click.echo(f"{settings.describe()} | {settings.guidance} {settings.guidance_interval}")

    def run(*args):
        return CliRunner().invoke(command, ["--net", "n.safetensors", *args])

    ok = run("--gnet", "g", "--guidance", "2", "--guidance-interval", "0.5,3", "--steps", "4")
    assert ok.exit_code == 0 and "heun, 4 steps" in ok.output and "2.0 (0.5, 3.0)" in ok.output
    for args, option in [(["--guidance-interval", "abc"], "--guidance-interval"),
                         (["--gnet", "g", "--guidance", "2", "--guidance-interval", "3,1"], "--guidance-interval"),
                         (["--guidance", "2"], "--guidance"), (["--guidance", "nan", "--gnet", "g"], "--guidance"),
                         (["--steps", "0"], "--steps"), (["--rho", "-1"], "--rho"),
                         (["--sigma-min", "0"], "--sigma-min"), (["--sigma-max", "inf"], "--sigma-max"),
                         (["--s-churn", "-1"], "--s-churn"), (["--schedule", "80,1,5"], "--schedule"),
                         (["--sampler", "dpmpp_2m", "--s-churn", "1"], "--s-churn")]:
        result = run(*args)
        assert result.exit_code == 2 and f"'{option}'" in result.output and "Traceback" not in result.output, args
    assert cli.bad_option("solver", "x", {"solver": "--solvers"}).param_hint == "'--solvers'"


def test_network_options_check_the_file(files, tmp_path):
    import calculate_metrics

    missing = tmp_path / "missing.safetensors"
    result = CliRunner().invoke(calculate_metrics.main, ["gen", "--net", str(missing), "--ref", "r.npz"])
    assert result.exit_code == 2 and "'--net'" in result.output and "missing.safetensors" in result.output
