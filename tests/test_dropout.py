"""accel/dropout.py: the keep-mask kernel (in Triton's interpreter on the CPU), its statistics, layouts and
reproducibility, the operator under torch.compile's tracing, and the network with fast dropout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import run_in_triton_interpreter

from accel import resolve_speed_plan

import edm2
from accel.dropout import dropout

INTERPRETED = r"""
import json
import torch
import edm2
from accel import resolve_speed_plan
from accel.dropout import dropout, dropout_keep_mask

fast, reference = resolve_speed_plan("cpu", kernels="fast"), resolve_speed_plan("cpu", kernels="reference")
assert fast.fast_dropout  # the kernels run in Triton's interpreter


def gains_to_one(net):  # away from their zero init, so that the residual branches reach the output
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(1.0)
    return net


out = {}
seed = torch.tensor([12345])
keep = dropout_keep_mask(seed, [3, 5, 37, 41], False, 0.1)  # 22755 elements: not a multiple of 4 * BLOCK
out["dtype"] = str(keep.dtype)
out["shape"] = list(keep.shape)
out["kept"] = keep.float().mean().item()
out["n"] = keep.numel()
out["same_seed"] = bool(torch.equal(keep, dropout_keep_mask(seed, [3, 5, 37, 41], False, 0.1)))
out["other_seed_agree"] = (
    keep == dropout_keep_mask(torch.tensor([12346]), [3, 5, 37, 41], False, 0.1)
).float().mean().item()
# The four runs of BLOCK elements that one Philox call feeds are not copies of each other.
flat = dropout_keep_mask(seed, [4 * 1024], False, 0.5)
out["runs_agree"] = (flat[:1024] == flat[1024:2048]).float().mean().item()
half = dropout_keep_mask(seed, [200000], False, 0.5).float()
out["half_kept"] = half.mean().item()
out["lag1_corr"] = torch.corrcoef(torch.stack([half[:-1], half[1:]]))[0, 1].item()
cl = dropout_keep_mask(seed, [2, 6, 4, 4], True, 0.3)
out["channels_last"] = cl.is_contiguous(memory_format=torch.channels_last) and not cl.is_contiguous()
out["empty"] = list(dropout_keep_mask(seed, [0, 3], False, 0.3).shape)

# dropout(): kept elements scaled by 1 / (1 - p), the others zero; gradient the same mask and scale.
torch.manual_seed(0)
x = torch.randn(4, 8, 16, 16).contiguous(memory_format=torch.channels_last).requires_grad_()
y = dropout(x, 0.25)
y.backward(torch.ones_like(y))
kept = y != 0
out["values"] = (y[kept] - x.detach()[kept] / 0.75).abs().max().item()
out["grad"] = (x.grad - kept.float() / 0.75).abs().max().item()
out["dropout_kept"] = kept.float().mean().item()
out["y_channels_last"] = y.is_contiguous(memory_format=torch.channels_last)
torch.manual_seed(7)
a = dropout(x.detach(), 0.25)
torch.manual_seed(7)
b = dropout(x.detach(), 0.25)
out["reproducible"] = bool(torch.equal(a, b))

# The U-Net: with the fast plan its masks come from the kernel (not torch's draws), reproducibly from the seed.
net = gains_to_one(edm2.Precond(img_resolution=8, img_channels=2, label_dim=0, model_channels=8, channel_mult=[1, 2],
                                num_blocks=1, attn_resolutions=[4], channels_per_head=8, dropout=0.2).train())
fast.apply(net)
x = torch.randn(3, 2, 8, 8)
sigma = torch.tensor([0.5, 1.0, 2.0])
torch.manual_seed(1)
d1 = net(x, sigma)
torch.manual_seed(1)
d2 = net(x, sigma)
reference.apply(net)
torch.manual_seed(1)
d3 = net(x, sigma)
out["net_reproducible"] = bool(torch.equal(d1, d2))
out["net_differs_from_torch_masks"] = bool(not torch.equal(d1, d3))

# The U-ViT's MLP dropout likewise.
net = gains_to_one(edm2.Precond(img_resolution=8, img_channels=2, label_dim=0, arch="uvit", model_channels=16, depth=3,
                                patch_size=2, channels_per_head=8, dropout=0.2).train())
runs = []
for plan in (fast, fast, reference):
    plan.apply(net)
    torch.manual_seed(1)
    runs.append(net(x, sigma))
out["uvit_reproducible"] = bool(torch.equal(runs[0], runs[1]))
out["uvit_differs_from_torch_masks"] = bool(not torch.equal(runs[0], runs[2]))
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_in_triton_interpreter(INTERPRETED)


def test_keep_mask_statistics(interpreted):
    r = interpreted
    assert r["dtype"] == "torch.bool" and r["shape"] == [3, 5, 37, 41] and r["empty"] == [0, 3]
    sd = (0.1 * 0.9 / r["n"]) ** 0.5
    assert abs(r["kept"] - 0.9) < 5 * sd, r  # Bernoulli(0.9): within 5 standard deviations
    assert abs(r["half_kept"] - 0.5) < 5 * (0.25 / 200000) ** 0.5, r
    assert abs(r["lag1_corr"]) < 5 / 200000**0.5, r  # neighbours independent
    assert 0.4 < r["runs_agree"] < 0.6, r  # the four outputs of a Philox call are not copies
    assert 0.75 < r["other_seed_agree"] < 0.89, r  # another seed: agreement 0.9^2 + 0.1^2 = 0.82 by chance


def test_keep_mask_reproducible_and_laid_out(interpreted):
    assert interpreted["same_seed"] and interpreted["reproducible"] and interpreted["net_reproducible"]
    assert interpreted["channels_last"] and interpreted["y_channels_last"]


def test_dropout_values_and_gradient(interpreted):
    r = interpreted
    assert r["values"] < 1e-6 and r["grad"] < 1e-6, r
    assert abs(r["dropout_kept"] - 0.75) < 5 * (0.25 * 0.75 / (4 * 8 * 16 * 16)) ** 0.5, r


def test_networks_use_the_kernel_when_asked(interpreted):
    assert interpreted["net_differs_from_torch_masks"] and interpreted["uvit_differs_from_torch_masks"]
    assert interpreted["uvit_reproducible"]


def test_plain_path_is_torch_dropout():
    """Without the kernel (CPU, no interpreter) dropout() is F.dropout: the same draws from the same seed."""
    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(3)
    a = dropout(x, 0.3)
    torch.manual_seed(3)
    b = F.dropout(x, p=0.3)
    assert torch.equal(a, b)
    assert dropout(x, 0.0) is x
    with pytest.raises(ValueError, match="p must be in"):
        dropout(x, 1.0)


def test_keep_mask_traces_under_compile():
    """The operator's fake implementation gives the shape, dtype and layout that torch.compile plans with."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        seed = torch.zeros(1, dtype=torch.int64)
        m = torch.ops.edm2.dropout_keep_mask(seed, [2, 4, 3, 3], True, 0.1)
    assert m.shape == (2, 4, 3, 3) and m.dtype == torch.bool
    assert m.is_contiguous(memory_format=torch.channels_last)


def test_training_config_and_modules():
    from accel.dropout import FastDropout
    from networks import Dropout
    from training.config import RESUMABLE_CHANGES, TrainingConfig

    assert TrainingConfig().kernels is None and "kernels" in RESUMABLE_CHANGES  # --kernels fast: the fast dropout
    for kwargs in (dict(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[]),
                   dict(arch="uvit", model_channels=16, depth=3, patch_size=2, channels_per_head=8)):
        net = edm2.Precond(img_resolution=8, img_channels=2, label_dim=0, dropout=0.1, **kwargs)
        drops = [m for m in net.modules() if isinstance(m, Dropout)]
        assert drops and all(type(m) is Dropout and m.p == 0.1 for m in drops)  # the reference's until a plan swaps
        resolve_speed_plan("cpu", kernels="fast").apply(net)  # no kernels on the CPU: torch's dropout stays
        assert all(type(m) is Dropout for m in net.modules() if isinstance(m, Dropout))
        assert FastDropout(0.1).p == 0.1
