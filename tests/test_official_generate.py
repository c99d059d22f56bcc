"""generate_batch against the official generate_images() on a tiny official pickle (tests/data/NOTES.md)."""

import json
import pathlib

import numpy as np
import pytest
import torch

import edm2
from edm2.generation import generate_batch, prepare_for_sampling, sampling_precision
from edm2.seeds import SeedGenerators, check_noise_device

DATA = pathlib.Path(__file__).parent / "data"


def _official_net():
    net = edm2.load_network(DATA / "official_generate_tiny.pkl").net
    net.precision = sampling_precision(net.precision, "cpu")  # fp16 only on CUDA, as the official code
    return prepare_for_sampling(net)  # what generate.py does by default


def _images(net, cfg):
    return generate_batch(net, cfg["seeds"], class_idx=cfg["class_idx"], **cfg["sampler"]).numpy()


@pytest.mark.parametrize("name", ["ode", "churn_class"])
def test_images_equal_the_official_cpu_images(name):
    ref = np.load(DATA / "official_generate_images.npz")
    cfg = json.loads(str(ref["configs"]))[name]
    net = _official_net()
    assert any(b.num_heads for b in net.unet.blocks() if hasattr(b, "num_heads"))  # attention is covered
    # Every value equal, seed 2^32 + 7 included (the official code takes seeds modulo 2^32). Before the official
    # arithmetic was followed (float16 gain factors, one noise embedding per batch, normalize's single add, the
    # reference attention, the official uint8 conversion), 1.0-1.7% of values were one level apart.
    assert np.array_equal(_images(net, cfg), ref[name])


def test_float32_gain_factors_would_differ():
    """The stored float16 gains make the official code form gain / sqrt(fan_in) in float16; the loader says so."""
    ref = np.load(DATA / "official_generate_images.npz")
    cfg = json.loads(str(ref["configs"]))["churn_class"]
    net = _official_net()
    assert net.unet.gain_dtype == torch.float16
    net.unet.gain_dtype = torch.float32
    diff = np.abs(_images(net, cfg).astype(np.int16) - ref["churn_class"].astype(np.int16))
    assert (diff > 0).mean() > 0.001  # the check above would see this


def test_converted_file_samples_as_the_official_pickle(tmp_path):
    from edm2.convert_official import convert_official

    ref = np.load(DATA / "official_generate_images.npz")
    cfg = json.loads(str(ref["configs"]))["churn_class"]
    convert_official(DATA / "official_generate_tiny.pkl", tmp_path / "tiny.safetensors")
    net = edm2.load_network(tmp_path / "tiny.safetensors").net
    assert net.unet.gain_dtype == torch.float16
    net.precision = sampling_precision(net.precision, "cpu")
    assert np.array_equal(_images(prepare_for_sampling(net), cfg), ref["churn_class"])


def test_reference_kernels_switch(tmp_path):
    from click.testing import CliRunner

    import generate

    from accel import FusedCosineAttention
    from networks import CosineAttention

    net = _official_net()
    attn = [m for m in net.modules() if isinstance(m, CosineAttention)]
    assert attn and not any(isinstance(m, FusedCosineAttention) for m in attn)  # the reference on the CPU
    prepare_for_sampling(net, reference=True)
    attn = [m for m in net.modules() if isinstance(m, CosineAttention)]
    assert attn and not any(isinstance(m, FusedCosineAttention) for m in attn)
    assert not net.unet._forward_pre_hooks  # NCHW: no channels-last input
    with pytest.raises(ValueError, match="compile"):
        prepare_for_sampling(net, compile=True, reference=True)
    args = ["--net", str(DATA / "official_generate_tiny.pkl"), "--outdir", str(tmp_path), "--seeds", "0"]
    result = CliRunner().invoke(generate.main, args + ["--kernels", "reference", "--compile"])
    assert result.exit_code == 2 and "drop --compile" in result.output
    assert not any(tmp_path.iterdir())


def test_vae_decodes_four_latents_per_call_as_the_official_generator(tmp_path, monkeypatch):
    import edm2.generation as generation

    class Spy:
        batch_size = 8  # the VAE encoder's default

        def decode(self, x):
            seen.append(self.batch_size)
            return torch.zeros([x.shape[0], 3, x.shape[2], x.shape[3]], dtype=torch.uint8)

    seen = []
    monkeypatch.setattr(generation, "encoder_for", lambda net, settings: Spy())
    generation.generate_images(_official_net(), [0], outdir=tmp_path, num_steps=1, progress=False, device="cpu")
    assert seen == [generation.VAE_DECODE_BATCH] == [4]


def test_seeds_modulo_2_32_and_noise_device():
    a = SeedGenerators([7, 2**32 + 7]).randn([4])
    assert torch.equal(a[0], a[1])
    with pytest.raises(ValueError, match="noise device"):
        check_noise_device("cuda", "cpu")
    assert sampling_precision("fp16", "cpu") == "fp32" and sampling_precision("fp16", "cuda") == "fp16"
    assert sampling_precision("fp16", "cpu", "fp16") == "fp16"  # an explicit request wins
