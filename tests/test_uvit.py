"""The U-ViT backbone: layout, magnitudes, forward/backward, sampling, model files and the demo sizes."""

from __future__ import annotations

import json
import math

import pytest
import torch

import edm2
from networks import Precond
from networks.uvit import UViT, patchify, sincos_position_embedding, unpatchify

TINY = dict(arch="uvit", model_channels=32, depth=5, patch_size=4, mlp_ratio=2, channels_per_head=16)


def tiny(label_dim: int = 4, **kw) -> Precond:
    torch.manual_seed(0)
    return Precond(16, 3, label_dim, **dict(TINY, **kw))


def test_patchify_round_trip_and_token_order():
    x = torch.randn(2, 3, 8, 8)
    t = patchify(x, 2)
    assert t.shape == (2, 16, 12)
    torch.testing.assert_close(unpatchify(t, 2, 3, 8), x)
    torch.testing.assert_close(t[0, 1].reshape(3, 2, 2), x[0, :, 0:2, 2:4])  # token 1: row 0, column 1


def test_position_embedding_is_unit_rms_and_distinct():
    pos = sincos_position_embedding(8, 32)
    assert pos.shape == (64, 32)
    torch.testing.assert_close(pos.square().mean(dim=1), torch.ones(64), atol=1e-5, rtol=0)
    assert torch.cdist(pos, pos).add(torch.eye(64) * 10).min() > 0.1  # no two positions coincide
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_position_embedding(4, 30)


def test_layout_and_state_dict_names():
    net = tiny()
    u = net.uvit
    assert net.backbone is u and not hasattr(net, "unet")
    assert len(u.in_blocks) == 2 and len(u.out_blocks) == 2 and u.skip_scale.num_skips == 2
    assert all(b.skip_linear is not None for b in u.out_blocks) and all(b.skip_linear is None for b in u.in_blocks)
    assert u.out_blocks[0].skip_linear.weight.shape == (32, 64)  # concat 2C -> C
    keys = set(net.state_dict())
    assert "uvit.pos_embed" in keys and "uvit.out_gain" in keys and "uvit.emb_label.weight" in keys
    assert "uvit.emb_label.weight" not in set(tiny(label_dim=0).state_dict())


@pytest.mark.parametrize("label_dim", [0, 4])
def test_forward_backward(label_dim):
    net = tiny(label_dim).train()
    x = torch.randn(3, 3, 16, 16)
    labels = torch.tensor([0, 1, 3]) if label_dim else None
    D, logvar = net(x, torch.tensor([0.1, 1.0, 20.0]), labels, return_logvar=True)
    assert D.shape == x.shape and logvar.shape == (3, 1, 1, 1)
    # out_gain starts at 0: F = 0 and D = c_skip x exactly, as in the EDM2 U-Net
    c_skip = 0.25 / (torch.tensor([0.1, 1.0, 20.0]) ** 2 + 0.25)
    torch.testing.assert_close(D, c_skip.reshape(-1, 1, 1, 1) * x)
    with torch.no_grad():
        net.uvit.out_gain.fill_(1)
    D = net(x, torch.tensor([0.1, 1.0, 20.0]), labels)
    D.square().mean().backward()
    missing = [
        n for n, p in net.named_parameters() if n.startswith("uvit.") and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert missing == []
    assert all(bool(torch.isfinite(p.grad).all()) for p in net.parameters() if p.grad is not None)


def test_magnitude_preserving_features():
    """Unit-variance input gives features near unit RMS through all blocks (the MP design)."""
    net = tiny().eval()
    rms = {}
    for name, m in net.uvit.stage_modules().items():
        m.register_forward_hook(lambda mod, a, o, name=name: rms.__setitem__(name, float(o.square().mean().sqrt())))
    with torch.no_grad():
        net(torch.randn(8, 3, 16, 16) * math.sqrt(0.25 + 1), 1.0, torch.arange(8) % 4)
    assert set(rms) == {"in0", "in1", "mid", "out0", "out1"}
    assert all(0.6 < v < 1.5 for v in rms.values()), rms


def test_labels_and_noise_level_change_the_output():
    net = tiny().eval()
    with torch.no_grad():
        net.uvit.out_gain.fill_(1)
        x = torch.randn(1, 3, 16, 16)
        a, b, c = net(x, 1.0, torch.tensor([0])), net(x, 1.0, torch.tensor([1])), net(x, 2.0, torch.tensor([0]))
    assert (a - b).abs().max() > 1e-4 and (a - c).abs().max() > 1e-4


def test_sampling_on_cpu_is_deterministic_per_seed():
    net = tiny().eval()
    with torch.no_grad():
        net.uvit.out_gain.fill_(0.5)
    noise = torch.stack([torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(s)) for s in (0, 1)])
    with torch.no_grad():
        out = edm2.edm_sampler(net, noise, torch.tensor([2, 3]), num_steps=4)
        again = edm2.edm_sampler(net, noise[1:], torch.tensor([3]), num_steps=4)
    assert out.shape == noise.shape and bool(torch.isfinite(out).all())
    torch.testing.assert_close(out[1:], again, atol=1e-5, rtol=1e-5)
    assert (out - noise * 80).abs().max() > 1  # it moved away from the initial noise


def test_model_file_round_trip(tmp_path):
    net = tiny(skip_scaling="ls_nonshared").eval()
    with torch.no_grad():
        net.uvit.out_gain.fill_(1)
    assert json.loads(json.dumps(net.init_kwargs)) == net.init_kwargs
    path = tmp_path / "uvit.safetensors"
    edm2.save_network(path, net)
    loaded = edm2.load_network(path).net
    assert isinstance(loaded.backbone, UViT) and loaded.init_kwargs == net.init_kwargs
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 1.0, torch.tensor([0, 1])), net(x, 1.0, torch.tensor([0, 1])))


def test_demo_sizes_build_and_bad_arguments():
    for name in edm2.presets.UVIT_DEMO_NETWORKS:
        kwargs = edm2.presets.uvit_network_kwargs(name)
        assert kwargs["arch"] == "uvit" and kwargs["img_resolution"] == 32
    n = sum(p.numel() for p in Precond(**edm2.presets.uvit_network_kwargs("uvit-demo")).parameters())
    assert 1.0e6 < n < 2.0e6
    with pytest.raises(ValueError, match="unknown U-ViT size"):
        edm2.presets.uvit_network_kwargs("uvit-huge")
    for kwargs, match in [
        (dict(depth=4), "depth must be odd"),
        (dict(patch_size=3), "divisible by patch_size"),
        (dict(model_channels=24), "divisible by channels_per_head"),
        (dict(depth=0), "depth must be a positive integer"),
    ]:
        with pytest.raises(ValueError, match=match):
            tiny(**kwargs)


def test_fp16_forward_keeps_float32_output():
    net = tiny(precision="bf16").eval()
    with torch.no_grad():
        net.uvit.out_gain.fill_(1)
        D = net(torch.randn(2, 3, 16, 16), 1.0, torch.tensor([0, 1]))
        ref = net(torch.randn(2, 3, 16, 16), 1.0, torch.tensor([0, 1]), force_fp32=True)
    assert D.dtype == torch.float32 and ref.dtype == torch.float32 and bool(torch.isfinite(D).all())
