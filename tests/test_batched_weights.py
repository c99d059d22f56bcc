"""networks/batched_weights.py: all layers' effective weights normalize(w) / sqrt(fan_in) (Eq. 47) in one operation,
against the per-layer expressions of MPConv; the UNet's batched path and its pieces (--grad-sync overlap).

The Triton kernels run here in Triton's interpreter (a subprocess with TRITON_INTERPRET=1, which must be set
before Triton is imported); on a GPU, benchmarks/check_cuda.py runs the same comparisons compiled, and with
the network compiled by torch.compile.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import run_in_triton_interpreter

import edm2
from networks.batched_weights import effective_weights, effective_weights_reference
from networks.mp import MPConv


def weights(seed: int = 0) -> list[torch.Tensor]:
    """Shapes as in the network: 3x3 convolutions (one channels-last), 1x1, linear, a zero row, a short row."""
    gen = torch.Generator().manual_seed(seed)
    ws = [torch.randn(s, generator=gen) for s in ([6, 5, 3, 3], [7, 40, 3, 3], [9, 12, 1, 1], [11, 300], [3, 2])]
    ws[1] = ws[1].contiguous(memory_format=torch.channels_last)
    ws[2][4] = 0
    return ws


def small_net(**kw) -> edm2.Precond:
    torch.manual_seed(0)
    net = edm2.Precond(img_resolution=16, img_channels=2, label_dim=3, model_channels=8, channel_mult=[1, 2, 2, 2],
                       num_blocks=1, attn_resolutions=[4], channels_per_head=8, **kw).train()  # fmt: skip
    with torch.no_grad():  # gains away from their zero init, so that every weight gets a gradient
        for p in net.parameters():
            if p.ndim == 0:
                p.copy_(torch.randn([]))
    return net


def train_grads(net: edm2.Precond, seed: int = 1) -> tuple[torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn([4, 2, 16, 16], generator=gen)
    sigma = torch.rand([4], generator=gen) * 3 + 0.1
    D, logvar = net(x, sigma, torch.tensor([0, 1, 2, 1]), return_logvar=True)
    (D * torch.randn(D.shape, generator=gen)).sum().add(logvar.sum()).backward()
    return D.detach(), [p.grad.clone() for p in net.parameters()]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_is_what_each_layer_computes(dtype):
    for w in weights():
        conv = MPConv(w.shape[1], w.shape[0], kernel=list(w.shape[2:]))
        conv.weight.data = w.clone()
        (ref,) = effective_weights_reference([w], dtype)
        per_layer = conv.effective_weight(
            1, dtype, channels_last=w.is_contiguous(memory_format=torch.channels_last) and w.ndim == 4
        )
        assert torch.equal(ref, per_layer) and ref.stride() == w.stride()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_operator_forward_and_backward_match_autograd_of_the_reference(dtype):
    ws = [w.requires_grad_(True) for w in weights()]
    out = effective_weights(ws, dtype)
    ref = effective_weights_reference(ws, dtype)
    grads = [torch.randn(o.shape).to(dtype) for o in out]
    got = torch.autograd.grad(out, ws, grads)
    want = torch.autograd.grad(ref, ws, grads)
    for o, r, g, h, w in zip(out, ref, got, want, ws):
        assert o.dtype == dtype and o.stride() == w.stride() and g.stride() == w.stride()
        assert torch.equal(o, r)
        assert rel(g, h) < 1e-6 and bool(torch.isfinite(g).all())
    assert rel(got[2][4], want[2][4]) < 1e-6  # a zero row (norm eps): no radial part to remove, and no NaN


def test_bad_weights_are_refused():
    with pytest.raises(ValueError, match="effective_weights: weights must be float32"):
        effective_weights([torch.zeros(3, 4, dtype=torch.float16)], torch.float16)
    with pytest.raises(ValueError, match="2-D or more"):
        effective_weights([torch.zeros(3)], torch.float32)
    assert effective_weights([], torch.float32) == []


def test_unet_batched_path_equals_per_layer_path():
    net = small_net()
    batched = copy.deepcopy(net)
    batched.unet.batched_weights = True
    D0, g0 = train_grads(net)
    D1, g1 = train_grads(batched)
    assert rel(D1, D0) < 1e-6
    for (name, _), a, b in zip(net.named_parameters(), g0, g1):
        assert rel(b, a) < 1e-5, name
    with torch.no_grad():  # without gradients the per-layer path (with its cache) runs
        assert torch.equal(batched(torch.ones(1, 2, 16, 16), 1.0), net(torch.ones(1, 2, 16, 16), 1.0))


def test_batched_path_and_pieces_trace_as_planned():
    net = small_net(precision="bf16")
    net.unet.batched_weights = True
    x, sigma = torch.randn(2, 2, 16, 16), torch.ones(2)
    whole = torch._dynamo.explain(net)(x, sigma, None, return_logvar=True)
    assert whole.graph_count == 1 and whole.graph_break_count == 0
    assert net.unet.overlap_breaks() == ("enc.4x4_down", "dec.8x8_up")
    net.unet.graph_breaks = net.unet.overlap_breaks()
    parts = net.unet.parts()
    assert [p[0] for p in parts] == ["enc.16x16_conv", "enc.4x4_down", "dec.8x8_up"]
    assert [name for part in parts for name in part] == net.unet.block_names()
    torch._dynamo.reset()
    cut = torch._dynamo.explain(net)(x, sigma, None, return_logvar=True)
    # Around the backbone call, then the three pieces: the graph breaks are where they were put.
    assert cut.graph_count == 5, [str(r.reason)[:80] for r in cut.break_reasons]
    assert all("graph_break" in str(r.reason) for r in cut.break_reasons), [
        str(r.reason)[:200] for r in cut.break_reasons
    ]
    torch._dynamo.reset()


def test_piece_parameters_cover_every_parameter_once_in_backward_order():
    from training.training_loop import overlap_groups

    net = small_net()
    net.unet.graph_breaks = net.unet.overlap_breaks()
    groups = overlap_groups(net)
    assert sorted(i for g in groups for i in g) == list(range(len(list(net.parameters()))))
    # Backward hands each piece's gradients over together, the last piece first.
    group_of = {i: k for k, g in enumerate(groups) for i in g}
    arrived = []
    params = list(net.parameters())
    hooks = [
        p.register_post_accumulate_grad_hook(lambda p, i=i: arrived.append(group_of[i])) for i, p in enumerate(params)
    ]
    compiled = torch.compile(net, backend="aot_eager")  # the pieces as compiled graphs, without code generation
    gen = torch.Generator().manual_seed(0)
    D, logvar = compiled(
        torch.randn(2, 2, 16, 16, generator=gen), torch.ones(2), torch.tensor([0, 2]), return_logvar=True
    )
    (D.square().sum() + logvar.sum()).backward()
    for h in hooks:
        h.remove()
    torch._dynamo.reset()
    assert arrived == sorted(arrived), arrived  # groups 0, 1, 2 in turn, never interleaved
    assert len(arrived) == len(params)


INTERPRETED = r"""
import copy, json, torch
import networks.batched_weights as bw
import tests.test_batched_weights as t

bw.SUB = 64  # rows of 2..360 elements: one to six chunks each, ragged last chunks
out = {}
ws = t.weights()
for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
    leaves = [w.clone().requires_grad_(True) for w in ws]
    got = bw.effective_weights(leaves, dtype)
    ref = bw.effective_weights_reference(leaves, dtype)
    grads = [
        torch.randn(o.shape, generator=torch.Generator().manual_seed(100 + i)).to(dtype) for i, o in enumerate(got)
    ]
    g_got = torch.autograd.grad(got, leaves, grads)
    g_ref = torch.autograd.grad(ref, leaves, grads)
    out[name] = dict(
        forward=max(t.rel(a, b) for a, b in zip(got, ref)),
        differing=sum(int((a != b).sum()) for a, b in zip(got, ref)) / sum(w.numel() for w in ws),
        backward=max(t.rel(a, b) for a, b in zip(g_got, g_ref)),
        layouts=all(a.stride() == w.stride() and g.stride() == w.stride() for a, g, w in zip(got, g_got, ws)),
        zero_row=t.rel(g_got[2][4], g_ref[2][4]),
    )
net = t.small_net()
batched = copy.deepcopy(net)
batched.unet.batched_weights = True
D0, g0 = t.train_grads(net)
D1, g1 = t.train_grads(batched)
out["unet"] = dict(output=t.rel(D1, D0), grads=max(t.rel(b, a) for a, b in zip(g0, g1)))
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def interpreted():
    return run_in_triton_interpreter(INTERPRETED)


def test_kernels_match_the_reference(interpreted):
    r = interpreted
    # float32: only the order of the sum of squares differs. float16: the same, seen through one rounding, so
    # an element now and then lands one unit in the last place away.
    assert r["fp32"]["forward"] < 1e-6 and r["fp32"]["backward"] < 1e-6, r
    assert r["fp16"]["forward"] < 1e-3 and r["fp16"]["differing"] < 0.01 and r["fp16"]["backward"] < 1e-6, r
    assert r["fp32"]["layouts"] and r["fp16"]["layouts"], "outputs and gradients are laid out like their weights"
    assert r["fp32"]["zero_row"] < 1e-6 and r["fp16"]["zero_row"] < 1e-6, r


def test_kernels_in_the_network_give_the_per_layer_gradients(interpreted):
    assert interpreted["unet"]["output"] < 1e-6 and interpreted["unet"]["grads"] < 1e-5, interpreted["unet"]
