"""Generation with every solver and schedule: settings checked once, honest evaluation counts, per-seed noise
independent of the batch and of the number of processes, and the command-line options of generate.py and
calculate_metrics.py gen."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import ROOT
from test_generate import FAST, _pngs, _run, _tiny_net, files  # noqa: F401 (fixture)

from edm2.generation import generate_batch
from edm2.guidance import SamplerStats
from edm2.model_files import load_network
from edm2.sampling import SamplingOptionError, sampling_settings
from edm2.solvers import SOLVERS

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny networks: one thread is faster

STOCHASTIC = [("euler_ancestral", {"eta": 1.0}), ("dpmpp_2m_sde", {"eta": 1.0}), ("dpmpp_3m_sde", {"eta": 0.8}),
              ("heun", {"S_churn": 10.0}), ("euler", {"S_churn": 10.0})]


@pytest.fixture(scope="module")
def nets():
    return _tiny_net(0), _tiny_net(2, model_channels=8, label_dim=0)


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_counted_evaluations_are_the_ones_made(nets, solver):
    net, uncond = nets
    kwargs = dict(num_steps=5, guidance=1.8, guidance_interval=(0.05, 10.0))
    settings = sampling_settings(solver, **kwargs)
    stats = SamplerStats()
    images = generate_batch(net, [0, 1, 2], gnet=uncond, stats=stats, settings=settings)
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.uint8
    assert (stats.net_evals, stats.gnet_evals) == (settings.evals.net_evals, settings.evals.gnet_evals)
    expected_main = 9 if solver == "heun" else 5
    assert stats.net_evals == expected_main and 0 < stats.gnet_evals < stats.net_evals  # the interval cuts some


def test_heun_settings_give_the_sampler_images(nets):
    from edm2.sampler import edm_sampler
    from edm2.seeds import seed_noise_and_labels

    net, _ = nets
    noise, labels, gens = seed_noise_and_labels([4, 5], [3, 16, 16], 10, None, "cpu")
    x = edm_sampler(net, noise, labels, num_steps=4, S_churn=20, randn_like=gens.randn_like, dtype=torch.float32)
    from training.encoders import StandardRGBEncoder

    expected = StandardRGBEncoder().decode(x)
    got = generate_batch(net, [4, 5], settings=sampling_settings("heun", 4, S_churn=20.0))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("solver,options", STOCHASTIC)
def test_stochastic_solvers_depend_on_the_seed_not_the_batch(nets, solver, options):
    net, _ = nets
    settings = sampling_settings(solver, 5, schedule="log_linear", **options)
    whole = generate_batch(net, [0, 1, 2, 3], settings=settings).int()
    parts = torch.cat([generate_batch(net, [0], settings=settings), generate_batch(net, [1, 2, 3], settings=settings)])
    diff = (whole - parts.int()).abs()
    assert diff.max() <= 1 and (diff != 0).float().mean() <= 0.005  # batched float32 kernels round differently
    ode = {k: 0.0 for k in options}  # the same solver without injected noise gives other images: noise is used
    assert (generate_batch(net, [0, 1, 2, 3], settings=sampling_settings(solver, 5, schedule="log_linear", **ode))
            .int() != whole).float().mean() > 0.3


def test_schedules_and_an_explicit_list(nets):
    net, _ = nets
    listed = sampling_settings("dpmpp_2m", None, schedule=[80, 5, 1, 0.1, 0.01])
    assert listed.num_steps == 5 and listed.evals.total_evals == 5
    assert listed.sigmas().tolist() == pytest.approx([80, 5, 1, 0.1, 0.01, 0])
    karras = sampling_settings("dpmpp_2m", 5)
    assert generate_batch(net, [1], settings=listed).ne(generate_batch(net, [1], settings=karras)).any()
    log = sampling_settings("euler", 4, schedule="log_linear", sigma_min=0.01, sigma_max=10)
    assert log.sigmas().tolist() == pytest.approx([10, 1, 0.1, 0.01, 0])


@pytest.mark.parametrize(
    "kwargs,option",
    [
        (dict(solver="nope"), "solver"),
        (dict(solver="dpmpp_2m", num_steps=0), "num_steps"),
        (dict(solver="euler_ancestral", eta=-0.5), "eta"),
        (dict(solver="dpmpp_2m_sde", solver_type="rk4"), "solver_type"),
        (dict(solver="dpmpp_2m", schedule=[1, 2, 0.5]), "schedule"),
        (dict(solver="dpmpp_2m", schedule="cosine"), "schedule"),
        (dict(solver="heun", num_steps=4, schedule=[3, 2, 1]), "num_steps"),
        (dict(solver="dpmpp_2m", S_churn=5), "S_churn"),
        (dict(solver="heun", S_churn=-1), "S_churn"),
        (dict(solver="heun", sigma_min=0), "sigma_min"),
        (dict(solver="heun", guidance_interval=(3, 1)), "guidance_interval"),
    ],
)
def test_bad_settings_name_the_option(kwargs, option):
    with pytest.raises(SamplingOptionError) as info:
        sampling_settings(**kwargs)
    assert info.value.option == option


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--sampler", "nope"], "'--sampler'"),
        (["--sampler", "dpmpp_2m", "--steps", "0"], "'--steps'"),
        (["--sampler", "euler_ancestral", "--eta", "-1"], "'--eta'"),
        (["--sampler", "dpmpp_2m", "--eta", "0.5"], "'--eta'"),
        (["--sampler", "euler", "--solver-type", "heun"], "'--solver-type'"),
        (["--sampler", "dpmpp_2m_sde", "--s-churn", "5"], "'--s-churn'"),
        (["--sampler", "dpmpp_2m", "--s-max", "5"], "'--s-max'"),
        (["--sampler", "dpmpp_2m", "--s-noise", "0.5"], "'--s-noise'"),
        (["--schedule", "80,10,20"], "'--schedule'"),
        (["--schedule", "80,x"], "'--schedule'"),
        (["--schedule", "80,10,1", "--steps", "7"], "'--steps'"),
        (["--schedule", "80,10,1", "--sigma-min", "0.01"], "'--sigma-min'"),  # the list sets every level
        (["--schedule", "80,10,1", "--sigma-max", "40"], "'--sigma-max'"),
        (["--schedule", "log_linear", "--rho", "5"], "'--rho'"),
        (["--steps", "0"], "'--steps'"),
        (["--s-churn", "-2"], "'--s-churn'"),
    ],
)
def test_cli_bad_solver_options(files, tmp_path, args, fragment):
    r = _run("--net", files["net"], "--outdir", tmp_path / "never", "--no-progress", *args)
    assert r.exit_code == 2 and fragment in r.output and "Traceback" not in r.output, r.output
    assert len([line for line in r.output.splitlines() if line.startswith("Error")]) == 1
    assert not (tmp_path / "never").exists()
    import calculate_metrics

    r = CliRunner().invoke(calculate_metrics.main, ["gen", "--net", str(files["net"]), "--ref", "none.npz", *args])
    assert r.exit_code == 2 and fragment in r.output and "Traceback" not in r.output, r.output


def test_cli_solver_matches_the_library(files, tmp_path):
    r = _run("--net", files["net"], "--seeds", "3-6", "--batch", "4", "--outdir", tmp_path, "--sampler",
             "dpmpp_2m_sde", "--eta", "0.7", "--solver-type", "heun", "--s-noise", "0.9", "--schedule", "log_linear",
             *FAST)
    assert r.exit_code == 0, r.output
    assert "6 network evaluations per image" in r.output
    settings = sampling_settings("dpmpp_2m_sde", 6, schedule="log_linear", eta=0.7, solver_type="heun", s_noise=0.9)
    expected = generate_batch(load_network(files["net"]).net, [3, 4, 5, 6], settings=settings)
    np.testing.assert_array_equal(_pngs(tmp_path, [3, 4, 5, 6]), expected.permute(0, 2, 3, 1).numpy())


def test_torchrun_stochastic_solver_two_processes_match_one(files, tmp_path):
    args = ["generate.py", "--net", files["net"], "--gnet", files["gnet"], "--guidance", "1.5", "--seeds", "0-4",
            "--batch", "2", "--sampler", "dpmpp_3m_sde", "--schedule", "80,20,5,1,0.2,0.02", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    args = [str(a) for a in args]

    def launch(nproc: int, name: str) -> str:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args,
               "--outdir", str(tmp_path / name)]
        p = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
        return p.stdout

    out1, out2 = launch(1, "one"), launch(2, "two")
    assert "Generated 5 images" in out1 and "Generated 5 images" in out2 and "2 processes" in out2
    for seed in range(5):
        one, two = (tmp_path / name / f"{seed:06d}.png" for name in ("one", "two"))
        assert one.read_bytes() == two.read_bytes()
