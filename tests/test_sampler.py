"""The EDM Heun sampler (docs/design.md §7): reference parity, the solver, guidance, the guidance interval, costs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import reference_meta

from edm2.sampler import (
    SamplerStats,
    count_evaluations,
    edm_sampler,
    edm_settings,
    evaluation_sigmas,
    step_sigmas,
)
from edm2.seeds import SeedGenerators, format_seeds, parse_seeds, seed_noise_and_labels


class ToyDenoiser(torch.nn.Module):
    """The ideal denoiser for data ~ N(mean, sd^2 I): D = mean + (x - mean) sd^2 / (sigma^2 + sd^2). Counts calls."""

    def __init__(self, mean: float = 0.0, sd: float = 0.5, label_dim: int = 0, res: int = 4, channels: int = 2):
        super().__init__()
        self.mean, self.sd = mean, sd
        self.label_dim, self.img_resolution, self.img_channels = label_dim, res, channels
        self.calls: list[float] = []  # sigma of each call
        self.seen_labels: list[torch.Tensor | None] = []

    def forward(self, x, sigma, class_labels=None):
        assert x.dtype == torch.float32  # networks always see float32
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1, 1, 1)
        self.calls.append(float(sigma.flatten()[0]))
        self.seen_labels.append(class_labels)
        return self.mean + (x - self.mean) * self.sd**2 / (sigma**2 + self.sd**2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny networks: one thread is faster


def _relative_error(a: torch.Tensor, b: np.ndarray) -> float:
    return float(np.abs(a.numpy() - b).max() / np.abs(b).max())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_sampler_outputs(ref, ref_nets, dtype):
    net, gnet = ref_nets
    settings = reference_meta(ref)["sampler"]
    noise = torch.from_numpy(ref["sampler_noise"])
    labels = torch.from_numpy(ref["labels"])
    kwargs = {
        "num_steps": settings["num_steps"],
        "sigma_min": settings["sigma_min"],
        "sigma_max": settings["sigma_max"],
        "rho": settings["rho"],
        "dtype": dtype,
    }
    with torch.no_grad():
        plain = edm_sampler(net, noise, labels, **kwargs)
        guided = edm_sampler(net, noise, labels, gnet=gnet, guidance=settings["guidance"], **kwargs)
    assert plain.dtype == torch.float32 and plain.shape == noise.shape
    assert _relative_error(plain, ref["sampler_out"]) < 1e-5
    assert _relative_error(guided, ref["sampler_out_guided"]) < 1e-5
    # Guidance changes the result well beyond that tolerance: the comparison above can fail.
    assert _relative_error(guided, ref["sampler_out"]) > 1e-3


def test_step_sigmas_follow_the_schedule():
    s = step_sigmas(edm_settings(num_steps=32, sigma_min=0.002, sigma_max=80, rho=7))
    assert s.shape == (33,) and s.dtype == torch.float64
    assert s[0].item() == pytest.approx(80) and s[31].item() == pytest.approx(0.002) and s[32].item() == 0
    assert bool(torch.all(s[1:] < s[:-1]))
    i = 13
    expected = (80 ** (1 / 7) + i / 31 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert s[i].item() == pytest.approx(expected, rel=1e-12)
    assert step_sigmas(edm_settings(num_steps=1, sigma_min=0.002, sigma_max=80, rho=7)).tolist() == [80.0, 0.0]
    for bad in [{"num_steps": 0}, {"sigma_min": 0}, {"sigma_max": 0.001}, {"rho": -1}, {"num_steps": 2.5}]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            step_sigmas(edm_settings(**{"num_steps": 4, "sigma_min": 0.002, "sigma_max": 80, "rho": 7, **bad}))


def test_heun_solves_the_gaussian_ode():
    # For data N(0, sd^2) the probability-flow ODE maps x(sigma_max) to x * sd / sqrt(sigma_max^2 + sd^2).
    net = ToyDenoiser(sd=0.5)
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    exact = noise.double() * 80 * 0.5 / math.sqrt(80**2 + 0.5**2)
    scale = exact.abs().max().item()
    err = {n: (edm_sampler(net, noise, num_steps=n).double() - exact).abs().max().item() / scale for n in (16, 32, 64)}
    assert err[64] < 0.01
    # Heun is second order: doubling the steps divides the error by about 4.
    assert 3 < err[16] / err[32] < 5 and 3 < err[32] / err[64] < 5
    # The solver evaluates at every sigma_i, twice per step except the last: 2N - 1 evaluations.
    net.calls.clear()
    edm_sampler(net, noise, num_steps=6)
    assert net.calls == pytest.approx(evaluation_sigmas(edm_settings(num_steps=6)), rel=1e-6)
    assert len(net.calls) == 11


def test_guidance_is_extrapolation_between_denoisers():
    # D_g + w (D - D_g) of two Gaussian denoisers with means a and b is the denoiser of mean b + w (a - b).
    main, guide = ToyDenoiser(mean=0.3, label_dim=3), ToyDenoiser(mean=-0.2, label_dim=3)
    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    labels = torch.eye(3)[:2]
    w = 2.5
    guided = edm_sampler(main, noise, labels, gnet=guide, guidance=w, num_steps=10)
    combined = edm_sampler(ToyDenoiser(mean=-0.2 + w * 0.5), noise, num_steps=10)
    torch.testing.assert_close(guided, combined, rtol=1e-5, atol=1e-5)
    assert guide.seen_labels[0] is labels  # a conditional guiding network gets the labels too
    # An unconditional guiding network (classifier-free guidance) gets no labels.
    uncond = ToyDenoiser(mean=-0.2, label_dim=0)
    edm_sampler(main, noise, labels, gnet=uncond, guidance=w, num_steps=3)
    assert all(l is None for l in uncond.seen_labels)


def test_guidance_one_never_calls_the_guiding_network():
    main, guide = ToyDenoiser(), ToyDenoiser(mean=1.0)
    stats = SamplerStats()
    edm_sampler(main, torch.randn(1, 2, 4, 4), gnet=guide, guidance=1, num_steps=5, stats=stats)
    assert guide.calls == [] and stats.net_evals == 9 and stats.gnet_evals == 0


@pytest.mark.parametrize("interval", [None, (0.28, 5.42), (1e-4, 1e4), (100, 200)])
def test_guidance_interval_and_honest_counts(interval):
    main, guide = ToyDenoiser(mean=0.3), ToyDenoiser(mean=-0.2)
    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    stats = SamplerStats()
    out = edm_sampler(main, noise, gnet=guide, guidance=2.0, num_steps=32, guidance_interval=interval, stats=stats)
    sigmas = evaluation_sigmas(edm_settings(num_steps=32))
    inside = [s for s in sigmas if interval is None or interval[0] < s <= interval[1]]
    # Every evaluation calls the main net; exactly those inside the interval also call the guiding net.
    assert stats.net_evals == len(main.calls) == 63
    assert stats.gnet_evals == len(guide.calls) == len(inside)
    assert guide.calls == pytest.approx(inside, rel=1e-6)
    assert count_evaluations(edm_settings(num_steps=32, guidance=2.0, guidance_interval=interval)) == stats
    assert stats.total_evals == 63 + len(inside)
    plain = edm_sampler(ToyDenoiser(mean=0.3), noise, num_steps=32)
    everywhere = edm_sampler(ToyDenoiser(mean=0.3), noise, gnet=ToyDenoiser(mean=-0.2), guidance=2.0, num_steps=32)
    if len(inside) == 0:
        assert torch.equal(out, plain)
    elif len(inside) == len(sigmas):
        assert torch.equal(out, everywhere)
    else:  # (0.28, 5.42]: guided in the middle only, so different from both
        assert 0 < len(inside) < 63
        assert (out - plain).abs().max() > 1e-3 and (out - everywhere).abs().max() > 1e-3


def test_count_evaluations_matches_the_sampler_with_churn():
    main, guide = ToyDenoiser(mean=0.3), ToyDenoiser(mean=-0.2)
    gens = SeedGenerators([5, 6])
    churn = {"S_churn": 20, "S_min": 0.05, "S_max": 50, "S_noise": 1.003}
    stats = SamplerStats()
    edm_sampler(
        main,
        gens.randn([2, 4, 4]),
        gnet=guide,
        guidance=1.5,
        num_steps=12,
        guidance_interval=(0.1, 10),
        randn_like=gens.randn_like,
        stats=stats,
        **churn,
    )
    expected = count_evaluations(
        edm_settings(num_steps=12, guidance=1.5, guidance_interval=(0.1, 10), **{k: v for k, v in churn.items()})
    )
    assert stats == expected and stats.net_evals == 23
    # Churn raises the noise level above the schedule where it applies, and only there.
    plain_sigmas = evaluation_sigmas(edm_settings(num_steps=12))
    assert main.calls[0] == pytest.approx(plain_sigmas[0])  # sigma_0 = 80 > S_max: no churn
    gamma = min(20 / 12, math.sqrt(2) - 1)
    assert main.calls[2] == pytest.approx(plain_sigmas[2] * (1 + gamma), rel=1e-6)


def test_churn_noise_is_per_seed():
    net = ToyDenoiser()
    churn = {"S_churn": 40, "num_steps": 8}
    both = SeedGenerators([3, 4])
    out_both = edm_sampler(net, both.randn([2, 4, 4]), randn_like=both.randn_like, dtype=torch.float64, **churn)
    singles = []
    for seed in (3, 4):
        g = SeedGenerators([seed])
        singles.append(edm_sampler(net, g.randn([2, 4, 4]), randn_like=g.randn_like, dtype=torch.float64, **churn))
    torch.testing.assert_close(out_both, torch.cat(singles), rtol=1e-6, atol=1e-6)
    no_churn = edm_sampler(net, SeedGenerators([3, 4]).randn([2, 4, 4]), num_steps=8)
    assert (out_both - no_churn).abs().max() > 1e-3  # churn did something


def test_reference_net_batch_composition_changes_only_rounding(ref, ref_nets):
    # Per-seed inputs make image k independent of its batch; batched float32 kernels may still round
    # differently, so the outputs agree to float precision (tests/test_generate.py checks the PNGs).
    net, gnet = ref_nets
    seeds = [11, 12, 13, 14]
    with torch.no_grad():
        noise, labels, gens = seed_noise_and_labels(seeds, [4, 16, 16], label_dim=10)
        batched = edm_sampler(
            net, noise, labels, gnet=gnet, guidance=1.7, num_steps=6, S_churn=5, randn_like=gens.randn_like
        )
        singles = []
        for seed in seeds:
            n, l, g = seed_noise_and_labels([seed], [4, 16, 16], label_dim=10)
            assert torch.equal(n[0], noise[seeds.index(seed)]) and torch.equal(l[0], labels[seeds.index(seed)])
            singles.append(
                edm_sampler(net, n, l, gnet=gnet, guidance=1.7, num_steps=6, S_churn=5, randn_like=g.randn_like)
            )
    singles = torch.cat(singles)
    assert (batched - singles).abs().max() <= 1e-5 * batched.abs().max()


def test_bad_guidance_arguments():
    main, noise = ToyDenoiser(label_dim=10), torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="needs a guiding network"):
        edm_sampler(main, noise, guidance=2)
    with pytest.raises(ValueError, match="gnet label_dim"):
        edm_sampler(main, noise, gnet=ToyDenoiser(label_dim=5), guidance=2)
    with pytest.raises(ValueError, match="gnet img_resolution"):
        edm_sampler(main, noise, gnet=ToyDenoiser(label_dim=10, res=8), guidance=2)
    with pytest.raises(ValueError, match="gnet img_channels"):
        edm_sampler(main, noise, gnet=ToyDenoiser(label_dim=10, channels=3), guidance=2)
    for bad in [(5, 1), (-1, 2), (1,), "ab"]:
        with pytest.raises(ValueError, match="guidance_interval"):
            edm_sampler(main, noise, gnet=ToyDenoiser(), guidance=2, guidance_interval=bad)
    with pytest.raises(ValueError, match="noise must have shape"):
        edm_sampler(main, torch.randn(2, 4, 4))


def test_seed_lists():
    assert parse_seeds("0-3,10, 20-21") == [0, 1, 2, 3, 10, 20, 21]
    assert parse_seeds("7") == [7]
    assert format_seeds(parse_seeds("0-63,100,200-299")) == "0-63,100,200-299"
    for bad, match in [
        ("", "non-empty"),
        ("1-", "malformed"),
        ("a", "malformed"),
        ("5-2", "backwards"),
        ("1,1", "more than once"),
        ("-3", "malformed"),
        ("1,,2", "malformed"),
        (f"{2**64}", "at most"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_seeds(bad)


def test_seed_noise_and_labels_depend_only_on_the_seed():
    noise, labels, _ = seed_noise_and_labels([5, 9, 2], [3, 8, 8], label_dim=1000)
    noise9, labels9, _ = seed_noise_and_labels([9], [3, 8, 8], label_dim=1000)
    assert torch.equal(noise[1], noise9[0]) and torch.equal(labels[1], labels9[0])
    assert not torch.equal(noise[0], noise[1])
    assert labels.shape == (3, 1000) and torch.equal(labels.sum(1), torch.ones(3))
    fixed_noise, fixed, _ = seed_noise_and_labels([5, 9], [3, 8, 8], label_dim=1000, class_idx=417)
    assert torch.equal(fixed.argmax(1), torch.tensor([417, 417])) and torch.equal(fixed_noise, noise[:2])
    _, none, _ = seed_noise_and_labels([5], [3, 8, 8], label_dim=0)
    assert none is None
    with pytest.raises(ValueError, match="out of range"):
        seed_noise_and_labels([5], [3, 8, 8], label_dim=10, class_idx=10)
    with pytest.raises(ValueError, match="unconditional"):
        seed_noise_and_labels([5], [3, 8, 8], label_dim=0, class_idx=0)
