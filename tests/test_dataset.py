"""Datasets, the resumable sampler, dataset_tool.py (convert, encode) and training on VAE latents."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

from training.dataset import DatasetError, ImageFolderDataset, InfiniteSampler
from training.demo_data import write_demo_dataset


@pytest.fixture(scope="module")
def demo_zip(tmp_path_factory):
    return write_demo_dataset(str(tmp_path_factory.mktemp("d") / "demo.zip"), num_images=20, resolution=16)


def test_zip_and_folder_give_the_same_items(demo_zip, tmp_path):
    with zipfile.ZipFile(demo_zip) as z:
        z.extractall(tmp_path / "folder")
    a, b = ImageFolderDataset(demo_zip), ImageFolderDataset(str(tmp_path / "folder"))
    assert len(a) == len(b) == 20 and a.label_dim == 10 and a.raw_shape == [3, 16, 16]
    for i in (0, 7, 19):
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])
    assert a[3][1].argmax() == 3  # demo labels cycle through the classes


def test_xflip_doubles_and_mirrors(demo_zip):
    d = ImageFolderDataset(demo_zip, xflip=True)
    assert len(d) == 40
    assert torch.equal(d[25][0], d[5][0].flip(-1)) and torch.equal(d[25][1], d[5][1])


def test_unconditional_has_no_labels(demo_zip):
    d = ImageFolderDataset(demo_zip, use_labels=False)
    assert d.label_dim == 0 and d[0][1].numel() == 0


def test_npy_latents(tmp_path):
    for i in range(3):
        np.save(tmp_path / f"{i}.npy", np.full([8, 4, 4], i, dtype=np.float32))
    d = ImageFolderDataset(str(tmp_path), use_labels=False)
    assert d.is_latent and d.raw_shape == [8, 4, 4] and d[2][0].dtype == torch.float32 and d[2][0].mean() == 2


def test_corrupt_image_is_named(tmp_path, demo_zip):
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(demo_zip) as src, zipfile.ZipFile(bad, "w") as dst:
        for n in src.namelist():
            dst.writestr(n, src.read(n)[:40] if n.endswith("img00000004.png") else src.read(n))
    d = ImageFolderDataset(str(bad))
    with pytest.raises(DatasetError, match="img00000004.png"):
        d[4]


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda p: p / "nothing-here", "no such folder or file"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "holds no .png or .npy"),
        (lambda p: (p / "x.zip").write_text("not a zip") and p / "x.zip", "not a folder or a zip"),
    ],
)
def test_bad_dataset_paths(tmp_path, make, match):
    with pytest.raises(DatasetError, match=match):
        ImageFolderDataset(str(make(tmp_path)))


def test_compressed_zip_is_refused(tmp_path, demo_zip):
    packed = tmp_path / "packed.zip"
    with zipfile.ZipFile(demo_zip) as src, zipfile.ZipFile(packed, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for n in src.namelist():
            dst.writestr(n, src.read(n))
    with pytest.raises(DatasetError, match="uncompressed"):
        ImageFolderDataset(str(packed))


def take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_sampler_global_batches_do_not_depend_on_the_split():
    one = take(InfiniteSampler(10, batch_size=8, batch_gpu=8, seed=1), 8 * 5)
    r0 = take(InfiniteSampler(10, 8, 2, rank=0, world_size=2, seed=1), 4 * 5)
    r1 = take(InfiniteSampler(10, 8, 2, rank=1, world_size=2, seed=1), 4 * 5)
    for step in range(5):
        mine = one[step * 8 : (step + 1) * 8]
        # chunk (round, rank) sits at offset (round * world + rank) * batch_gpu
        split = (
            r0[step * 4 : step * 4 + 2] + r1[step * 4 : step * 4 + 2]
            + r0[step * 4 + 2 : step * 4 + 4] + r1[step * 4 + 2 : step * 4 + 4]
        )
        assert mine == split
    assert sorted(one[:10]) == list(range(10))  # each epoch is a permutation


def test_sampler_resumes_at_a_step():
    full = take(InfiniteSampler(7, 4, 4, seed=2), 4 * 6)
    assert take(InfiniteSampler(7, 4, 4, seed=2, start_step=3), 4 * 3) == full[12:]


# --- dataset_tool.py -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory):
    """Two class folders of JPEGs in odd sizes, like ImageNet's training set."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for c, cls in enumerate(["n01440764", "n01443537"]):
        (root / cls).mkdir()
        for i in range(3):
            arr = rng.integers(0, 255, size=(40 + 7 * i, 56 - 5 * i, 3), dtype=np.uint8)
            PIL.Image.fromarray(arr).save(root / cls / f"{cls}_{i}.JPEG", quality=95)
    return root


def test_convert_imagenet_layout(imagenet_like, tmp_path):
    from dataset_tool import main

    dest = tmp_path / "out.zip"
    r = CliRunner().invoke(main, ["convert", "--source", str(imagenet_like), "--dest", str(dest), "--resolution", "16"])
    assert r.exit_code == 0, r.output
    d = ImageFolderDataset(str(dest))
    assert len(d) == 6 and d.raw_shape == [3, 16, 16] and d.label_dim == 2
    assert [int(d[i][1].argmax()) for i in range(6)] == [0, 0, 0, 1, 1, 1]


def test_center_crop_dhariwal_steps():
    from dataset_tool import center_crop_dhariwal

    img = PIL.Image.new("RGB", (300, 100))
    out = center_crop_dhariwal(img, 32)
    assert out.size == (32, 32)


def test_convert_bad_source(tmp_path):
    from dataset_tool import main

    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(
        main, ["convert", "--source", str(tmp_path / "empty"), "--dest", str(tmp_path / "o.zip"), "--resolution", "16"]
    )
    assert r.exit_code != 0 and "holds no images" in r.output
    assert not (tmp_path / "o.zip").exists()


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 8, 8, 8], layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32,
    )
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return str(path)


def test_encode_then_train_on_latents(tmp_path, tiny_vae):
    """The img512 path in miniature: pixels -> VAE raw latents -> training with the VAE encoder -> snapshot."""
    from dataset_tool import main
    from train_edm2 import main as train

    pixels = write_demo_dataset(str(tmp_path / "px.zip"), num_images=6, resolution=64)
    latents = tmp_path / "lat.zip"
    r = CliRunner().invoke(
        main,
        ["encode", "--source", pixels, "--dest", str(latents), "--vae", tiny_vae, "--batch", "4", "--device", "cpu"],
    )
    assert r.exit_code == 0, r.output
    d = ImageFolderDataset(str(latents))
    assert d.is_latent and d.raw_shape == [8, 8, 8] and d.label_dim == 10
    assert (d[0][0][4:] > 0).all()  # the second half holds posterior stds
    first3 = tmp_path / "first3.zip"
    args = ["encode", "--source", pixels, "--dest", str(first3), "--model-url", tiny_vae, "--max-images", "3"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0 and len(ImageFolderDataset(str(first3))) == 3, r.output  # the official names

    net = json.dumps(dict(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], logvar_channels=8))
    r = CliRunner().invoke(train, [
        "--outdir", str(tmp_path / "run"), "--data", str(latents), "--vae", tiny_vae, f"--network-kwargs={net}",
        "--duration", "8", "--batch", "4", "--status", "4", "--snapshot", "8", "--checkpoint", "8", "--workers", "0",
        "--P_mean=-0.4",
    ])
    assert r.exit_code == 0, r.output
    from edm2 import load_network

    f = load_network(tmp_path / "run" / "network-snapshot-0000000-0.050.safetensors")
    assert f.encoder["class"] == "stability_vae" and f.encoder["vae_name"] == tiny_vae
    assert f.net.img_channels == 4 and f.net.img_resolution == 8 and f.meta["training_nimg"] == 8


WORKER_TEMP_DIRS = """
import glob, os, sys, torch
sys.path.insert(0, os.getcwd())
from training.dataset import share_worker_temp_dir
if sys.argv[1] == "shared":
    share_worker_temp_dir()
class Tensors(torch.utils.data.Dataset):
    def __len__(self): return 32
    def __getitem__(self, i): return torch.full([256], float(i))
seen = set()
for batch in torch.utils.data.DataLoader(Tensors(), batch_size=4, num_workers=2):
    seen |= set(glob.glob(os.path.join(os.environ["TMPDIR"], "pymp-*")))
print(len(seen))
"""


@pytest.mark.parametrize("mode", ["shared", "own"])
def test_dataloader_workers_share_the_main_process_temp_dir(tmp_path, mode):
    """With share_worker_temp_dir (the training loop and the metrics call it), the workers put the sockets that pass
    their batches into the main process's multiprocessing temp dir, which only the main process removes, at its
    exit: one dir while the workers run (instead of one per worker, each removed by its worker while a batch may
    still be in flight), none after."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    temp = tmp_path / "tmp"
    temp.mkdir()
    done = subprocess.run([sys.executable, "-c", WORKER_TEMP_DIRS, mode], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, TMPDIR=str(temp)))  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) == (1 if mode == "shared" else 2)  # "own": what happens without it
    if mode == "shared":
        assert not list(temp.glob("pymp-*"))
