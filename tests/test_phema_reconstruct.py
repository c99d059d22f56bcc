"""Post-hoc EMA reconstruction end to end: a short CPU training run, the CLI, bad input, memory, the sweep."""

from __future__ import annotations

import gc
import json
import os
import shutil
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edm2 import model_files, phema
from networks import Precond
from training import EDM2Loss

TINY = dict(  # the fixture's architecture, narrower and at 8x8 so that a step takes milliseconds
    img_resolution=8,
    img_channels=3,
    label_dim=4,
    model_channels=8,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[4],
    channels_per_head=8,
    logvar_channels=8,
)
STEPS = 160
SNAPSHOT_EVERY = 10  # steps
BATCH = 8
# Each step is counted as 1000 training images so that snapshots get distinct kimg file names; the EMA
# and the reconstruction depend only on ratios of image counts, so this changes nothing else.
IMAGES_PER_STEP = 1000


def _snapshot_name(nimg: int, std: float) -> str:
    return f"network-snapshot-{nimg // 1000:07d}-{std:.3f}.safetensors"


def _flat(net: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten() for p in net.parameters()])


@pytest.fixture(scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threading only adds overhead on a shared 2-core machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory, single_thread):
    """Train a tiny Precond with Adam + EDM2Loss + forced weight normalization, tracking EMAs of std 0.05,
    0.10 and 0.07; save the 0.05 / 0.10 EMAs every SNAPSHOT_EVERY steps like training does."""
    outdir = tmp_path_factory.mktemp("run")
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = Precond(**TINY).train()
    net.normalize_weights_()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01, betas=(0.9, 0.99), eps=1e-8)
    loss_fn = EDM2Loss()
    ema = phema.PowerFunctionEMA(net, stds=[0.05, 0.10, 0.07])
    images = torch.randn(64, 3, 8, 8, generator=gen)
    labels = torch.randint(0, 4, (64,), generator=gen)
    nimg = 0
    for step in range(1, STEPS + 1):
        idx = torch.randint(0, 64, (BATCH,), generator=gen)
        loss = loss_fn(net, images[idx], labels[idx]).sum() / BATCH
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        net.normalize_weights_()
        nimg += IMAGES_PER_STEP
        ema.update(net, cur_nimg=nimg, batch_size=IMAGES_PER_STEP)
        if step % SNAPSHOT_EVERY == 0:
            for std, ema_net in ema:
                if std != 0.07:
                    model_files.save_network(
                        outdir / _snapshot_name(nimg, std), ema_net, ema_std=std, training_nimg=nimg
                    )
    return dict(dir=outdir, ema=dict(ema.ema_networks()), nimg=nimg, images=images, labels=labels)


# ----------------------------------------------------------------------------------------------------------
# Correctness


def test_reconstruction_matches_a_directly_tracked_std(run):
    (rec,) = phema.reconstruct(run["dir"], [0.07], progress=False)
    assert rec.std == 0.07 and rec.nimg == run["nimg"] and len(rec.coefs) == 2 * STEPS // SNAPSHOT_EVERY
    tracked, e05, e10 = (_flat(run["ema"][s]) for s in (0.07, 0.05, 0.10))
    error = (_flat(rec.net) - tracked).norm()
    rel_to_weights = float(error / tracked.norm())
    rel_to_ema_spread = float(error / (e05 - e10).norm())  # how far apart the EMA lengths are
    print(
        f"0.07 reconstruction: |rec - tracked| / |tracked| = {rel_to_weights:.3g}, "
        f"/ |ema0.05 - ema0.10| = {rel_to_ema_spread:.3g}"
    )
    assert rel_to_weights < 1e-4
    assert rel_to_ema_spread < 1e-2
    # Sanity: the reconstruction is much closer to the tracked 0.07 than either snapshot series is.
    assert error < 0.05 * min((tracked - e05).norm(), (tracked - e10).norm())


def test_reconstructing_a_tracked_std_reproduces_its_snapshot(run):
    recs = {rec.std: rec for rec in phema.reconstruct(run["dir"], [0.05, 0.10], batch=1, progress=False)}
    for std in (0.05, 0.10):
        snapshot = model_files.load_network(run["dir"] / _snapshot_name(run["nimg"], std)).net
        torch.testing.assert_close(_flat(recs[std].net), _flat(snapshot), rtol=1e-6, atol=1e-7)
        for (name, a), (_, b) in zip(recs[std].net.named_buffers(), snapshot.named_buffers()):
            assert torch.equal(a, b), name  # buffers copied
        assert recs[std].coefs[_snapshot_name(run["nimg"], std)] == pytest.approx(1, abs=1e-6)


def test_reconstruction_at_an_earlier_snapshot(run):
    kimg = 80 * IMAGES_PER_STEP // 1000
    (rec,) = phema.reconstruct(run["dir"], "0.100", out_kimg=kimg, progress=False)
    assert rec.kimg == kimg and len(rec.coefs) == 2 * 80 // SNAPSHOT_EVERY  # later snapshots are not used
    snapshot = model_files.load_network(run["dir"] / _snapshot_name(kimg * 1000, 0.10)).net
    torch.testing.assert_close(_flat(rec.net), _flat(snapshot), rtol=1e-6, atol=1e-7)


def test_python_api_writes_nothing(run):
    before = sorted(p.name for p in run["dir"].iterdir())
    nets = [rec.net for rec in phema.reconstruct(run["dir"], "0.04,0.06,...,0.12", batch=2, progress=False)]
    assert len(nets) == 5 and all(not n.training for n in nets)
    assert sorted(p.name for p in run["dir"].iterdir()) == before


# ----------------------------------------------------------------------------------------------------------
# Command line


def _cli(*args):
    from reconstruct_phema import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_cli_writes_loadable_snapshots(run, tmp_path):
    result = _cli("--indir", run["dir"], "--outdir", tmp_path, "--outstd", "0.05,0.06,...,0.08", "--batch", 3)
    assert result.exit_code == 0, result.output
    kimg = run["nimg"] // 1000
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"phema-{kimg:07d}-{s:.3f}.safetensors" for s in (0.05, 0.06, 0.07, 0.08)]
    loaded = model_files.load_network(tmp_path / names[2])
    assert loaded.meta["ema_std"] == 0.07 and loaded.meta["training_nimg"] == run["nimg"]
    assert isinstance(loaded.net, Precond) and loaded.net.init_kwargs == run["ema"][0.07].init_kwargs
    (rec,) = phema.reconstruct(run["dir"], [0.07], progress=False)
    assert torch.equal(_flat(loaded.net), _flat(rec.net))

    # --skip-existing reads no snapshot when every output exists; --prefix names the outputs.
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    original = model_files.load_network
    model_files.load_network = lambda *a, **k: pytest.fail("an existing output was rebuilt")
    try:
        assert (
            _cli("--indir", run["dir"], "--outdir", tmp_path, "--outstd", "0.05,0.08", "--skip-existing").exit_code == 0
        )
    finally:
        model_files.load_network = original
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamps
    assert _cli("--indir", run["dir"], "--outdir", tmp_path, "--outstd", "0.1", "--prefix", "ema").exit_code == 0
    assert (tmp_path / f"ema-{kimg:07d}-0.100.safetensors").is_file()


# The last: a mistyped range step, 2e9 stds (once filled the memory instead of an error).
@pytest.mark.parametrize("std", ["0.31", "0", "-0.05", "0.05,abc", "0.01,0.0100000001,...,0.2"])
def test_cli_rejects_bad_std(run, tmp_path, std):
    result = _cli("--indir", run["dir"], "--outdir", tmp_path, "--outstd", std)
    assert result.exit_code == 2 and "--outstd" in result.output
    assert std.split(",")[-1] in result.output
    assert not list(tmp_path.iterdir())


def test_cli_never_replaces_a_snapshot_of_the_run(run, tmp_path):
    """--outdir = --indir and --prefix network-snapshot: the output network-snapshot-KIMG-0.050 once replaced the
    training snapshot of that name (an input). Refused; an earlier reconstruction there may be replaced."""
    folder = shutil.copytree(run["dir"], tmp_path / "run")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    stds = sorted({float(p.stem.rsplit("-", 1)[1]) for p in folder.glob("network-snapshot-*.safetensors")})
    args = ["--indir", folder, "--outdir", folder, "--outstd", f"{stds[0]:.3f}"]
    result = _cli(*args, "--prefix", "network-snapshot")
    assert result.exit_code == 2 and "would replace a snapshot of the run" in result.output, result.output
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    (tmp_path / "afile").write_bytes(b"")  # an --outdir that cannot be made: once a NotADirectoryError traceback
    result = _cli("--indir", folder, "--outdir", tmp_path / "afile" / "out", "--outstd", "0.05")
    assert result.exit_code == 1 and "Error: --outdir" in result.output and "Not a directory" in result.output
    for _ in range(2):  # a reconstruction in the run's folder, then the same again: replaced
        result = _cli(*args, "--inprefix", "network-snapshot")
        assert result.exit_code == 0, result.output


@pytest.mark.parametrize("device", ["foo", "cuda:99"])
def test_cli_rejects_a_device_this_machine_lacks(run, tmp_path, device):
    """Once a RuntimeError / AssertionError traceback from torch, in both post-hoc EMA tools."""
    from phema_sweep import main as sweep

    np.savez(tmp_path / "val.npz", images=run["images"][:4].numpy(), labels=run["labels"][:4].numpy())
    result = _cli("--indir", run["dir"], "--outdir", tmp_path / "out", "--outstd", "0.05", "--device", device)
    assert result.exit_code == 2 and "Invalid value for '--device'" in result.output and device in result.output
    result = CliRunner().invoke(sweep, ["--indir", str(run["dir"]), "--data", str(tmp_path / "val.npz"), "--outdir",
                                        str(tmp_path / "sweep"), "--device", device], catch_exceptions=False)
    assert result.exit_code == 2 and "Invalid value for '--device'" in result.output and device in result.output
    assert os.listdir(tmp_path) == ["val.npz"]


def test_cli_rejects_missing_or_mismatched_snapshots(run, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _cli("--indir", empty, "--outdir", tmp_path / "out", "--outstd", "0.07")
    assert result.exit_code != 0 and "no snapshots" in result.output and "empty" in result.output

    result = _cli("--indir", run["dir"], "--outdir", tmp_path / "out", "--outstd", "0.07", "--outkimg", 999)
    assert result.exit_code != 0 and "999" in result.output and "available" in result.output

    mixed = tmp_path / "mixed"
    shutil.copytree(run["dir"], mixed)
    other = Precond(**dict(TINY, model_channels=16)).eval()
    model_files.save_network(
        mixed / _snapshot_name(run["nimg"] + 1000, 0.05), other, ema_std=0.05, training_nimg=run["nimg"] + 1000
    )
    result = _cli("--indir", mixed, "--outdir", tmp_path / "out", "--outstd", "0.07")
    assert (
        result.exit_code != 0 and "different networks" in result.output and "model_channels (8 vs 16)" in result.output
    )
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_snapshot_without_ema_metadata_is_rejected(run, tmp_path):
    model_files.save_network(tmp_path / _snapshot_name(5000, 0.05), run["ema"][0.05], training_nimg=5000)
    with pytest.raises(phema.SnapshotError, match="ema_std"):
        phema.scan_snapshots(tmp_path)


def test_interrupted_run_leaves_only_complete_outputs(run, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = model_files.load_network
    num_inputs = 2 * STEPS // SNAPSHOT_EVERY

    def interrupting_load(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == num_inputs + 3:  # inside the second pass
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(model_files, "load_network", interrupting_load)
    with pytest.raises(KeyboardInterrupt):
        phema.reconstruct_to_dir(run["dir"], tmp_path, [0.06, 0.08], batch=1, progress=False)
    monkeypatch.setattr(model_files, "load_network", original)
    names = [p.name for p in tmp_path.iterdir()]
    assert names == [f"phema-{run['nimg'] // 1000:07d}-0.060.safetensors"]  # no half-written second, no temp file
    assert model_files.load_network(tmp_path / names[0]).meta["ema_std"] == 0.06


# ----------------------------------------------------------------------------------------------------------
# Memory


def _live_tensor_bytes() -> int:
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() on deprecated torch proxies warns
        storages = {}
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
                try:
                    storage = obj.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
                except RuntimeError:  # fake tensors that tracing in earlier tests left for the collector: no memory
                    continue
    return sum(storages.values())


def test_peak_memory_does_not_grow_with_the_number_of_snapshots(tmp_path, monkeypatch, single_thread):
    net = Precond(**dict(TINY, model_channels=32)).eval()
    net_bytes = sum(p.numel() * 4 for p in net.parameters())
    gen = torch.Generator().manual_seed(0)
    for k in range(1, 17):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=gen), alpha=0.01)
        for std in (0.05, 0.10):
            model_files.save_network(tmp_path / _snapshot_name(k * 1000, std), net, ema_std=std, training_nimg=k * 1000)
    del net
    all_files = sorted(tmp_path.glob("*.safetensors"), key=lambda p: p.name)

    def peak_bytes(files) -> int:
        baseline = _live_tensor_bytes()
        peak = {"bytes": 0}
        original = model_files.load_network

        def measuring_load(*args, **kwargs):  # measured right after each input is loaded
            loaded = original(*args, **kwargs)
            peak["bytes"] = max(peak["bytes"], _live_tensor_bytes() - baseline)
            return loaded

        monkeypatch.setattr(model_files, "load_network", measuring_load)
        for rec in phema.reconstruct(files, [0.06, 0.08], batch=2, progress=False):
            peak["bytes"] = max(peak["bytes"], _live_tensor_bytes() - baseline)
            del rec
        monkeypatch.setattr(model_files, "load_network", original)
        return peak["bytes"]

    few = peak_bytes(all_files[-8:])  # 4 snapshot times x 2 stds
    many = peak_bytes(all_files)  # 16 snapshot times x 2 stds
    mb = 1e-6
    print(f"peak live tensor bytes: 8 inputs {few * mb:.2f} MB, 32 inputs {many * mb:.2f} MB, "
          f"net {net_bytes * mb:.2f} MB")
    assert few >= net_bytes  # the measurement sees the loaded input
    assert many <= few * 1.05 + 64 * 1024
    # One input, two float64 sums and one float32 output (+ slack): far below 32 inputs.
    assert many <= 6 * net_bytes


# ----------------------------------------------------------------------------------------------------------
# EMA-length sweep


def test_sweep_finds_and_plots_an_optimum(run, tmp_path):
    metric = phema.validation_loss_metric(run["images"][:32], run["labels"][:32], seed=3)
    assert metric(run["ema"][0.07]) == metric(run["ema"][0.07])  # fixed sigma and noise
    result = phema.sweep_ema_length(run["dir"], "0.03,0.05,...,0.15", metric, batch=3, progress=False)
    assert result.stds == pytest.approx([0.03, 0.05, 0.07, 0.09, 0.11, 0.13, 0.15])
    assert all(np.isfinite(result.values))
    assert result.best_value == min(result.values) and result.best_std == result.stds[int(np.argmin(result.values))]
    png = phema.plot_sweep(result, tmp_path / "sweep.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = json.loads(phema.save_sweep_table(result, tmp_path / "sweep.json").read_text())
    assert table["best_std"] == result.best_std and table["values"] == result.values
    rows = phema.save_sweep_table(result, tmp_path / "sweep.csv").read_text().splitlines()
    assert len(rows) == 1 + len(result.stds) and sum(int(r.split(",")[-1]) for r in rows[1:]) == 1


def test_sweep_cli(run, tmp_path):
    from phema_sweep import main

    data = tmp_path / "val.npz"
    np.savez(data, images=run["images"][:16].numpy(), labels=run["labels"][:16].numpy())
    result = CliRunner().invoke(
        main,
        ["--indir", str(run["dir"]), "--data", str(data), "--outdir", str(tmp_path / "sweep"), "--outstd", "0.05,0.1"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "best EMA length" in result.output
    assert {p.name for p in (tmp_path / "sweep").iterdir()} == {"sweep.png", "sweep.json", "sweep.csv"}


def test_sweep_cli_checks_the_data_and_options_against_the_run(run, tmp_path):
    """Validation data that do not fit the run's network (once a Precond shape error naming no option, or a
    conditional network scored without labels), too few images for --num, non-finite --P-mean / --P-std, an
    --outdir that is a file: one line naming the option, before any reconstruction."""
    from phema_sweep import main

    images, labels = run["images"][:8].numpy(), run["labels"][:8].numpy()
    np.savez(tmp_path / "ok.npz", images=images, labels=labels)
    np.savez(tmp_path / "nolabels.npz", images=images)
    np.savez(tmp_path / "small.npz", images=images[:, :, :4, :4], labels=labels)
    np.savez(tmp_path / "fewlabels.npz", images=images, labels=labels[:5])
    (tmp_path / "afile").write_bytes(b"")
    cases = [
        (["--data", "nolabels.npz"], "--data", "nolabels.npz: no labels, but the network is class-conditional"),
        (["--data", "small.npz"], "--data", "small.npz: images of shape [3, 4, 4], but the network takes [3, 8, 8]"),
        (["--data", "fewlabels.npz"], "--data", "fewlabels.npz: 5 labels for 8 images"),
        (["--data", "ok.npz", "--num", "9"], "--num", "ok.npz holds 8 images, fewer than the 9 asked for"),
        (["--data", "ok.npz", "--P-mean", "nan"], "'--P-mean'", "expected a finite number, got nan"),
        (["--data", "ok.npz", "--P-std", "inf"], "'--P-std'", "expected a finite number, got inf"),
        (["--data", "ok.npz", "--outdir", "afile"], "'--outdir'", "afile' is a file, not a folder"),
    ]
    for args, option, message in cases:
        args = [a if not a.endswith((".npz", "afile")) else str(tmp_path / a) for a in args]
        result = CliRunner().invoke(main, ["--indir", str(run["dir"]), "--outdir", str(tmp_path / "out"),
                                           "--outstd", "0.05,0.1", *args], catch_exceptions=False)  # fmt: skip
        assert result.exit_code == 2 and f"Invalid value for {option}" in result.output, (args, result.output)
        assert message in result.output, (args, result.output)
    assert sorted(os.listdir(tmp_path)) == ["afile", "fewlabels.npz", "nolabels.npz", "ok.npz", "small.npz"]


def test_input_names_are_selected_as_the_official_tool_selects_them():
    """tests/data/official_parity.json: the official list_input_pickles on the same names (.pkl; the project's
    .safetensors snapshots follow the same naming)."""
    import pathlib

    from edm2.phema_reconstruct import filter_snapshot_names

    ref = json.loads((pathlib.Path(__file__).parent / "data" / "official_parity.json").read_text())["phema"]
    names = [pathlib.Path(n) for n in ref["names"]]
    assert sorted(p.name for p in filter_snapshot_names(names)) == sorted(ref["all"])
    assert sorted(p.name for p in filter_snapshot_names(names, "edm2-img512-xs")) == sorted(ref["prefix_filtered"])
    assert sorted(p.name for p in filter_snapshot_names(names, None, [0.05])) == sorted(ref["std_filtered"])


def test_cli_takes_the_official_option_names(run, tmp_path):
    out = tmp_path / "out"
    args = ["--indir", str(run["dir"]), "--outdir", str(out), "--outstd", "0.06"]
    result = _cli(*args, "--inprefix", "network-snapshot", "--instd", "0.050,0.100", "--outprefix", "mine", "--skip")
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("mine-*-0.060.safetensors"))) == 1
    result = _cli(*args, "--inprefix", "nothing-here")
    assert result.exit_code != 0 and "prefix 'nothing-here'" in result.output, result.output
