"""The network, preconditioner and loss against the numbers of the paper's official implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import build_reference_net, reference_meta
from training import EDM2Loss


def rel_err(a: torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    b = torch.as_tensor(b, dtype=torch.float64)
    return float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30))


def inputs(ref):
    return tuple(torch.from_numpy(ref[k]) for k in ("x", "sigma", "labels", "noise"))


def test_state_dict_keys_are_the_reference_keys(ref):
    net = build_reference_net(ref)
    ours = set(net.state_dict().keys())
    theirs = {k[4:] for k in ref if k.startswith("net/")}
    assert ours == theirs


@pytest.mark.parametrize("prefix", ["net", "gnet"])
def test_eval_denoiser_and_logvar(ref, prefix):
    net = build_reference_net(ref, prefix)
    x, sigma, labels, _ = inputs(ref)
    with torch.no_grad():
        D, logvar = net(x, sigma, labels, return_logvar=True)
    if prefix == "net":
        assert rel_err(D, ref["out_D"]) < 1e-5
        assert rel_err(logvar, ref["out_logvar"]) < 1e-5
    assert D.shape == x.shape and logvar.shape == (4, 1, 1, 1)


def trained_once(ref):
    """Load trainin/*, do the forced weight normalization and one training-mode loss + backward."""
    net = build_reference_net(ref)
    state = net.state_dict()
    state.update({k[len("trainin/") :]: torch.from_numpy(v) for k, v in ref.items() if k.startswith("trainin/")})
    net.load_state_dict(state)
    net.train()
    net.normalize_weights_()
    x, sigma, labels, noise = inputs(ref)
    meta = reference_meta(ref)
    loss = EDM2Loss(P_mean=meta["P_mean"], P_std=meta["P_std"], sigma_data=meta["sigma_data"])(
        net, x, labels, sigma=sigma, noise=noise
    )
    loss.mean().backward()
    return net, loss


def test_train_loss(ref):
    _, loss = trained_once(ref)
    assert loss.shape == ref["train_loss"].shape
    assert rel_err(loss.detach(), ref["train_loss"]) < 1e-5
    assert abs(loss.mean().item() - float(ref["train_loss_mean"])) <= 1e-5 * abs(float(ref["train_loss_mean"]))


def test_forced_weight_normalization_and_gradients(ref):
    net, _ = trained_once(ref)
    params = dict(net.named_parameters())
    names_out = [k[len("trainout/") :] for k in ref if k.startswith("trainout/")]
    names_grad = [k[len("grad/") :] for k in ref if k.startswith("grad/")]
    assert len(names_out) == len(params) and len(names_grad) == len(params)
    # The trainin weights are off unit norm, so this can only pass if forced normalization happened.
    moved = [n for n in names_out if rel_err(torch.from_numpy(ref["trainin/" + n]), ref["trainout/" + n]) > 1e-3]
    assert len(moved) > 50
    for name in names_out:
        assert rel_err(params[name].detach(), ref["trainout/" + name]) < 1e-4, name
    for name in names_grad:
        assert rel_err(params[name].grad, ref["grad/" + name]) < 1e-4, name


def test_normalize_weights_is_idempotent_up_to_eps(ref):
    net = build_reference_net(ref)
    net.normalize_weights_()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.normalize_weights_()
    for k, v in net.state_dict().items():
        assert torch.allclose(v, before[k], rtol=1e-3, atol=0), k


def test_forward_does_not_modify_parameters(ref):
    net = build_reference_net(ref).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, sigma, labels, _ = inputs(ref)
    net(x, sigma, labels)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("precision,tol", [("fp16", 5e-3), ("bf16", 4e-2)])
def test_reduced_precision_forward_tracks_fp32(ref, precision, tol):
    net = build_reference_net(ref)
    x, sigma, labels, _ = inputs(ref)
    with torch.no_grad():
        D32 = net(x, sigma, labels)
        net.precision = precision
        D = net(x, sigma, labels)
        Df = net(x, sigma, labels, force_fp32=True)
    assert D.dtype == torch.float32
    assert torch.equal(Df, D32)
    err = rel_err(D, D32)
    assert 0 < err < tol  # non-zero: the reduced precision really was used


def test_integer_labels_equal_one_hot(ref):
    net = build_reference_net(ref)
    x, sigma, labels, _ = inputs(ref)
    with torch.no_grad():
        assert torch.equal(net(x, sigma, labels), net(x, sigma, labels.argmax(1)))


def test_scalar_sigma_broadcasts(ref):
    net = build_reference_net(ref)
    x, _, labels, _ = inputs(ref)
    with torch.no_grad():
        one = net(x, 2.0, labels)
        assert torch.equal(one, net(x, torch.tensor([2.0]), labels))
        # One sigma gives one noise embedding for the batch, as in the reference (tests/test_official_generate.py);
        # a per-image sigma computes it per row, which may round differently in the last bit.
        torch.testing.assert_close(one, net(x, torch.full([4], 2.0), labels), rtol=1e-5, atol=1e-5)


def test_inference_weight_cache_follows_weight_changes(ref):
    net = build_reference_net(ref)
    x, sigma, labels, _ = inputs(ref)
    with torch.no_grad():
        first = net(x, sigma, labels)
        assert torch.equal(net(x, sigma, labels), first)  # served from the cache
        conv = net.unet.enc["16x16_block0"].conv_res0
        assert conv._cache is not None
        conv.weight.mul_(-1)  # an in-place change must invalidate the cached weight
        changed = net(x, sigma, labels)
        conv.weight.mul_(-1)
        assert not torch.equal(changed, first)
        assert torch.equal(net(x, sigma, labels), first)
    import copy

    assert copy.deepcopy(conv)._cache is None


def test_channels_last_gives_the_same_result(ref):
    import dataclasses

    from accel import resolve_speed_plan

    plans = {cl: dataclasses.replace(resolve_speed_plan("cpu"), channels_last=cl) for cl in (False, True)}
    net = build_reference_net(ref)
    x, sigma, labels, _ = inputs(ref)
    with torch.no_grad():
        plain = net(x, sigma, labels)
        plans[True].apply(net, weights_channels_last=False)
        nhwc = net(x, sigma, labels)
        net.to(memory_format=torch.channels_last)  # weights too, as training on CUDA stores them
        nhwc_weights = net(x, sigma, labels)
    assert rel_err(nhwc, plain) < 1e-5 and rel_err(nhwc_weights, plain) < 1e-5
    grads = []
    for channels_last in (False, True):  # gradients (attention included) do not depend on the layout either
        plans[channels_last].apply(net, weights_channels_last=False)
        net.zero_grad()
        net(x, sigma, labels).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
    assert rel_err(grads[1], grads[0]) < 1e-5
