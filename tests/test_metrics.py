"""Metrics: the Frechet distance, feature statistics, reference files, calculate_metrics.py ref / calc / gen,
torchrun, the post-hoc EMA sweep on FID, and bad input. Detectors are narrow random networks saved to files
by the test and loaded through the real loading path (environment variables / options)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import scipy.linalg
import torch
from click.testing import CliRunner
from conftest import ROOT
from test_detectors import tiny_detector

from edm2 import metrics as M
from edm2.detectors import save_detector
from edm2.model_files import save_network
from networks import Precond


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny networks: one thread is faster


# ----------------------------------------------------------------------------------------------------------
# Frechet distance


def _random_cov(d: int, rng: np.random.Generator, rank: int | None = None) -> np.ndarray:
    a = rng.standard_normal((d, rank or d + 3))
    return a @ a.T / a.shape[1]


def test_fd_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(0)
    for n, d in ((500, 32), (20, 64)):  # the second covariance is singular (fewer samples than dimensions)
        x = rng.standard_normal((n, d)) * rng.uniform(0.1, 3, d) + rng.standard_normal(d)
        mu, sigma = x.mean(0), np.cov(x, rowvar=False)
        assert abs(M.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_fd_matches_the_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(1)
    d = 50
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    v1, v2 = rng.uniform(0.01, 4, d), rng.uniform(0.01, 4, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    got = M.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(expected, rel=1e-10)
    assert M.frechet_distance(mu2, np.diag(v2), mu1, np.diag(v1)) == pytest.approx(expected, rel=1e-10)


def test_fd_general_covariances_and_singular_products():
    rng = np.random.default_rng(2)
    d = 40
    s1, s2 = _random_cov(d, rng), _random_cov(d, rng)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    # Independent route: tr sqrt(S1 S2) = sum of square roots of the eigenvalues of S1^1/2 S2 S1^1/2.
    r1 = scipy.linalg.sqrtm(s1).real
    trace = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * trace
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    # Rank-deficient covariances (sqrtm of a singular product: complex or non-finite parts): finite, real, right.
    # Exact: for S3 = A A^T, the non-zero eigenvalues of S3 S4 are those of A^T S4 A (5 x 5).
    a, b = rng.standard_normal((d, 5)), rng.standard_normal((d, 7))
    s3, s4 = a @ a.T, b @ b.T
    trace = np.sqrt(np.clip(np.linalg.eigvalsh(a.T @ s4 @ a), 0, None)).sum()
    fd = M.frechet_distance(mu1, s3, mu2, s4)
    assert np.isfinite(fd) and fd == pytest.approx(
        np.sum((mu1 - mu2) ** 2) + np.trace(s3) + np.trace(s4) - 2 * trace, rel=1e-6
    )
    assert M._trace_sqrt_product_eig(s3, s4) == pytest.approx(trace, rel=1e-6)  # the fallback route
    with pytest.raises(ValueError, match="shapes do not match"):
        M.frechet_distance(mu1, s1, mu2[:-1], s2)


def test_statistics_are_exact_and_independent_of_order_and_chunking():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((101, 12)) * 3 + 5
    stats = []
    for order, chunk in ((np.arange(101), 101), (rng.permutation(101), 7), (rng.permutation(101), 1)):
        acc = M.FeatureAccumulator(12)
        for i in range(0, 101, chunk):
            acc.update(torch.from_numpy(x[order[i : i + chunk]]).float())
        stats.append(acc.statistics("fid"))
    xf = x.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(stats[0].mu, xf.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats[0].sigma, np.cov(xf, rowvar=False), rtol=1e-9, atol=1e-12)
    for s in stats[1:]:
        np.testing.assert_allclose(s.mu, stats[0].mu, rtol=1e-13)
        np.testing.assert_allclose(s.sigma, stats[0].sigma, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# Fixtures: detector files, image sets, a tiny pixel model


def _write_pngs(folder: pathlib.Path, images: np.ndarray, names=None) -> pathlib.Path:
    import PIL.Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        name = names[i] if names is not None else f"img{i:05d}.png"
        PIL.Image.fromarray(image).save(folder / name)
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("metrics")
    weights = {
        m: save_detector(d / f"{m}.safetensors", tiny_detector(m, seed=i)) for i, m in enumerate(("fid", "fd_dinov2"))
    }
    rng = np.random.default_rng(0)
    # Smooth random images (upsampled noise plus a colour), so that the detectors' features vary.
    base = rng.integers(0, 256, (30, 4, 4, 3)).astype(np.float32)
    images = np.clip(np.kron(base, np.ones((1, 4, 4, 1))) + rng.normal(0, 20, (30, 16, 16, 3)), 0, 255).astype(np.uint8)
    data = _write_pngs(d / "data", images)
    shuffled = _write_pngs(d / "shuffled", images, names=[f"{k:05d}.png" for k in rng.permutation(30)])
    zip_path = d / "data.zip"
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_STORED) as z:
        for p in sorted(data.iterdir()):
            z.write(p, p.name)
    torch.manual_seed(0)
    net = Precond(img_resolution=16, img_channels=3, label_dim=0, model_channels=8, channel_mult=[1, 2],
                  num_blocks=1, attn_resolutions=[8], channels_per_head=8, logvar_channels=8)  # fmt: skip
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("gain"):
                p.fill_(0.7)
    net_file = d / "net.safetensors"
    save_network(net_file, net.eval(), encoder={"class": "standard_rgb"})
    return {
        "dir": d,
        "weights": weights,
        "images": images,
        "data": data,
        "shuffled": shuffled,
        "zip": zip_path,
        "net": net_file,
    }


@pytest.fixture()
def weights_env(env, monkeypatch):
    monkeypatch.setenv("EDM2_INCEPTION_WEIGHTS", str(env["weights"]["fid"]))
    monkeypatch.setenv("EDM2_DINOV2_WEIGHTS", str(env["weights"]["fd_dinov2"]))
    return env


@pytest.fixture(scope="module")
def detectors(env):
    return M.load_detectors(M.METRICS, {m: env["weights"][m] for m in M.METRICS}, device="cpu", progress=False)


# Float32 features of the same image differ in the last bits between batch compositions; more so on a GPU
# (cuDNN picks kernels by batch size), where the tests run too (benchmarks: python -m pytest on a GPU machine).
FEATURE_RTOL = 1e-4 if torch.cuda.is_available() else 1e-6


def _cli(*args) -> tuple[int, str]:
    from calculate_metrics import main

    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


# ----------------------------------------------------------------------------------------------------------
# ref / calc / gen


def test_statistics_do_not_depend_on_image_order_or_batch_size(env, detectors):
    a = M.dataset_statistics(env["data"], detectors=detectors, batch_size=30, workers=0, progress=False)
    b = M.dataset_statistics(env["shuffled"], detectors=detectors, batch_size=7, workers=0, progress=False)
    c = M.dataset_statistics(env["zip"], detectors=detectors, batch_size=4, workers=1, progress=False)
    for metric, s in a.items():
        assert s.num_images == 30 and s.feature_dim == detectors[metric].feature_dim
        assert np.abs(s.sigma).max() > 1e-6  # features vary across images
        for other in (b[metric], c[metric]):
            np.testing.assert_allclose(other.mu, s.mu, rtol=1e-5, atol=1e-7 * np.abs(s.mu).max())
            np.testing.assert_allclose(other.sigma, s.sigma, rtol=1e-4, atol=1e-5 * np.abs(s.sigma).max())
            assert M.frechet_distance(other.mu, other.sigma, s.mu, s.sigma) < 1e-6


def test_ref_then_calc_flow(weights_env, tmp_path):
    env = weights_env
    ref = tmp_path / "ref.npz"
    code, out = _cli("ref", "--data", env["data"], "--dest", ref, "--batch", 8, "--workers", 0, "--no-progress")
    assert code == 0, out
    assert "Wrote fid, fd_dinov2 statistics of 30 images" in out
    with np.load(ref, allow_pickle=False) as f:  # plain arrays, no pickles
        meta = json.loads(bytes(f["meta_json"]))
        assert f["fid/mu"].shape == (tiny_detector("fid").feature_dim,) and f["fd_dinov2/sigma"].shape == (16, 16)
    assert (
        meta["metrics"]["fid"]["num_images"] == 30
        and meta["metrics"]["fid"]["detector"]["weights"] == "fid.safetensors"
    )
    # The same images (zip) against their own statistics: 0; a subset: > 0.
    code, out = _cli("calc", "--images", env["zip"], "--ref", ref, "--num", 30, "--workers", 0, "--no-progress",
                     "--out", tmp_path / "same.json")  # fmt: skip
    assert code == 0, out
    same = json.loads((tmp_path / "same.json").read_text())["results"]
    assert set(same) == {"fid", "fd_dinov2"} and all(v < 1e-6 for v in same.values())
    code, out = _cli("calc", "--images", env["data"], "--ref", ref, "--num", 20, "--metrics", "fid", "--workers", 0,
                     "--no-progress", "--out", tmp_path / "sub.json")  # fmt: skip
    assert code == 0, out
    sub = json.loads((tmp_path / "sub.json").read_text())["results"]
    assert list(sub) == ["fid"] and sub["fid"] > 1e-4
    assert "fid" in out and "(20 images)" in out
    # Library == CLI
    lib = M.calc_metrics_for_images(env["data"], ref, "fid", num=20, workers=0, progress=False)
    assert lib["fid"] == pytest.approx(sub["fid"], rel=1e-9)


def test_official_layout_reference_and_seeded_subset(weights_env, detectors, tmp_path):
    """`ref --dest X.pkl` writes the official layout; `--num N --seed S` below the folder size takes the official
    tool's seeded subset (M.official_subset, checked against the official code in test_official_tools.py), not
    the first N names: its statistics are those of a folder holding just those images."""
    env = weights_env
    code, out = _cli("ref", "--data", env["data"], "--dest", tmp_path / "r.pkl", "--num", 12, "--seed", 5,
                     "--batch", 8, "--workers", 0, "--no-progress")  # fmt: skip
    assert code == 0, out
    chosen = M.official_subset(30, 12, 5)
    assert chosen != list(range(12)) and len(chosen) == 12
    ref = M.load_reference(tmp_path / "r.pkl")
    alone = M.dataset_statistics(_write_pngs(tmp_path / "alone", env["images"][chosen]), detectors=detectors,
                                 workers=0, progress=False)  # fmt: skip
    for metric, s in alone.items():
        assert ref[metric].num_images == 12
        assert M.frechet_distance(ref[metric].mu, ref[metric].sigma, s.mu, s.sigma) < 1e-6
    code, out = _cli("calc", "--images", env["data"], "--ref", tmp_path / "r.pkl", "--num", 12, "--seed", 5,
                     "--workers", 0, "--no-progress", "--out", tmp_path / "same.json")  # fmt: skip
    assert code == 0, out
    assert all(v < 1e-6 for v in json.loads((tmp_path / "same.json").read_text())["results"].values())
    other = M.dataset_statistics(env["data"], "fid", num=12, seed=6, detectors=detectors, workers=0, progress=False)
    assert M.compare_to_reference(other, ref)["fid"] > 1e-4  # another seed, other images


def test_gen_scores_a_model_without_writing_images(weights_env, tmp_path):
    """gen == generate PNGs then calc (same images), and nothing is written."""
    from edm2.generation import generate_images
    from edm2.model_files import load_network

    env = weights_env
    ref = tmp_path / "ref.npz"
    assert _cli("ref", "--data", env["data"], "--dest", ref, "--workers", 0, "--no-progress")[0] == 0
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out = _cli("gen", "--net", env["net"], "--ref", ref, "--seeds", "0-9", "--steps", 3, "--batch", 4,
                     "--no-progress", "--out", tmp_path / "gen.json")  # fmt: skip
    assert code == 0, out
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["gen.json"])
    got = json.loads((tmp_path / "gen.json").read_text())["results"]
    from torch_utils import distributed as dist

    loaded = load_network(env["net"], device=dist.device())  # where gen runs it
    generate_images(loaded.net, range(10), outdir=tmp_path / "pngs", batch_size=4, num_steps=3, progress=False)
    code, out = _cli("calc", "--images", tmp_path / "pngs", "--ref", ref, "--num", 10, "--workers", 0, "--no-progress",
                     "--out", tmp_path / "calc.json")  # fmt: skip
    assert code == 0, out
    expected = json.loads((tmp_path / "calc.json").read_text())["results"]
    assert got == pytest.approx(expected, rel=10 * FEATURE_RTOL) and all(v > 0 for v in got.values())


def test_torchrun_two_processes_give_the_statistics_of_one(env, detectors, tmp_path):
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "EDM2_INCEPTION_WEIGHTS": str(env["weights"]["fid"]),
               "EDM2_DINOV2_WEIGHTS": str(env["weights"]["fd_dinov2"])}  # fmt: skip
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        environ.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "calculate_metrics.py",
           "ref", "--data", str(env["data"]), "--dest", str(tmp_path / "ref2.npz"), "--batch", "4", "--workers", "0",
           "--no-progress"]  # fmt: skip
    p = subprocess.run(cmd, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("Wrote fid, fd_dinov2 statistics of 30 images") == 1  # rank 0 writes and prints
    two = M.load_reference(tmp_path / "ref2.npz")
    one = M.dataset_statistics(env["data"], detectors=detectors, batch_size=4, workers=0, progress=False)
    for metric in M.METRICS:
        assert two[metric].num_images == 30
        mu, sigma = one[metric].mu, one[metric].sigma
        np.testing.assert_allclose(two[metric].mu, mu, rtol=FEATURE_RTOL, atol=FEATURE_RTOL * np.abs(mu).max())
        np.testing.assert_allclose(two[metric].sigma, sigma, rtol=FEATURE_RTOL, atol=FEATURE_RTOL * np.abs(sigma).max())


def test_phema_sweep_on_fid(weights_env, tmp_path):
    """The EMA-length sweep scores every reconstruction by FID of generated images (nothing written but the
    table and the plot)."""
    from phema_sweep import main

    env = weights_env
    ref = tmp_path / "ref.npz"
    assert (
        _cli("ref", "--data", env["data"], "--dest", ref, "--workers", 0, "--no-progress", "--metrics", "fid")[0] == 0
    )
    from edm2.model_files import load_network

    run = tmp_path / "run"
    gen = torch.Generator().manual_seed(0)
    nets = {std: load_network(env["net"]).net for std in (0.05, 0.10)}
    for step in range(1, 5):  # snapshots of a "training run": each EMA's weights drift a little per step
        for std, net in nets.items():
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=gen))
            save_network(run / f"network-snapshot-{step:07d}-{std:.3f}.safetensors", net,
                         encoder={"class": "standard_rgb"}, ema_std=std, training_nimg=step * 1000)  # fmt: skip
    result = CliRunner().invoke(
        main,
        ["--indir", str(run), "--metric", "fid", "--ref", str(ref), "--seeds", "0-5", "--steps", "2", "--outstd",
         "0.05,0.08,0.1", "--eval-batch", "6", "--outdir", str(tmp_path / "sweep")],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "best EMA length" in result.output and "fid" in result.output
    table = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert table["metric"] == "fid" and table["stds"] == pytest.approx([0.05, 0.08, 0.1])
    assert all(np.isfinite(v) and v > 0 for v in table["values"]) and len(set(table["values"])) == 3
    assert (tmp_path / "sweep" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    result = CliRunner().invoke(main, ["--indir", str(run), "--metric", "fid", "--outdir", str(tmp_path / "x")])
    assert result.exit_code != 0 and "--ref" in result.output


# ----------------------------------------------------------------------------------------------------------
# Reference files and bad input


def test_official_reference_pickles_are_read_without_running_code(tmp_path):
    import pickle

    rng = np.random.default_rng(4)
    stats = {"fid": {"mu": rng.standard_normal(8), "sigma": _random_cov(8, rng)},
             "fd_dinov2": {"mu": rng.standard_normal(4), "sigma": _random_cov(4, rng)}}  # fmt: skip
    (tmp_path / "img64.pkl").write_bytes(pickle.dumps(stats))
    ref = M.load_reference(tmp_path / "img64.pkl")
    for metric in stats:
        np.testing.assert_array_equal(ref[metric].mu, stats[metric]["mu"])
        np.testing.assert_array_equal(ref[metric].sigma, stats[metric]["sigma"])
    (tmp_path / "evil.pkl").write_bytes(b"\x80\x04cos\nsystem\n(S'echo pwned'\ntR.")
    with pytest.raises(Exception, match="evil.pkl"):
        M.load_reference(tmp_path / "evil.pkl")
    (tmp_path / "junk.npz").write_bytes(b"hello")
    with pytest.raises(M.MetricsError, match="junk.npz: not a reference file"):
        M.load_reference(tmp_path / "junk.npz")


def _error(*args) -> str:
    code, out = _cli(*args)
    assert code != 0, out
    return out


def test_bad_input_is_named(weights_env, tmp_path):
    env = weights_env
    ref = tmp_path / "ref-fid.npz"
    assert (
        _cli("ref", "--data", env["data"], "--dest", ref, "--metrics", "fid", "--workers", 0, "--no-progress")[0] == 0
    )
    # fewer images than asked
    out = _error("calc", "--images", env["data"], "--ref", ref, "--num", 31, "--workers", 0, "--no-progress")
    assert str(env["data"]) in out and "holds 30 images, fewer than the 31 asked for (--num)" in out
    # a reference without the asked metric
    out = _error("calc", "--images", env["data"], "--ref", ref, "--num", 30, "--metrics", "fd_dinov2", "--no-progress")
    assert "ref-fid.npz: holds statistics for fid, not for fd_dinov2" in out
    # a reference made with a detector of another feature width
    wide = save_detector(
        tmp_path / "wide.safetensors", tiny_detector("fid", seed=5).__class__(resolution=75, width=0.125)
    )
    out = _error("calc", "--images", env["data"], "--ref", ref, "--num", 30, "--inception-weights", wide,
                 "--workers", 0, "--no-progress")  # fmt: skip
    assert "ref-fid.npz: fid statistics have 128 features but the detector gives 256" in out
    # images of mixed sizes, mixed channel counts
    mixed = _write_pngs(tmp_path / "mixed", [np.zeros((16, 16, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)])
    out = _error("ref", "--data", mixed, "--dest", tmp_path / "m.npz", "--workers", 0, "--no-progress")
    assert "img00001.png" in out and "[3, 8, 8], expected [3, 16, 16]" in out
    gray = _write_pngs(tmp_path / "gray", [np.zeros((16, 16, 3), np.uint8), np.zeros((16, 16), np.uint8)])
    out = _error("ref", "--data", gray, "--dest", tmp_path / "g.npz", "--workers", 1, "--no-progress")
    assert "img00001.png" in out and "[1, 16, 16], expected [3, 16, 16]" in out
    # detector weights that do not fit; a reference that is not one; a destination that is not .npz
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 16)
    out = _error("ref", "--data", env["data"], "--dest", tmp_path / "b.npz",
                 "--dinov2-weights", tmp_path / "broken.safetensors",
                 "--metrics", "fd_dinov2", "--no-progress")  # fmt: skip
    assert "broken.safetensors: cannot read detector weights" in out
    out = _error("calc", "--images", env["data"], "--ref", env["net"], "--no-progress")
    assert "net.safetensors" in out
    assert "must end in .npz or .pkl" in _error("ref", "--data", env["data"], "--dest", tmp_path / "r.txt")
    # one image or one seed: no covariance, said naming the option
    out = _error("ref", "--data", env["data"], "--dest", tmp_path / "one.npz", "--num", 1, "--no-progress")
    assert "need at least 2 images for a covariance (--num), got 1" in out, out
    out = _error("gen", "--net", env["net"], "--ref", ref, "--seeds", "7", "--steps", 2, "--no-progress")
    assert "need at least 2 seeds for a covariance (--seeds, or --num), got 1" in out, out
    # a truncated reference, one with a flipped byte (zip's CRC): one line, no BadZipFile traceback
    raw = ref.read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0xFF
    (tmp_path / "flipped.npz").write_bytes(bytes(flipped))
    for name in ("cut.npz", "flipped.npz"):
        out = _error("calc", "--images", env["data"], "--ref", tmp_path / name, "--num", 30, "--no-progress")
        assert f"{name}: cannot read reference statistics" in out, out
    # outputs below a file (refused before the work) or in a folder that cannot be made (after it)
    (tmp_path / "afile").write_bytes(b"")
    out = _error("ref", "--data", env["data"], "--dest", tmp_path / "afile" / "r.npz", "--no-progress")
    assert "'--dest'" in out and "afile' is a file, not a folder" in out, out
    out = _error("calc", "--images", env["data"], "--ref", ref, "--num", 30, "--out", tmp_path / "afile" / "r.json")
    assert "'--out'" in out and "afile' is a file, not a folder" in out, out
    if sys.platform.startswith("linux"):  # /proc takes no new folders, whoever asks (root included)
        out = _error("ref", "--data", env["data"], "--dest", "/proc/edm2-no-such/r.npz", "--metrics", "fid",
                     "--workers", 0, "--no-progress")  # fmt: skip
        assert "cannot write --dest '/proc/edm2-no-such/r.npz' (No such file or directory)" in out, out
    assert "non-empty list of fid, fd_dinov2" in _error("ref", "--data", env["data"], "--dest", ref, "--metrics", "is")


def test_out_of_memory_names_batch(env, tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(M, "calc_metrics_for_images", oom)
    from calculate_metrics import main

    r = CliRunner().invoke(main, ["calc", "--images", str(env["data"]), "--ref", str(tmp_path / "r.npz"),
                                  "--no-progress"])  # fmt: skip
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "Error: out of GPU memory; give a smaller --batch" in r.output
