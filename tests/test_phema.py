"""Power-function EMA math against the official implementation's numbers, and the training trackers."""

from __future__ import annotations

import json
import math
import pathlib
import re

import numpy as np
import pytest
import torch

from training import phema


def _assert_rel(actual, expected, rtol=1e-10):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=0)


# ----------------------------------------------------------------------------------------------------------
# Math vs. tests/data/phema_reference.npz


def test_std_to_exp_matches_reference(phema_ref):
    _assert_rel(phema.std_to_exp(phema_ref["stds"]), phema_ref["exps"])


def test_exp_to_std_matches_reference(phema_ref):
    _assert_rel(phema.exp_to_std(phema_ref["exps"]), phema_ref["exp_roundtrip"])
    _assert_rel(phema.exp_to_std(phema.std_to_exp(phema_ref["stds"])), phema_ref["stds"])


def test_std_to_exp_is_the_largest_root_of_eq126():
    for std in [0.005, 0.02, 0.07, 0.2, 0.28]:
        g = float(phema.std_to_exp(std))
        roots = np.roots([1, 7, 16 - std**-2, 12 - std**-2])
        assert g == pytest.approx(max(r.real for r in roots if abs(r.imag) < 1e-9), rel=1e-12)
        assert g >= 0


def test_beta_matches_reference(phema_ref):
    beta = phema.power_function_beta(phema_ref["beta_std"][:, None], phema_ref["beta_t_next"][None, :], 2048)
    expected = phema_ref["beta"]
    exact_zero = expected == 0  # the first update (t_next == batch) must copy the network exactly
    assert np.all(beta[exact_zero] == 0)
    _assert_rel(beta[~exact_zero], expected[~exact_zero])


def test_posthoc_coefficients_match_reference(phema_ref):
    coefs = phema.solve_posthoc_coefficients(
        phema_ref["in_ofs"], phema_ref["in_std"], phema_ref["out_ofs"], phema_ref["out_std"]
    )
    expected = phema_ref["coefs"]
    assert coefs.shape == expected.shape == (len(phema_ref["in_ofs"]), len(phema_ref["out_ofs"]))
    # 1e-10 relative to each column's largest coefficient: entries ~1e-25 are round-off of the solve in
    # both implementations and carry no information.
    scale = np.abs(expected).max(axis=0, keepdims=True)
    np.testing.assert_allclose(coefs, expected, rtol=1e-10, atol=0 + 1e-10 * scale.min())
    assert np.all(np.abs(coefs - expected) <= 1e-10 * scale)
    np.testing.assert_allclose(coefs.sum(axis=0), 1, rtol=1e-12)


def test_correlation_is_the_profile_inner_product():
    # Numerical integral of p_a p_b with p(tau) = (g + 1) tau^g / t^(g + 1) on [0, t].
    for (ta, sa), (tb, sb) in [((3.0, 0.05), (5.0, 0.1)), ((5.0, 0.1), (3.0, 0.05)), ((4.0, 0.2), (4.0, 0.07))]:
        ga, gb = float(phema.std_to_exp(sa)), float(phema.std_to_exp(sb))
        tau = np.linspace(0, min(ta, tb), 400001)
        f = (ga + 1) * tau**ga / ta ** (ga + 1) * (gb + 1) * tau**gb / tb ** (gb + 1)
        integral = np.sum((f[1:] + f[:-1]) / 2 * np.diff(tau))
        assert float(phema.power_function_correlation(ta, sa, tb, sb)) == pytest.approx(integral, rel=1e-6)


def test_reconstructing_an_input_profile_selects_it():
    in_ofs = np.repeat(np.arange(1, 9) * 10.0, 2)
    in_std = np.tile([0.05, 0.10], 8)
    coefs = phema.solve_posthoc_coefficients(in_ofs, in_std, [80.0, 50.0], [0.10, 0.05])
    expected = np.zeros_like(coefs)
    expected[15, 0] = 1
    expected[8, 1] = 1
    np.testing.assert_allclose(coefs, expected, atol=1e-9)


@pytest.mark.parametrize("bad", [0.0, -0.1, 0.301, float("nan")])
def test_bad_std_is_rejected_with_its_value(bad):
    with pytest.raises(ValueError, match="std"):
        phema.std_to_exp(bad)
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        phema.check_std(bad)


def test_duplicate_inputs_are_rejected():
    with pytest.raises(ValueError, match="distinct"):
        phema.solve_posthoc_coefficients([1, 1], [0.05, 0.05], [1], [0.07])


# ----------------------------------------------------------------------------------------------------------
# Trackers


class _Tiny(torch.nn.Module):
    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3, dtype=dtype))
        self.register_buffer("buf", torch.zeros(2, dtype=dtype))


def test_power_function_ema_is_the_power_profile_average():
    """Eq. 127 applied step by step equals the exact discrete average with weights
    (t_k^(g+1) - t_(k-1)^(g+1)) / t^(g+1)."""
    net = _Tiny()
    tracker = phema.PowerFunctionEMA(net, stds=[0.05, 0.2])
    batch, steps = 64, 50
    gen = torch.Generator().manual_seed(0)
    history = []
    for k in range(1, steps + 1):
        with torch.no_grad():
            net.w.copy_(torch.randn(3, generator=gen, dtype=torch.float64))
            net.buf.fill_(k)
        history.append(net.w.detach().clone())
        tracker.update(net, cur_nimg=k * batch, batch_size=batch)
    thetas = torch.stack(history)
    t = torch.arange(0, steps + 1, dtype=torch.float64) * batch
    for std, ema in tracker:
        g = float(phema.std_to_exp(std))
        weights = (t[1:] ** (g + 1) - t[:-1] ** (g + 1)) / t[-1] ** (g + 1)
        torch.testing.assert_close(ema.w, (weights[:, None] * thetas).sum(0), rtol=1e-12, atol=1e-12)
        assert torch.equal(ema.buf, net.buf)  # buffers copied, not averaged
        assert not ema.w.requires_grad and not ema.training
    assert [s for s, _ in tracker.ema_networks()] == [0.05, 0.2]


def test_first_update_copies_the_network():
    net = _Tiny(torch.float32)
    tracker = phema.PowerFunctionEMA(net)
    with torch.no_grad():
        net.w.fill_(3.25)
    tracker.update(net, cur_nimg=2048, batch_size=2048)
    for _, ema in tracker:
        assert torch.equal(ema.w, net.w.detach())


def test_power_function_ema_state_dict_resumes_exactly():
    net = _Tiny(torch.float32)
    gen = torch.Generator().manual_seed(1)
    values = [torch.randn(3, generator=gen) for _ in range(20)]

    def run(tracker, steps):
        for k in steps:
            with torch.no_grad():
                net.w.copy_(values[k])
            tracker.update(net, cur_nimg=(k + 1) * 32, batch_size=32)

    straight = phema.PowerFunctionEMA(net, stds=[0.05, 0.1, 0.07])
    run(straight, range(20))
    first = phema.PowerFunctionEMA(net, stds=[0.05, 0.1, 0.07])
    run(first, range(10))
    state = first.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    resumed = phema.PowerFunctionEMA(_Tiny(torch.float32), stds=[0.05, 0.1, 0.07])
    resumed.load_state_dict(state)
    run(resumed, range(10, 20))
    for (_, a), (_, b) in zip(straight, resumed):
        assert torch.equal(a.w, b.w)
    with pytest.raises(ValueError, match="stds"):
        phema.PowerFunctionEMA(net, stds=[0.05, 0.1]).load_state_dict(state)


def test_power_function_ema_rejects_bad_arguments():
    net = _Tiny()
    with pytest.raises(ValueError, match="0.31"):
        phema.PowerFunctionEMA(net, stds=[0.05, 0.31])
    with pytest.raises(ValueError, match="distinct"):
        phema.PowerFunctionEMA(net, stds=[0.05, 0.05])
    tracker = phema.PowerFunctionEMA(net)
    with pytest.raises(ValueError, match="cur_nimg"):
        tracker.update(net, cur_nimg=10, batch_size=32)


def test_traditional_ema_half_life_and_rampup():
    net = _Tiny()
    tracker = phema.TraditionalEMA(net, halflife_nimg=1000, rampup_ratio=0.5)
    assert tracker.beta(cur_nimg=100_000, batch_size=100) == pytest.approx(0.5**0.1)  # half-life 1000
    assert tracker.beta(cur_nimg=400, batch_size=100) == pytest.approx(0.5**0.5)  # ramp-up: half-life 200
    no_ramp = phema.TraditionalEMA(net, halflife_nimg=1000, rampup_ratio=None)
    assert no_ramp.beta(cur_nimg=400, batch_size=100) == pytest.approx(0.5**0.1)
    # A step input: after the half-life, half of the old value remains.
    with torch.no_grad():
        net.w.fill_(1.0)
    for k in range(1, 11):
        no_ramp.update(net, cur_nimg=k * 100, batch_size=100)
    torch.testing.assert_close(no_ramp.ema.w, torch.full((3,), 0.5, dtype=torch.float64))
    ((label, module),) = no_ramp.ema_networks()
    assert label is None and module is no_ramp.ema
    copy = phema.TraditionalEMA(_Tiny(), halflife_nimg=1000, rampup_ratio=None)
    copy.load_state_dict(no_ramp.state_dict())
    assert torch.equal(copy.ema.w, no_ramp.ema.w)


def _official_parity() -> dict:
    return json.loads((pathlib.Path(__file__).parent / "data" / "official_parity.json").read_text())["phema"]


def test_std_limit_is_the_widest_profile_of_eq_123():
    g = np.linspace(-0.999, 5, 200001)
    assert phema.STD_LIMIT == pytest.approx(float(phema.exp_to_std(g).max()), abs=1e-9)
    assert 0.289 < phema.STD_LIMIT < 0.3003  # contains the official CLI's range (std < 0.289)
    ref = _official_parity()
    np.testing.assert_allclose(phema.std_to_exp(ref["wide_std"]), ref["wide_exp"], rtol=1e-7, atol=1e-9)
    for std in ref["wide_std"]:  # the exponent found gives the std back
        assert float(phema.exp_to_std(phema.std_to_exp(std))) == pytest.approx(std, rel=1e-9)


def test_coefficients_for_official_snapshot_names_equal_the_official_ones():
    """tests/data/official_phema_names.npz: the official tool's coefficients for 16 snapshots 128Ki images apart,
    their times parsed from official names (kimg_to_nimg), a scalar output time."""
    from edm2.official_import import kimg_to_nimg, parse_snapshot_name

    ref = _official_parity()
    official = {int(k): v for k, v in ref["kimg_to_nimg"].items()}
    assert official == {k: kimg_to_nimg(k) for k in official}
    parsed = [parse_snapshot_name(n) for n in ref["prefix_filtered"]]
    in_nimg = [kimg_to_nimg(k) for k, _ in parsed]
    in_std = [s for _, s in parsed]
    assert in_nimg == ref["in_nimg"] and in_std == ref["in_std"]
    with np.load(pathlib.Path(__file__).parent / "data" / "official_phema_names.npz") as d:
        coefs, coefs_mid = d["coefs"], d["coefs_mid"]
    got = phema.solve_posthoc_coefficients(in_nimg, in_std, max(in_nimg), ref["out_std"])
    np.testing.assert_allclose(got, coefs, rtol=1e-7, atol=1e-9)
    mid = phema.solve_posthoc_coefficients(in_nimg[:8], in_std[:8], in_nimg[6], 0.1)  # scalar time and std
    np.testing.assert_allclose(mid, coefs_mid, rtol=1e-7, atol=1e-9)
    # Reading kimg * 1000 images (the former reading) is visibly off for 32 snapshots 128Ki images apart.
    nimg = [k * 131072 for k in range(1, 33) for _ in (0, 1)]
    stds = [0.05, 0.10] * 32
    exact = phema.solve_posthoc_coefficients(nimg, stds, max(nimg), ref["out_std"])
    assert [kimg_to_nimg(n // 1000) for n in nimg] == nimg
    kimg = [n // 1000 * 1000 for n in nimg]
    assert np.abs(phema.solve_posthoc_coefficients(kimg, stds, max(kimg), ref["out_std"]) - exact).max() > 1e-5


def test_traditional_ema_defaults_are_the_official_ones():
    """Official TraditionalEMA(halflife_Mimg=inf, rampup_ratio=0.09): beta = 0.5^(batch / (0.09 cur_nimg))."""
    tracker = phema.TraditionalEMA(_Tiny())
    assert math.isinf(tracker.halflife_nimg) and tracker.rampup_ratio == 0.09
    assert tracker.beta(10_000_000, 2048) == pytest.approx(0.5 ** (2048 / 900_000), rel=1e-12)
    with pytest.raises(ValueError, match="infinite halflife_nimg needs a rampup_ratio"):
        phema.TraditionalEMA(_Tiny(), rampup_ratio=None)


def _run_traditional(tracker: phema.TraditionalEMA, net: _Tiny, values: list[float], batch: int) -> list[float]:
    """Feed the weights values[k] (all three elements alike) as step k's result; the EMA's first element after each."""
    out = []
    for k, value in enumerate(values):
        with torch.no_grad():
            net.w.fill_(value)
        tracker.update(net, cur_nimg=(k + 1) * batch, batch_size=batch)
        out.append(float(tracker.ema.w[0]))
    return out


def _recurrence(start: float, values: list[float], betas: list[float]) -> list[float]:
    out, ema = [], start
    for value, beta in zip(values, betas):
        ema = beta * ema + (1 - beta) * value
        out.append(ema)
    return out


def test_traditional_ema_follows_edm_by_hand():
    """EDM's update (its training loop: beta = 0.5^(batch / max(h, 1e-8)), h = min(halflife, n * ratio), n the images
    before the step) over seven steps of 100 images, half-life 250, ramp-up ratio 0.5: h = 0, 50, 100, 150, 200,
    250, 250. The first update copies the network (beta 0)."""
    values = [4.0, -2.0, 1.0, 8.0, 0.5, -3.0, 2.0]
    betas = [0.0, 0.5**2, 0.5**1, 0.5 ** (100 / 150), 0.5 ** (100 / 200), 0.5 ** (100 / 250), 0.5 ** (100 / 250)]
    net = _Tiny()
    edm = phema.TraditionalEMA(net, halflife_nimg=250, rampup_ratio=0.5, count_before_step=True)
    assert [edm.betas((k + 1) * 100, 100)[0] for k in range(7)] == pytest.approx(betas, rel=1e-14, abs=0)
    got = _run_traditional(edm, net, values, 100)
    assert got == pytest.approx(_recurrence(0.0, values, betas), rel=1e-14, abs=1e-15)
    assert got[0] == 4.0 and got[1] == pytest.approx(0.25 * 4 + 0.75 * -2, rel=1e-15)
    # The official EDM2 class counts the images after the step: h = 50, 100, 150, 200, 250, 250, 250.
    after = phema.TraditionalEMA(_Tiny(), halflife_nimg=250, rampup_ratio=0.5)
    betas_after = [0.5**2, 0.5**1, 0.5 ** (100 / 150), 0.5 ** (100 / 200)] + [0.5 ** (100 / 250)] * 3
    assert _run_traditional(after, _Tiny(), values, 100) == pytest.approx(_recurrence(0.0, values, betas_after),
                                                                          rel=1e-14, abs=1e-15)  # fmt: skip
    # No ramp-up: the half-life from the first step, so the initial weights (zero here) keep 0.5^0.4 of their weight.
    plain = phema.TraditionalEMA(_Tiny(), halflife_nimg=250, rampup_ratio=None, count_before_step=True)
    got = _run_traditional(plain, _Tiny(), values, 100)
    assert got == pytest.approx(_recurrence(0.0, values, [0.5**0.4] * 7), rel=1e-14, abs=1e-15)
    assert got[0] == pytest.approx((1 - 0.5**0.4) * 4, rel=1e-14)


def test_traditional_ema_has_the_trackers_interface_and_checks_its_state():
    net = _Tiny()
    tracker = phema.TraditionalEMA(net, halflife_nimg=500, rampup_ratio=0.05, count_before_step=True)
    assert tracker.emas == [tracker.ema] and len(tracker) == 1
    described = dict(kind="traditional", halflife_nimg=500.0, rampup_ratio=0.05, count_before_step=True)
    assert tracker.describe() == described
    assert phema.TraditionalEMA(net).describe()["halflife_nimg"] is None  # infinite: no JSON number
    with torch.no_grad():
        net.w.fill_(2.0)
    tracker.update(net, cur_nimg=64, batch_size=64)
    state = tracker.state_dict()
    twin = phema.TraditionalEMA(_Tiny(), halflife_nimg=500, rampup_ratio=0.05, count_before_step=True)
    twin.load_state_dict(state)
    assert torch.equal(twin.ema.w, tracker.ema.w) and float(twin.ema.w[0]) == 2.0
    with pytest.raises(ValueError, match="halflife_nimg 500.0, this tracker 400.0"):
        phema.TraditionalEMA(_Tiny(), halflife_nimg=400, rampup_ratio=0.05).load_state_dict(state)
    with pytest.raises(ValueError, match="rampup_ratio 0.05, this tracker -1.0"):
        phema.TraditionalEMA(_Tiny(), halflife_nimg=500, rampup_ratio=None).load_state_dict(state)
    with pytest.raises(ValueError, match="power-function"):
        twin.load_state_dict(phema.PowerFunctionEMA(_Tiny()).state_dict())
    with pytest.raises(ValueError, match="cur_nimg"):
        tracker.update(net, cur_nimg=10, batch_size=64)


@pytest.mark.parametrize("kwargs,message", [
    (dict(halflife_nimg=-1), "halflife_nimg must be a non-negative number, got -1"),
    (dict(halflife_nimg=True), "halflife_nimg must be a non-negative number, got True"),
    (dict(halflife_nimg=100, rampup_ratio=1.5), r"rampup_ratio must be a number in \[0, 1\] or None, got 1.5"),
    (dict(halflife_nimg=100, rampup_ratio=-0.1), r"rampup_ratio must be a number in \[0, 1\] or None, got -0.1"),
])
def test_traditional_ema_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        phema.TraditionalEMA(_Tiny(), **kwargs)
