"""Without network access the VAE fails in a few lines: what was tried, the local-folder option (--vae DIR), the cache
variables (HF_HOME / HF_HUB_CACHE) and how to pre-download; no traceback, no retries, nothing written.

The hub client reads its settings at import, so these run in subprocesses with an empty cache and either
HF_HUB_OFFLINE=1 or the hub's endpoint at a local port where nothing listens."""

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from conftest import ROOT
from training.demo_data import write_demo_dataset


@pytest.fixture(scope="module")
def pixels(tmp_path_factory):
    return write_demo_dataset(str(tmp_path_factory.mktemp("px") / "px.zip"), num_images=4, resolution=16)


def run_offline(tmp_path, args, **hub_env):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(ROOT), **hub_env)
    # The timeout catches a hang; the hub client's retries (tens of seconds) are caught by the 'Retrying' check.
    proc = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def assert_short_vae_message(rc, out, why):
    assert rc == 1, out
    assert "Traceback" not in out and "Retrying" not in out, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert 2 <= len(lines) <= 6, out
    assert lines[0].startswith("Error: cannot load the VAE") and why in lines[0], out
    assert "--vae DIR" in out and "HF_HOME" in out and "HF_HUB_CACHE" in out and "AutoencoderKL.from_pretrained(" in out
    assert str(os.path.join("hf", "hub")) in out  # the cache folder that was looked in


@pytest.mark.parametrize("hub_env,why", [
    (dict(HF_HUB_OFFLINE="1"), "HF_HUB_OFFLINE is set"),
    (dict(HF_ENDPOINT="http://127.0.0.1:9"), "cannot be reached (127.0.0.1:9"),
], ids=["offline", "unreachable"])
def test_encode_without_network(tmp_path, pixels, hub_env, why):
    args = [str(ROOT / "dataset_tool.py"), "encode", "--source", pixels, "--dest", "out/lat.zip", "--device", "cpu"]
    rc, out = run_offline(tmp_path, args, **hub_env)
    assert_short_vae_message(rc, out, why)
    assert set(os.listdir(tmp_path)) <= {"hf"}  # no output zip, no out/ folder


def test_generate_latent_model_without_network(tmp_path):
    import torch

    from edm2.model_files import save_network
    from networks import Precond
    from training.encoders import STABILITY_VAE_DEFAULTS

    net = Precond(img_resolution=8, img_channels=4, label_dim=0, model_channels=8, channel_mult=[1], num_blocks=1,
                  attn_resolutions=[], channels_per_head=8, logvar_channels=8)
    torch.manual_seed(0)
    encoder = dict(STABILITY_VAE_DEFAULTS, **{"class": "stability_vae"})
    save_network(tmp_path / "latent.safetensors", net, encoder=encoder)
    rc, out = run_offline(tmp_path, [str(ROOT / "generate.py"), "--net", "latent.safetensors", "--outdir", "images",
                                     "--seeds", "0-1", "--steps", "2"], HF_HUB_OFFLINE="1")
    assert_short_vae_message(rc, out, "HF_HUB_OFFLINE is set")
    assert not (tmp_path / "images").exists()  # the VAE is loaded before sampling, so nothing was written


def test_missing_local_vae_folder_is_one_line(tmp_path, pixels):
    from dataset_tool import main

    (tmp_path / "empty").mkdir()
    for folder, says in ((tmp_path / "nope", "no such folder"), (tmp_path / "empty", "no config.json")):
        result = CliRunner().invoke(main, ["encode", "--source", pixels, "--dest", str(tmp_path / "o.zip"), "--vae",
                                           str(folder), "--device", "cpu"])
        assert result.exit_code == 1 and "Traceback" not in result.output
        errors = [line for line in result.output.splitlines() if line.strip()]
        assert len(errors) == 1 and errors[0].startswith(f"Error: --vae {folder}: {says}"), result.output
    assert not (tmp_path / "o.zip").exists()
