"""The sampler API (edm2.schedules, edm2.guidance, edm2.solvers): k-diffusion reference numbers, parity of
sample_heun with edm_sampler, guidance with every solver, per-seed noise, evaluation counts, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import DATA, reference_meta

import edm2
from edm2 import schedules, solvers
from edm2.guidance import GuidedDenoiser, NetworkDenoiser
from edm2.sampler import SamplerStats, count_evaluations, edm_sampler, edm_settings, evaluation_sigmas, step_sigmas
from edm2.seeds import SeedGenerators

KD_NPZ = DATA / "kdiffusion_reference.npz"
# k-diffusion's option names -> this project's (euler and heun use edm_sampler's churn names).
CHURN_NAMES = {"s_churn": "S_churn", "s_tmin": "S_min", "s_tmax": "S_max", "s_noise": "S_noise"}
STOCHASTIC = {
    "euler": {"S_churn": 3.0, "S_min": 0.05, "S_max": 20.0},
    "heun": {"S_churn": 3.0, "S_min": 0.05, "S_max": 20.0, "S_noise": 1.003},
    "euler_ancestral": {"eta": 0.8},
    "dpmpp_2m_sde": {"eta": 1.0},
    "dpmpp_3m_sde": {"eta": 1.0, "s_noise": 0.97},
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny networks: one thread is faster


@pytest.fixture(scope="module")
def kd() -> dict:
    with np.load(KD_NPZ) as d:
        data = {k: d[k] for k in d.files}
    data["meta"] = json.loads(bytes(data.pop("meta_json")))
    return data


def _kd_meta() -> dict:
    with np.load(KD_NPZ) as d:
        return json.loads(bytes(d["meta_json"]))


def gaussian(mu: torch.Tensor | float, sd: float):
    """The exact denoiser of data ~ N(mu, sd^2 I): D(x; s) = (sd^2 x + s^2 mu) / (sd^2 + s^2)."""
    return lambda x, s: (sd**2 * x + s**2 * mu) / (sd**2 + s**2)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _replay(draws: torch.Tensor, used: list):
    """A noise source returning the stored draws in order (counting them)."""
    queue = list(draws)

    def source(x, sigma, sigma_next):
        used.append(float(sigma_next))
        return queue.pop(0).to(x.dtype)

    return source


@pytest.mark.parametrize("key", sorted(_kd_meta()["cases"]))
def test_solvers_match_kdiffusion(kd, key):
    meta, case = kd["meta"], kd["meta"]["cases"][key]
    name = case["function"].removeprefix("sample_")
    options = dict(case["options"])
    if name in ("euler", "heun"):
        options = {CHURN_NAMES[k]: v for k, v in options.items()}
    mu = torch.from_numpy(kd["mu"]).reshape(1, -1, 1, 1)
    den = gaussian(mu, meta["sd"])
    if case["mode"] == "guided":
        guide = gaussian(torch.from_numpy(kd["mu_guide"]).reshape(1, -1, 1, 1), meta["sd_guide"])
        den = GuidedDenoiser(den, guide, meta["weight"], meta["interval"])
    sigmas = torch.from_numpy(kd[f"sigmas_{case['schedule']}"])
    used: list = []
    noise = _replay(torch.from_numpy(kd[key + "/noise"]), used)
    out = solvers.sample(name, den, torch.from_numpy(kd["x0"]) * sigmas[0], sigmas, noise=noise, **options)
    reference = torch.from_numpy(kd[key + "/out"])
    assert out.dtype == torch.float64 and out.shape == reference.shape
    assert _rel(out, reference) < 1e-5
    assert len(used) == case["noise_draws"]  # the same draws, consumed at the same steps
    # The comparison can fail: guidance and noise each move the result far beyond the tolerance.
    other = key.replace("/plain", "/guided") if case["mode"] == "plain" else key.replace("/guided", "/plain")
    assert _rel(torch.from_numpy(kd[other + "/out"]), reference) > 1e-3


def test_schedules(kd):
    for n in (1, 2, 7, 32):
        for dtype in (torch.float64, torch.float32):
            assert torch.equal(schedules.karras(n, dtype=dtype), step_sigmas(edm_settings(num_steps=n, dtype=dtype)))
    torch.testing.assert_close(schedules.karras(32), torch.from_numpy(kd["karras_32"]), rtol=1e-12, atol=0)
    kd_rho3 = torch.from_numpy(kd["karras_10_rho3"])
    torch.testing.assert_close(schedules.karras(10, 0.01, 20, 3), kd_rho3, rtol=1e-12, atol=0)
    log_linear = schedules.log_linear(32)
    torch.testing.assert_close(log_linear, torch.from_numpy(kd["loglinear_32"]), rtol=1e-12, atol=0)
    assert log_linear.dtype == torch.float64 and len(log_linear) == 33 and log_linear[-1] == 0
    ratios = log_linear[1:-1] / log_linear[:-2]
    torch.testing.assert_close(ratios, torch.full_like(ratios, (0.002 / 80) ** (1 / 31)), rtol=1e-12, atol=0)
    assert schedules.log_linear(1).tolist() == [80.0, 0.0]
    assert log_linear[0] == 80 and log_linear[31] == 0.002
    assert schedules.log_linear(4, dtype=torch.float32).dtype == torch.float32
    assert schedules.explicit([3, 2, 0.5]).tolist() == [3.0, 2.0, 0.5, 0.0]
    assert schedules.explicit(torch.tensor([3.0, 1.0, 0.0])).tolist() == [3.0, 1.0, 0.0]
    assert schedules.SCHEDULES["edm"] is schedules.karras
    # Any schedule with any solver: an explicit list gives what the same tensor gives.
    den = gaussian(0.1, 0.5)
    x = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for name in solvers.SOLVERS:
        sig = schedules.log_linear(5, 0.01, 10)
        a = solvers.sample(name, den, x * 10, sig, noise=lambda x, s, t: torch.ones_like(x))
        listed = schedules.explicit(sig[:-1].tolist())
        b = solvers.sample(name, den, x * 10, listed, noise=lambda x, s, t: torch.ones_like(x))
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: schedules.karras(0), "num_steps"),
        (lambda: schedules.karras(4, sigma_min=0), "sigma_min"),
        (lambda: schedules.karras(4, rho=-1), "rho"),
        (lambda: schedules.log_linear(4, 0.5, 0.1), "sigma_max"),
        (lambda: schedules.log_linear(2.5), "num_steps"),
        (lambda: schedules.explicit([1, 2, 0]), "sigmas must be strictly decreasing"),
        (lambda: schedules.explicit([2, 2]), "sigmas must be strictly decreasing"),
        (lambda: schedules.explicit([2, -1]), "sigmas must be positive"),
        (lambda: schedules.explicit([math.inf, 1]), "sigmas must be finite"),
        (lambda: schedules.explicit([]), "sigmas must hold at least one step"),
        (lambda: schedules.explicit(["a"]), "sigmas must be a list of numbers"),
    ],
)
def test_bad_schedules(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _x(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 2, 3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 80


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("plms", {}, "unknown solver 'plms'"),
        ("euler", {"eta": 1.0}, "solver 'euler' has no option 'eta'"),
        ("dpmpp_2m", {"S_churn": 1.0}, "no option 'S_churn'"),
        ("euler_ancestral", {"eta": -0.5}, "eta must be finite and non-negative"),
        ("dpmpp_2m_sde", {"eta": -1}, "eta must be finite and non-negative"),
        ("dpmpp_3m_sde", {"eta": math.nan}, "eta must be finite"),
        ("dpmpp_3m_sde", {"s_noise": -1}, "s_noise must be"),
        ("dpmpp_2m_sde", {"solver_type": "rk4"}, "solver_type must be one of midpoint, heun"),
        ("heun", {"S_churn": -1}, "S_churn must be"),
        ("heun", {"S_min": 5, "S_max": 1}, "S_max must be at least S_min"),
        ("euler", {"S_noise": "x"}, "S_noise must be a number"),
        ("heun", {"dtype": torch.int64}, "dtype must be a floating-point"),
        ("heun", {"noise": 3}, "noise must be a callable"),
    ],
)
def test_bad_solver_options(name, options, match):
    with pytest.raises(ValueError, match=match):
        solvers.sample(name, gaussian(0, 0.5), _x(), schedules.karras(4), **options)


def test_bad_steps_and_sigmas():
    den = gaussian(0, 0.5)
    for name in solvers.SOLVERS:
        assert solvers.SOLVERS[name].min_steps >= 1
        with pytest.raises(ValueError, match=f"steps must be at least 1 for solver '{name}', got 0"):
            solvers.sample(name, den, _x(), torch.tensor([80.0], dtype=torch.float64))
    for bad in ([80.0, 80.0, 0.0], [1.0, 2.0, 0.0], [3.0, -1.0], [3.0, math.nan, 0.0]):
        with pytest.raises(ValueError, match="sigmas must"):
            solvers.sample("dpmpp_2m", den, _x(), torch.tensor(bad, dtype=torch.float64))
    with pytest.raises(ValueError, match="sigmas must be a tensor"):
        solvers.sample_euler(den, _x(), [80.0, 0.0])
    with pytest.raises(ValueError, match=r"x must be a tensor of shape \[N, C, H, W\]"):
        solvers.sample_heun(den, torch.zeros(2, 3, 3), schedules.karras(3))
    # Two noise levels that only float32 merges are caught after the conversion to the state dtype.
    with pytest.raises(ValueError, match="strictly decreasing"):
        solvers.sample_euler(den, _x(), torch.tensor([1.0, 1.0 - 1e-12, 0.0], dtype=torch.float64), dtype=torch.float32)


class ToyNet(torch.nn.Module):
    """A linear 'network': D = a(sigma) x + b(sigma) m, m = the class mean (labels one-hot) or 0.2 (no labels)."""

    def __init__(self, sd: float, class_means: list[float] | None = None, res: int = 3, channels: int = 2):
        super().__init__()
        self.sd, self.img_resolution, self.img_channels = sd, res, channels
        self.class_means = None if class_means is None else torch.tensor(class_means)
        self.label_dim = 0 if class_means is None else len(class_means)
        self.seen_labels: list = []

    def coefficients(self, sigma: torch.Tensor, labels: torch.Tensor | None):
        sigma = sigma.reshape(-1, 1, 1, 1).to(torch.float64)
        m = 0.2 if labels is None else (labels.to(torch.float64) @ self.class_means.double()).reshape(-1, 1, 1, 1)
        return self.sd**2 / (self.sd**2 + sigma**2), sigma**2 / (self.sd**2 + sigma**2) * m

    def forward(self, x, sigma, labels=None):
        assert x.dtype == torch.float32 and sigma.dtype == torch.float32
        self.seen_labels.append(labels)
        a, b = self.coefficients(sigma, labels)
        return a * x + b  # float64 here, cast back to x's dtype by NetworkDenoiser


@pytest.mark.parametrize("name", sorted(solvers.SOLVERS))
def test_guidance_with_every_solver_equals_the_combined_denoiser(name):
    # D_g + w (D - D_g) of two linear denoisers is the linear denoiser with the combined coefficients.
    w, interval = 2.5, (0.3, 8.0)
    mu, mu_g, sd, sd_g = 0.3, -0.4, 0.5, 0.8
    main, guide = gaussian(mu, sd), gaussian(mu_g, sd_g)

    def combined(x, s, inside=lambda s: True):
        if not inside(float(s)):
            return main(x, s)
        a = sd_g**2 / (sd_g**2 + s**2) + w * (sd**2 / (sd**2 + s**2) - sd_g**2 / (sd_g**2 + s**2))
        b = s**2 * mu_g / (sd_g**2 + s**2) + w * (s**2 * mu / (sd**2 + s**2) - s**2 * mu_g / (sd_g**2 + s**2))
        return a * x + b

    sigmas, x = schedules.karras(7), _x(2, seed=3)
    options = STOCHASTIC.get(name, {})

    def run(den):
        return solvers.sample(name, den, x, sigmas, noise=solvers.seed_noise(SeedGenerators([4, 5])), **options)

    everywhere = run(GuidedDenoiser(main, guide, w))
    torch.testing.assert_close(everywhere, run(combined), rtol=1e-10, atol=1e-10)
    den = GuidedDenoiser(main, guide, w, interval)
    in_interval = run(den)
    expected = run(lambda x, s: combined(x, s, lambda v: interval[0] < v <= interval[1]))
    torch.testing.assert_close(in_interval, expected, rtol=1e-10, atol=1e-10)
    plain = run(main)
    assert _rel(in_interval, plain) > 1e-3 and _rel(in_interval, everywhere) > 1e-3
    assert 0 < den.stats.gnet_evals < den.stats.net_evals
    assert den.stats == solvers.count_evaluations(name, sigmas, w, interval, **options)


def test_classifier_free_guidance_with_networks():
    cond, uncond = ToyNet(0.5, [0.4, -0.3, 0.1]), ToyNet(0.7)
    labels = torch.eye(3)[[2, 0]]
    w, sigmas, x = 1.8, schedules.karras(6), _x(2, seed=7)
    den = GuidedDenoiser.from_networks(cond, labels, uncond, guidance=w)
    out = solvers.sample("dpmpp_2m", den, x, sigmas)
    assert all(lab is labels for lab in cond.seen_labels) and all(lab is None for lab in uncond.seen_labels)

    def combined(x, s):
        s = torch.as_tensor(s).to(torch.float32)  # the networks see float32 inputs
        a, b = cond.coefficients(s, labels)
        a_g, b_g = uncond.coefficients(s, None)
        return (a_g + w * (a - a_g)) * x.float().double() + (b_g + w * (b - b_g))

    torch.testing.assert_close(out, solvers.sample("dpmpp_2m", combined, x, sigmas), rtol=1e-5, atol=1e-5)
    assert den.stats == SamplerStats(net_evals=6, gnet_evals=6)
    # A conditional guide (autoguidance) gets the labels too; weight 1 never calls the guide.
    auto = ToyNet(0.6, [0.0, 0.1, 0.2])
    solvers.sample("euler", GuidedDenoiser.from_networks(cond, labels, auto, guidance=2.0), x, sigmas)
    assert len(auto.seen_labels) == 6 and all(lab is labels for lab in auto.seen_labels)
    auto.seen_labels.clear()
    one = GuidedDenoiser.from_networks(cond, labels, auto, guidance=1)
    solvers.sample("heun", one, x, sigmas)
    assert auto.seen_labels == [] and one.stats == SamplerStats(net_evals=11, gnet_evals=0)
    plain = NetworkDenoiser(cond, labels)
    solvers.sample("heun", plain, x.float(), sigmas, dtype=torch.float32)
    assert plain.stats == SamplerStats(net_evals=11)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"guide": None, "weight": 2}, "needs a guiding network"),
        ({"weight": math.nan}, "guidance must be finite"),
        ({"weight": "strong"}, "guidance weight must be a number"),
        ({"interval": (5, 1)}, "guidance_interval"),
        ({"interval": (1,)}, "guidance_interval"),
        ({"guide": NetworkDenoiser(ToyNet(0.5, res=4))}, "gnet img_resolution"),
        ({"guide": NetworkDenoiser(ToyNet(0.5, channels=3))}, "gnet img_channels"),
        ({"guide": NetworkDenoiser(ToyNet(0.5, [0.1, 0.2]))}, "gnet label_dim"),
    ],
)
def test_bad_guidance(kwargs, match):
    args = {"main": NetworkDenoiser(ToyNet(0.5, [0.1, 0.2, 0.3])), "guide": NetworkDenoiser(ToyNet(0.7)),
            "weight": 2.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        GuidedDenoiser(**args)


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_per_seed_noise_is_independent_of_the_batch(name):
    seeds, den, sigmas = [21, 5, 9], gaussian(0.1, 0.5), schedules.karras(8)
    options = STOCHASTIC[name]
    noise = SeedGenerators(seeds).randn([2, 3, 3], dtype=torch.float64) * sigmas[0]
    batch = solvers.sample(name, den, noise, sigmas, noise=solvers.seed_noise(SeedGenerators(seeds)), **options)
    for k, seed in enumerate(seeds):
        single = solvers.sample(
            name, den, noise[k : k + 1], sigmas, noise=solvers.seed_noise(SeedGenerators([seed])), **options
        )
        torch.testing.assert_close(batch[k : k + 1], single, rtol=1e-12, atol=1e-12)
    # The noise matters: other seeds for the same initial state give other images.
    other = solvers.sample(name, den, noise, sigmas, noise=solvers.seed_noise(SeedGenerators([1, 2, 3])), **options)
    assert _rel(other, batch) > 1e-3
    with pytest.raises(ValueError, match="does not match 2 seeds"):
        solvers.sample(name, den, noise, sigmas, noise=solvers.seed_noise(SeedGenerators([1, 2])), **options)
    with pytest.raises(ValueError, match="seed_noise needs an edm2.SeedGenerators"):
        solvers.seed_noise([torch.Generator()])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_heun_reproduces_edm_sampler_bit_for_bit(ref, ref_nets, dtype):
    net, gnet = ref_nets
    settings = reference_meta(ref)["sampler"]
    noise, labels = torch.from_numpy(ref["sampler_noise"]), torch.from_numpy(ref["labels"])
    seeds = list(range(len(noise)))
    cases = [
        {},
        {"gnet": gnet, "guidance": settings["guidance"]},
        {"gnet": gnet, "guidance": 2.0, "guidance_interval": (0.3, 5.0), "S_churn": 10, "S_min": 0.05, "S_max": 20},
    ]
    steps, outputs = settings["num_steps"], []
    for case in cases:
        churn = {k: case[k] for k in ("S_churn", "S_min", "S_max") if k in case}
        old_stats, gens = SamplerStats(), SeedGenerators(seeds)
        with torch.no_grad():
            old = edm_sampler(
                net, noise, labels, num_steps=steps, dtype=dtype, randn_like=gens.randn_like, stats=old_stats, **case
            )
        den = GuidedDenoiser.from_networks(
            net, labels, case.get("gnet"), case.get("guidance", 1), case.get("guidance_interval")
        )
        sigmas = schedules.karras(steps, dtype=dtype)
        new = solvers.sample(
            "heun", den, noise.to(dtype) * sigmas[0], sigmas, dtype=dtype,
            noise=solvers.seed_noise(SeedGenerators(seeds)), **churn,
        )
        assert new.dtype == dtype
        assert torch.equal(new.to(torch.float32), old), case.keys()
        assert den.stats == old_stats
        outputs.append(old)
    # Not vacuous: guidance, and then the interval with churn, each change the images.
    assert (outputs[1] - outputs[0]).abs().max() > 1e-3 and (outputs[2] - outputs[1]).abs().max() > 1e-3


@pytest.mark.parametrize("name", sorted(solvers.SOLVERS))
def test_evaluation_counts(name):
    seen: list[float] = []

    def recording(x, sigma):
        assert isinstance(sigma, float)  # a host value: guidance decisions need no device sync
        seen.append(sigma)
        return x * 0.5

    for steps in (1, 2, 9):
        sigmas = schedules.karras(steps)
        seen.clear()
        options = STOCHASTIC.get(name, {})
        solvers.sample(name, recording, _x(1), sigmas, **options)
        expected_evals = 2 * steps - 1 if name == "heun" else steps
        assert len(seen) == expected_evals
        if "S_churn" not in options:  # churn raises some of them; the others are the schedule's
            assert set(seen) <= set(sigmas.tolist())
        interval = (0.1, 10.0)
        stats = solvers.count_evaluations(name, sigmas, 1.7, interval, **options)
        assert stats.net_evals == expected_evals
        assert stats.gnet_evals == sum(interval[0] < s <= interval[1] for s in seen)
        assert solvers.count_evaluations(name, sigmas, 1, **options) == SamplerStats(net_evals=expected_evals)
    if name == "heun":  # the same counts as edm2.sampler's for edm_sampler, churn and interval included
        churn = {"S_churn": 20, "S_min": 0.05, "S_max": 50}
        for guidance, interval in ((2.0, None), (2.0, (0.28, 5.42)), (1, None)):
            settings = edm_settings(num_steps=32, guidance=guidance, guidance_interval=interval, **churn)
            expected = count_evaluations(settings)
            assert solvers.count_evaluations("heun", schedules.karras(32), guidance, interval, **churn) == expected
        seen.clear()
        solvers.sample("heun", recording, _x(1), schedules.karras(12), noise=lambda x, s, t: x * 0, **churn)
        assert seen == pytest.approx(evaluation_sigmas(edm_settings(num_steps=12, **churn)), rel=1e-12)


def test_callback_and_public_names():
    calls = []
    sigmas = schedules.karras(5)
    out = solvers.sample("dpmpp_2m", gaussian(0, 0.5), _x(), sigmas, callback=lambda i, x: calls.append((i, x)))
    assert [i for i, _ in calls] == list(range(5)) and torch.equal(calls[-1][1], out)
    assert edm2.sample is solvers.sample and edm2.SOLVERS is solvers.SOLVERS
    assert edm2.GuidedDenoiser is GuidedDenoiser and edm2.NetworkDenoiser is NetworkDenoiser
    assert edm2.schedules is schedules and edm2.solvers is solvers and edm2.seed_noise is solvers.seed_noise
    assert set(solvers.SOLVERS["dpmpp_2m_sde"].options) >= {"eta", "s_noise", "solver_type", "noise", "dtype"}


def test_ode_solvers_converge_at_their_order():
    # For data N(mu, sd^2) the probability-flow ODE maps x(sigma_0) to mu + (x - mu) sd / sqrt(sigma_0^2 + sd^2).
    mu, sd = 0.3, 0.5
    x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    err = {}
    for name in solvers.SOLVERS:
        options = {"eta": 0.0} if "eta" in solvers.SOLVERS[name].options else {}
        for n in (16, 32, 64):
            sigmas = schedules.karras(n)
            exact = mu + (x * sigmas[0] - mu) * sd / math.sqrt(sigmas[0].item() ** 2 + sd**2)
            out = solvers.sample(name, gaussian(mu, sd), x * sigmas[0], sigmas, **options)
            err[name, n] = (out - exact).abs().max().item()
    for name, low, high in (("euler", 1.7, 2.3), ("euler_ancestral", 1.7, 2.3), ("heun", 3.5, 6), ("dpmpp_2m", 3.5, 6)):
        assert low < err[name, 16] / err[name, 32] < high and low < err[name, 32] / err[name, 64] < high, name
    assert err["dpmpp_2m_sde", 32] == pytest.approx(err["dpmpp_2m", 32], rel=1e-9)  # eta 0: the ODE solver
    assert err["dpmpp_3m_sde", 16] / err["dpmpp_3m_sde", 32] > 8  # third order where the steps are coarse
    assert err["dpmpp_3m_sde", 32] < err["dpmpp_2m", 32] / 5


@pytest.mark.parametrize("name, options", [("heun", {"S_churn": 40}), ("dpmpp_2m_sde", {}), ("dpmpp_3m_sde", {})])
def test_stochastic_solvers_sample_the_data_distribution(name, options):
    mu, sd = 0.3, 0.5
    gens = SeedGenerators(range(8))
    sigmas = schedules.karras(64)
    x = gens.randn([1, 64, 64], dtype=torch.float64) * sigmas[0]
    out = solvers.sample(name, gaussian(mu, sd), x, sigmas, noise=solvers.seed_noise(gens), **options)
    assert abs(out.mean().item() - mu) < 0.01 and abs(out.std().item() - sd) < 0.015


@pytest.mark.parametrize("name, options", [("dpmpp_2m_sde", {"eta": 1.0}), ("euler_ancestral", {"eta": 1.0})])
def test_reference_net_stochastic_solver_is_per_seed(ref, ref_nets, name, options):
    # The fixture networks, guided with an interval, float32 state as generation uses: a batch of 3 seeds
    # gives each seed's single run up to the batched kernels' float32 rounding.
    net, gnet = ref_nets
    seeds, sigmas = [31, 32, 33], schedules.karras(5, dtype=torch.float32)

    def run(batch_seeds):
        noise, labels, gens = edm2.seed_noise_and_labels(batch_seeds, [4, 16, 16], label_dim=10)
        den = GuidedDenoiser.from_networks(net, labels, gnet, guidance=1.7, guidance_interval=(0.5, 30.0))
        x = solvers.sample(name, den, noise * sigmas[0], sigmas, dtype=torch.float32,
                           noise=solvers.seed_noise(gens), **options)
        return x, den.stats

    with torch.no_grad():
        batched, stats = run(seeds)
        singles = torch.cat([run([seed])[0] for seed in seeds])
    assert (batched - singles).abs().max() <= 1e-5 * batched.abs().max()
    assert stats == solvers.count_evaluations(name, sigmas, 1.7, (0.5, 30.0), **options)
    assert 0 < stats.gnet_evals < stats.net_evals
