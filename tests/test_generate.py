"""generate.py and edm2.generation: PNGs by seed, grids, guidance, latents, torchrun, reproducibility, bad input."""

from __future__ import annotations

import functools
import http.server
import os
import pathlib
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import ROOT

from edm2.generation import generate_batch, image_path, make_grid, seed_batches
from edm2.model_files import save_network
from edm2.sampler import count_evaluations, edm_settings
from networks import Precond
from torch_utils import distributed as dist
from training.encoders import encoder_from_config

TINY = {
    "img_resolution": 16,
    "img_channels": 3,
    "label_dim": 10,
    "model_channels": 16,
    "channel_mult": [1, 2, 2],
    "num_blocks": 1,
    "attn_resolutions": [8, 4],
    "channels_per_head": 16,
    "logvar_channels": 16,
}
FAST = ["--steps", "6", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny networks: one thread is faster


def _tiny_net(seed: int, **overrides) -> Precond:
    torch.manual_seed(seed)
    net = Precond(**{**TINY, **overrides})
    with torch.no_grad():  # non-zero gains so that every layer shapes the output
        for name, p in net.named_parameters():
            if name.endswith("gain"):
                p.fill_(0.7)
    return net.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, pathlib.Path]:
    from diffusers import AutoencoderKL

    d = tmp_path_factory.mktemp("models")
    out = {
        "net": d / "net.safetensors",
        "gnet": d / "gnet.safetensors",
        "uncond": d / "uncond.safetensors",
        "gnet_labels5": d / "gnet_labels5.safetensors",
        "gnet_res8": d / "gnet_res8.safetensors",
        "latent": d / "latent.safetensors",
        "latent_noenc": d / "latent_noenc.safetensors",
        "vae": d / "vae",
    }
    save_network(out["net"], _tiny_net(0), encoder={"class": "standard_rgb"})
    save_network(out["gnet"], _tiny_net(1, model_channels=8))
    save_network(out["uncond"], _tiny_net(2, model_channels=8, label_dim=0))
    save_network(out["gnet_labels5"], _tiny_net(3, model_channels=8, label_dim=5))
    save_network(out["gnet_res8"], _tiny_net(4, model_channels=8, img_resolution=8, attn_resolutions=[4]))
    torch.manual_seed(5)
    AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 8, 8, 8],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
    ).save_pretrained(out["vae"])
    latent_net = _tiny_net(6, img_resolution=8, img_channels=4, attn_resolutions=[4])
    save_network(out["latent"], latent_net, encoder={"class": "stability_vae", "vae_name": str(out["vae"])})
    save_network(out["latent_noenc"], latent_net)
    return out


def _run(*args: str):
    from generate import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _png(path: pathlib.Path) -> np.ndarray:
    import PIL.Image

    with PIL.Image.open(path) as im:
        assert im.mode == "RGB"
        return np.array(im)


def _pngs(folder: pathlib.Path, seeds) -> np.ndarray:
    return np.stack([_png(image_path(folder, s)) for s in seeds])


def test_pngs_by_seed_grid_and_summary(files, tmp_path):
    seeds = [0, 1, 2, 3, 9]
    r = _run(
        "--net",
        files["net"],
        "--gnet",
        files["gnet"],
        "--guidance",
        "1.5",
        "--seeds",
        "0-3,9",
        "--batch",
        "4",
        "--outdir",
        tmp_path / "out",
        "--grid",
        tmp_path / "grid.png",
        *FAST,
    )
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{s:06d}.png" for s in seeds]
    images = _pngs(tmp_path / "out", seeds)
    assert images.shape == (5, 16, 16, 3) and images.std() > 1  # not blank
    grid = _png(tmp_path / "grid.png")
    assert grid.shape == (2 * 16, 3 * 16, 3)  # ceil(sqrt(5)) = 3 columns, 2 rows
    np.testing.assert_array_equal(grid, make_grid(images.transpose(0, 3, 1, 2)))
    np.testing.assert_array_equal(grid[16:32, 16:32], images[4])  # seed 9 at row 1, column 1
    assert not grid[16:32, 32:48].any()  # the unused last cell stays black
    evals = count_evaluations(edm_settings(num_steps=6, guidance=1.5)).total_evals
    assert evals == 22
    assert "Generated 5 images in" in r.output and f"{evals} network evaluations per image" in r.output
    assert "Speed: kernels reference, not compiled: no CUDA device.\n" in r.output and r.output.count("Speed:") == 1
    assert "img/s" in r.output


def test_cli_output_matches_the_library(files, tmp_path):
    from edm2.model_files import load_network

    r = _run(
        "--net",
        files["net"],
        "--gnet",
        files["uncond"],
        "--guidance",
        "2",
        "--seeds",
        "3-6",
        "--batch",
        "4",
        "--s-churn",
        "10",
        "--outdir",
        tmp_path,
        *FAST,
    )
    assert r.exit_code == 0, r.output
    net, uncond = load_network(files["net"]).net, load_network(files["uncond"]).net
    expected = generate_batch(net, [3, 4, 5, 6], gnet=uncond, guidance=2, num_steps=6, S_churn=10)
    np.testing.assert_array_equal(_pngs(tmp_path, [3, 4, 5, 6]), expected.permute(0, 2, 3, 1).numpy())


def test_batch_size_changes_only_float_rounding(files, tmp_path):
    args = [
        "--net",
        files["net"],
        "--gnet",
        files["gnet"],
        "--guidance",
        "1.7",
        "--seeds",
        "0-7",
        "--s-churn",
        "5",
        *FAST,
    ]
    assert _run(*args, "--batch", "4", "--outdir", tmp_path / "b4").exit_code == 0
    assert _run(*args, "--batch", "1", "--outdir", tmp_path / "b1").exit_code == 0
    assert _run(*args, "--batch", "3", "--outdir", tmp_path / "b3").exit_code == 0
    b4, b1, b3 = (_pngs(tmp_path / d, range(8)).astype(int) for d in ("b4", "b1", "b3"))
    # Same noise, classes and churn noise per seed: the images agree up to the last rounding step. (Batched
    # float32 CPU kernels sum in a batch-dependent order, so a value near a rounding boundary can flip.)
    for other in (b1, b3):
        assert np.abs(b4 - other).max() <= 1
        assert (b4 != other).mean() <= 0.005
    # Changing the seed changes the image completely: the agreement above is not trivial.
    assert (b4[0] != b4[1]).mean() > 0.5


def test_torchrun_two_processes_match_one_bit_for_bit(files, tmp_path):
    args = [
        "generate.py",
        "--net",
        files["net"],
        "--gnet",
        files["gnet"],
        "--guidance",
        "1.6",
        "--seeds",
        "0-6,20",
        "--batch",
        "3",
        "--s-churn",
        "4",
        "--guidance-interval",
        "0.1,20",
        *FAST,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)

    def launch(nproc: int, name: str) -> str:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            *map(str, args),
            "--outdir",
            str(tmp_path / name),
            "--grid",
            str(tmp_path / f"{name}.png"),
        ]
        p = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
        return p.stdout

    out1, out2 = launch(1, "one"), launch(2, "two")
    assert "Generated 8 images" in out1 and "1 process)" in out1
    assert "Generated 8 images" in out2 and "2 processes" in out2 and out2.count("Generated") == 1  # rank 0 only
    seeds = [0, 1, 2, 3, 4, 5, 6, 20]
    for seed in seeds:
        assert (tmp_path / "one" / f"{seed:06d}.png").read_bytes() == (
            tmp_path / "two" / f"{seed:06d}.png"
        ).read_bytes()
    assert (tmp_path / "one.png").read_bytes() == (tmp_path / "two.png").read_bytes()


def test_seed_batches_and_rank_split():
    batches = seed_batches([5, 6, 7, 8, 9, 10, 11], 3)
    assert batches == [[5, 6, 7], [8, 9], [10, 11]]  # balanced, as numpy.array_split (the official generator)
    assert [len(b) for b in seed_batches(range(40), 32)] == [20, 20]
    assert [len(b) for b in seed_batches(range(50000), 32)] == [32] * 1547 + [31] * 16
    assert seed_batches([3], 32) == [[3]] and seed_batches(range(4), 2) == [[0, 1], [2, 3]]
    assert dist.split_for_rank(batches, 0, 2) == [[5, 6, 7], [10, 11]]
    assert dist.split_for_rank(batches, 1, 2) == [[8, 9]]
    assert dist.split_for_rank(batches, 0, 1) == batches
    with pytest.raises(ValueError, match="rank 2"):
        dist.split_for_rank(batches, 2, 2)
    assert dist.get_rank() == 0 and dist.get_world_size() == 1 and dist.is_main()


def test_subdirs_class_and_interval(files, tmp_path):
    base = ["--net", files["net"], "--batch", "4", *FAST]
    r = _run(*base, "--seeds", "998-1001", "--subdirs", "--outdir", tmp_path / "sub")
    assert r.exit_code == 0, r.output
    found = sorted(str(p.relative_to(tmp_path / "sub")) for p in (tmp_path / "sub").rglob("*.png"))
    assert found == ["000000/000998.png", "000000/000999.png", "001000/001000.png", "001000/001001.png"]
    # A fixed class: the same noise, a different label, so a different image; equal to the library's.
    assert _run(*base, "--seeds", "0-3", "--class", "7", "--outdir", tmp_path / "c7").exit_code == 0
    from edm2.model_files import load_network

    net = load_network(files["net"]).net
    fixed = generate_batch(net, [0, 1, 2, 3], class_idx=7, num_steps=6).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(_pngs(tmp_path / "c7", range(4)), fixed)
    random_class = generate_batch(net, [0, 1, 2, 3], num_steps=6).permute(0, 2, 3, 1).numpy()
    assert (fixed != random_class).mean() > 0.1
    # A guidance interval that holds no step's sigma gives exactly the unguided images.
    g = ["--gnet", files["gnet"], "--guidance", "3"]
    assert (
        _run(*base, *g, "--seeds", "0-3", "--guidance-interval", "100,200", "--outdir", tmp_path / "none").exit_code
        == 0
    )
    assert _run(*base, "--seeds", "0-3", "--outdir", tmp_path / "plain").exit_code == 0
    assert (
        _run(*base, *g, "--seeds", "0-3", "--guidance-interval", "0.3,5", "--outdir", tmp_path / "some").exit_code == 0
    )
    np.testing.assert_array_equal(_pngs(tmp_path / "none", range(4)), _pngs(tmp_path / "plain", range(4)))
    assert (_pngs(tmp_path / "some", range(4)) != _pngs(tmp_path / "plain", range(4))).mean() > 0.1


def test_latent_model_is_decoded_with_its_vae(files, tmp_path):
    from edm2.model_files import load_network
    from edm2.sampler import edm_sampler
    from edm2.seeds import seed_noise_and_labels

    r = _run("--net", files["latent"], "--seeds", "0-1", "--batch", "2", "--outdir", tmp_path, *FAST)
    assert r.exit_code == 0, r.output
    images = _pngs(tmp_path, [0, 1])
    assert images.shape == (2, 64, 64, 3)  # 8x8 latents, 8x up
    loaded = load_network(files["latent"])
    noise, labels, gens = seed_noise_and_labels([0, 1], [4, 8, 8], label_dim=10)
    with torch.no_grad():
        latents = edm_sampler(loaded.net, noise, labels, num_steps=6, randn_like=gens.randn_like, dtype=torch.float32)
    expected = encoder_from_config(loaded.encoder).decode(latents).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(images, expected)


def test_net_from_url_is_cached(files, tmp_path, monkeypatch):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(files["net"].parent))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("EDM2_CACHE_DIR", str(tmp_path / "cache"))
        url = f"http://127.0.0.1:{server.server_address[1]}/net.safetensors"
        r = _run("--net", url, "--seeds", "0-1", "--outdir", tmp_path / "url", *FAST)
        assert r.exit_code == 0, r.output
        assert _run("--net", files["net"], "--seeds", "0-1", "--outdir", tmp_path / "local", *FAST).exit_code == 0
        np.testing.assert_array_equal(_pngs(tmp_path / "url", [0, 1]), _pngs(tmp_path / "local", [0, 1]))
        cached = list((tmp_path / "cache").iterdir())
        assert len(cached) == 1 and cached[0].read_bytes() == files["net"].read_bytes()
    finally:
        server.shutdown()
        server.server_close()


def test_preset_supplies_net_gnet_and_guidance(files, tmp_path, monkeypatch):
    import edm2.official

    preset = {"net": str(files["net"]), "gnet": str(files["gnet"]), "guidance": 1.8}
    monkeypatch.setattr(edm2.official, "resolve_official_preset", lambda name: dict(preset))
    assert _run("--preset", "anything", "--seeds", "0-1", "--outdir", tmp_path / "p", *FAST).exit_code == 0
    explicit = ["--net", files["net"], "--gnet", files["gnet"], "--guidance", "1.8", "--seeds", "0-1"]
    assert _run(*explicit, "--outdir", tmp_path / "e", *FAST).exit_code == 0
    np.testing.assert_array_equal(_pngs(tmp_path / "p", [0, 1]), _pngs(tmp_path / "e", [0, 1]))


def _error(*args) -> str:
    r = _run(*args)
    assert r.exit_code == 2, r.output  # click's usage error
    return r.output


def test_bad_input_names_the_option(files, tmp_path):
    out = ["--outdir", tmp_path / "never"]
    net = ["--net", files["net"]]
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(files["net"].read_bytes()[:3000])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a model file at all")
    cases = [
        (["--net", tmp_path / "missing.safetensors", *out], ["--net", "missing.safetensors"]),
        (["--net", damaged, *out], ["--net", "damaged.safetensors"]),
        (["--net", garbage, *out], ["--net", "garbage.safetensors"]),
        ([*net, "--gnet", damaged, "--guidance", "2", *out], ["--gnet", "damaged.safetensors"]),
        ([*net, "--guidance", "2", *out], ["--guidance", "--gnet"]),
        ([*net, "--gnet", files["gnet_labels5"], "--guidance", "2", *out], ["--gnet", "label_dim (5)"]),
        ([*net, "--gnet", files["gnet_res8"], "--guidance", "2", *out], ["--gnet", "img_resolution (8)"]),
        ([*net, "--class", "10", *out], ["--class", "out of range", "10 classes"]),
        ([*net, "--class", "-1", *out], ["--class", "out of range"]),
        ([*net, "--seeds", "0-3,x", *out], ["--seeds", "'x'"]),
        ([*net, "--seeds", "5-2", *out], ["--seeds", "backwards"]),
        ([*net, "--seeds", "1,1", *out], ["--seeds", "more than once"]),
        ([*net, "--seeds", "0-99999999999", *out], ["--seeds", "more than 10000000 seeds"]),  # once a MemoryError
        (
            [*net, "--gnet", files["gnet"], "--guidance", "2", "--guidance-interval", "5,1", *out],
            ["--guidance-interval"],
        ),
        ([*net, "--guidance-interval", "abc", *out], ["--guidance-interval"]),
        ([*net, "--sigma-min", "0", *out], ["--sigma-min"]),
        ([*net, "--batch", "0", *out], ["--batch"]),
        ([*net], ["--outdir", "--grid"]),
        ([*out], ["--net", "--preset"]),
        (["--preset", "no-such-preset", *out], ["--preset", "no-such-preset"]),
        (["--net", files["latent_noenc"], *out], ["--net", "no encoder"]),
    ]
    for args, expected in cases:
        text = _error(*args, *FAST)
        for fragment in expected:
            assert fragment in text, (args, text)
    # Beyond int64 the step count once overflowed in a traceback (FAST sets --steps, so not in the list above).
    text = _error(*net, "--steps", "99999999999999999999", *out, "--no-progress")
    assert "'--steps'" in text and "num_steps must be at most 100000" in text, text
    assert not (tmp_path / "never").exists()


def test_outputs_that_cannot_be_written_name_the_option(files, tmp_path):
    """--outdir / --grid below a file (refused before loading), or in a folder that cannot be made (refused before
    sampling): one line naming the option, not an OSError traceback after the sampling."""
    (tmp_path / "afile").write_bytes(b"")
    net = ["--net", files["net"], "--seeds", "0-1", *FAST]
    text = _error(*net, "--outdir", tmp_path / "afile" / "out")
    assert "'--outdir'" in text and "afile' is a file, not a folder" in text, text
    text = _error(*net, "--grid", tmp_path / "afile" / "grid.png")
    assert "'--grid'" in text and "afile' is a file, not a folder" in text, text
    if sys.platform.startswith("linux"):  # /proc takes no new folders, whoever asks (root included)
        assert "cannot create the folder '/proc/edm2-no-such'" in _error(*net, "--outdir", "/proc/edm2-no-such")
        assert "'--grid'" in _error(*net, "--grid", "/proc/edm2-no-such/grid.png")
    assert os.listdir(tmp_path) == ["afile"]


def test_out_of_memory_names_batch(files, tmp_path, monkeypatch):
    import generate

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(generate, "generate_images", oom)
    r = CliRunner().invoke(generate.main, ["--net", str(files["net"]), "--seeds", "0-3", "--batch", "4",
                                           "--outdir", str(tmp_path), *FAST])  # fmt: skip
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "Error: out of GPU memory; give a smaller --batch (4 images per batch and process; each image comes from " \
           "its own seed, whatever the batch)" in r.output  # fmt: skip
