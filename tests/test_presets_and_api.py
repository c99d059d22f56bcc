"""Presets, parameter counts against the paper, the learning-rate schedule and argument checking."""

from __future__ import annotations

import json
import math
import pathlib

import pytest
import torch

import edm2
from edm2.presets import PAPER_PARAMS_M


@pytest.mark.parametrize("size", ["xs", "s", "m", "l", "xl", "xxl"])
def test_parameter_counts_match_paper_table_2(size):
    with torch.device("meta"):  # no memory: XXL has 1.5G parameters
        net = edm2.Precond(**edm2.preset_network_kwargs(f"edm2-img512-{size}"))
    count = sum(p.numel() for p in net.parameters()) / 1e6
    assert abs(count / PAPER_PARAMS_M[size] - 1) < 0.005, (size, count)


def test_presets_hold_the_spec_table():
    p = edm2.get_preset("edm2-img512-m")
    assert p == dict(
        duration=2048 << 20, batch=2048, channels=256, lr=0.0090, decay=70000, dropout=0.10, P_mean=-0.4, P_std=1.0
    )
    assert edm2.get_preset("edm2-img64-xl")["duration"] == 640 << 20
    assert len(edm2.PRESETS) == 13 + 14  # the paper's 12, the CPU demo, the ablation ladder A-G at two sizes
    kw = edm2.preset_network_kwargs("edm2-img64-s")
    assert (kw["img_channels"] == 3 and kw["img_resolution"] == 64
            and kw["label_dim"] == 1000 and kw["model_channels"] == 192)
    t = edm2.preset_training_kwargs("edm2-img64-s")
    assert t["status"] == 128 << 10 and t["snapshot"] == 8 << 20 and t["checkpoint"] == 128 << 20
    assert (t["loss"] == dict(P_mean=-0.8, P_std=1.6)
            and t["lr"] == dict(ref_lr=0.0100, ref_batches=35000, rampup_img=10**7))


def test_get_preset_returns_a_copy():
    edm2.get_preset("edm2-img512-s")["lr"] = 1.0
    assert edm2.get_preset("edm2-img512-s")["lr"] == 0.0100


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="edm2-img512-huge.*edm2-img512-xs"):
        edm2.get_preset("edm2-img512-huge")


def test_learning_rate_schedule():
    lr = edm2.learning_rate_schedule
    batch, rampup = 2048, 10_000_000
    assert lr(0, batch, ref_lr=0.01) == 0
    assert lr(rampup / 2, batch, ref_lr=0.01) == pytest.approx(0.005)
    assert lr(70000 * batch, batch, ref_lr=0.01) == pytest.approx(0.01)  # end of the flat part
    assert lr(4 * 70000 * batch, batch, ref_lr=0.01) == pytest.approx(0.005)  # 1/sqrt(t/t_ref)
    assert lr(10**9, batch, ref_lr=0.01, ref_batches=0, rampup_img=0) == 0.01
    with pytest.raises(ValueError, match="batch_size"):
        lr(0, 0)


def test_init_kwargs_round_trip_through_json():
    net = edm2.Precond(
        16, 4, label_dim=10, model_channels=16, channel_mult=[1, 2], attn_resolutions=[8], channels_per_head=16
    )
    kwargs = json.loads(json.dumps(net.init_kwargs))
    torch.manual_seed(0)
    twin = edm2.Precond(**kwargs)
    twin.load_state_dict(net.state_dict())
    x = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        assert torch.equal(net.eval()(x, 1.0), twin.eval()(x, 1.0))


def test_use_fp16_is_translated_by_the_official_importer_only():
    import types

    from edm2.official_import import precond_kwargs_from_official

    with pytest.raises(ValueError, match="use_fp16"):  # Precond takes `precision` only
        edm2.Precond(8, 3, model_channels=8, channel_mult=[1], use_fp16=True)
    for use_fp16, precision in ((True, "fp16"), (False, "fp32")):
        record = types.SimpleNamespace(init_args=(8, 3, 0), init_kwargs=dict(use_fp16=use_fp16, model_channels=8))
        kwargs = precond_kwargs_from_official(record, "official.pkl")
        assert kwargs["precision"] == precision and "use_fp16" not in kwargs
        assert edm2.Precond(**kwargs, channel_mult=[1]).precision == precision


@pytest.fixture(scope="module")
def small_net():
    return edm2.Precond(
        16, 4, label_dim=10, model_channels=16, channel_mult=[1, 2], attn_resolutions=[8], channels_per_head=16
    ).eval()


@pytest.mark.parametrize(
    "x_shape,sigma,labels,match",
    [
        ((2, 3, 16, 16), 1.0, None, r"x must have shape \[N, 4, 16, 16\]"),
        ((2, 4, 8, 8), 1.0, None, "x must have shape"),
        ((4, 16, 16), 1.0, None, "x must have shape"),
        ((2, 4, 16, 16), [1.0, 2.0, 3.0], None, "sigma must have 1 or 2"),
        ((2, 4, 16, 16), 0.0, None, "sigma must be positive and finite"),
        ((2, 4, 16, 16), -1.0, None, "sigma must be positive and finite"),
        ((2, 4, 16, 16), math.inf, None, "sigma must be positive and finite"),
        ((2, 4, 16, 16), math.nan, None, "sigma must be positive and finite"),
        ((2, 4, 16, 16), 1.0, torch.zeros(2, 7), r"class_labels must have shape \[2, 10\] \(label_dim 10\)"),
        ((2, 4, 16, 16), 1.0, torch.zeros(3, 10), "class_labels must have shape"),
        ((2, 4, 16, 16), 1.0, torch.zeros(2, dtype=torch.long).reshape(1, 2), "integer class_labels"),
    ],
)
def test_bad_forward_input_is_a_named_value_error(small_net, x_shape, sigma, labels, match):
    with pytest.raises(ValueError, match=match):
        small_net(torch.zeros(x_shape), torch.as_tensor(sigma), labels)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(img_resolution=16, img_channels=4, bogus=3), r"unknown constructor argument\(s\) \['bogus'\]"),
        (dict(img_resolution=0, img_channels=4), "img_resolution must be a positive integer"),
        (dict(img_resolution=16, img_channels=4, label_dim=-1), "label_dim"),
        (dict(img_resolution=16, img_channels=4, precision="fp8"), "precision must be one of"),
        (dict(img_resolution=16, img_channels=4, dropout=1.5), "dropout"),
        (dict(img_resolution=12, img_channels=4, channel_mult=[1, 2, 3, 4]), "divisible"),
        (dict(img_resolution=16, img_channels=4, resample_filter=[1, 3, 3, 1]), "resample_filter"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        edm2.Precond(**kwargs)


def test_unconditional_net_rejects_labels():
    net = edm2.Precond(8, 3, model_channels=8, channel_mult=[1])
    with pytest.raises(ValueError, match="unconditional"):
        net(torch.zeros(1, 3, 8, 8), 1.0, torch.zeros(1, 4))


def test_loss_bad_input():
    net = edm2.Precond(8, 3, model_channels=8, channel_mult=[1])
    with pytest.raises(ValueError, match="P_std"):
        edm2.EDM2Loss(P_std=0)
    with pytest.raises(ValueError, match="noise must have the shape"):
        edm2.EDM2Loss()(net, torch.zeros(2, 3, 8, 8), noise=torch.zeros(1, 3, 8, 8))


def test_loss_is_unit_scale_at_init():
    """With F = 0 (out_gain 0 at init) the error is c_out^2 per element in expectation, so lambda(sigma)
    makes it 1 at every sigma (Eq. 21); with u = 0 the loss is that error."""
    torch.manual_seed(0)
    net = edm2.Precond(16, 4, model_channels=16, channel_mult=[1, 2], attn_resolutions=[])
    net.logvar_linear.weight.data.zero_()  # u(sigma) = 0
    images = torch.randn(64, 4, 16, 16) * 0.5
    loss = edm2.EDM2Loss()(net, images)
    assert abs(loss.mean().item() - 1) < 0.05
    assert torch.allclose(edm2.reduce_batch_loss(loss, 64), loss.sum() / 64)


def test_learning_rate_schedule_equals_the_official_numbers():
    """tests/data/official_parity.json: the official schedule (rampup_Mimg counts 10^6 images, not 2^20)."""
    data = json.loads((pathlib.Path(__file__).parent / "data" / "official_parity.json").read_text())
    rows = data["learning_rate_schedule"]
    for r in rows:
        got = edm2.learning_rate_schedule(
            r["cur_nimg"], r["batch_size"], ref_lr=r["ref_lr"], ref_batches=r["ref_batches"],
            rampup_img=r["rampup_Mimg"] * 1_000_000,
        )  # fmt: skip
        assert got == pytest.approx(r["lr"], rel=1e-12, abs=1e-15), r
    default = [r for r in rows if r["rampup_Mimg"] == 10 and r["ref_lr"] == 0.01 and r["batch_size"] == 2048]
    for r in default:  # the defaults alone give the official numbers
        got = edm2.learning_rate_schedule(r["cur_nimg"], 2048, ref_lr=0.01)
        assert got == pytest.approx(r["lr"], rel=1e-12, abs=1e-15), r
    assert edm2.preset_training_kwargs("edm2-img512-s")["lr"]["rampup_img"] == 10_000_000
