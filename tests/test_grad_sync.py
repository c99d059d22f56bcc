"""accel/grad_sync.py (grad_sync 'flat'): gradients gathered into one buffer in their parameters' layouts, chunks
at parameter boundaries, accumulation in place. Averaging over processes is covered end to end by
tests/test_training.py::test_two_processes_equal_one_process (gloo, two processes)."""

from __future__ import annotations

import pytest
import torch

from accel.grad_sync import FlatGradients, split_growing


@pytest.mark.parametrize("sizes,chunks,expected", [
    ([1] * 10, 4, [(0, 1), (1, 3), (3, 6), (6, 10)]),  # 1 : 2 : 3 : 4
    ([1] * 3, 2, [(0, 1), (1, 3)]),
    ([100, 1, 1, 1], 3, [(0, 1), (1, 2), (2, 4)]),
    ([3], 4, [(0, 1)]),
    ([1, 2, 3], 1, [(0, 3)]),
])  # fmt: skip
def test_split_growing_covers_every_index_once(sizes, chunks, expected):
    assert split_growing(sizes, chunks) == expected


def make_net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3), torch.nn.SiLU(), torch.nn.Conv2d(6, 2, 1), torch.nn.Flatten(), torch.nn.LazyLinear(4)
    )
    net(torch.randn(1, 3, 8, 8))
    net[0].to(memory_format=torch.channels_last)
    return net


@pytest.mark.parametrize("collect_each_round", [True, False])
def test_gradients_land_in_the_buffer_in_their_layouts_and_accumulate(collect_each_round):
    net, ref = make_net(), make_net()
    sync = FlatGradients(net.parameters(), chunks=3)
    assert len(sync.chunks) == 3 and sync.buffer.numel() == sum(p.numel() for p in net.parameters())
    for step in range(2):  # the second step starts from gradients set to None again
        net.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        for xi in [torch.randn(2, 3, 8, 8) for _ in range(2)]:  # two accumulation rounds
            net(xi).square().sum().backward()
            if collect_each_round:  # later rounds then add into the views in place
                sync.collect_()
            ref(xi).square().sum().backward()
        sync.average_()  # one process: gathers, nothing to reduce
        for p, v, q in zip(net.parameters(), sync.views, ref.parameters()):
            assert p.grad is v and p.grad.stride() == p.stride()
            assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=1e-6)
    assert sync.views[0].data_ptr() == sync.buffer.data_ptr()


def test_a_parameter_without_gradient_gets_zero():
    net = make_net()
    sync = FlatGradients(net.parameters())
    sync.buffer.fill_(7.0)
    net[0](torch.randn(1, 3, 8, 8)).sum().backward()  # only the first layer takes part
    sync.collect_()
    assert net[0].weight.grad.abs().sum() > 0
    assert all(float(p.grad.abs().max()) == 0 for p in list(net.parameters())[2:])


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="no parameters"):
        FlatGradients([])
    with pytest.raises(ValueError, match="one dtype"):
        FlatGradients([torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))])
    with pytest.raises(ValueError, match="dense"):
        FlatGradients([torch.nn.Parameter(torch.zeros(4, 4).t()[::2])])
    with pytest.raises(ValueError, match="chunks"):
        FlatGradients([torch.nn.Parameter(torch.zeros(3))], chunks=0)


def _average_worker(rank: int, port: int, out: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    net = make_net()
    sync = FlatGradients(net.parameters(), chunks=3)
    net(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(rank))).square().sum().backward()
    sync.collect_()
    sync.average_()
    torch.save([p.grad.clone() for p in net.parameters()], f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_two_processes_get_the_mean_gradient(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "grads")
    torch.multiprocessing.spawn(_average_worker, args=(port, out), nprocs=2)
    got = [torch.load(f"{out}.{r}") for r in range(2)]
    expected = []
    for rank in range(2):
        net = make_net()
        net(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(rank))).square().sum().backward()
        expected.append([p.grad for p in net.parameters()])
    for g0, g1, e0, e1 in zip(*got, *expected):
        assert torch.equal(g0, g1)  # every process holds the same mean
        assert torch.allclose(g0, (e0 + e1) / 2, rtol=1e-6, atol=1e-6)
