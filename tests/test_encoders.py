"""Pixel and latent encoders (docs/design.md §8), with a tiny AutoencoderKL saved locally: no download."""

from __future__ import annotations

import json

import pytest
import torch

from training.encoders import (
    STABILITY_VAE_DEFAULTS,
    StabilityVAEEncoder,
    StandardRGBEncoder,
    encoder_from_config,
)


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory) -> str:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,  # 3 downsamplings: 8x, like the SD VAE
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 8, 8, 8],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    path = tmp_path_factory.mktemp("tiny_vae")
    vae.save_pretrained(path)
    return str(path)


def _pixels(n: int = 5, res: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, [n, 3, res, res], dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _load_reference_vae(path: str):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(path, low_cpu_mem_usage=False).eval()


def test_rgb_roundtrip_is_exact():
    enc = StandardRGBEncoder()
    x = _pixels()
    raw = enc.encode_pixels(x)
    assert raw.dtype == torch.uint8 and torch.equal(raw, x)
    y = enc.encode_latents(raw)
    assert y.dtype == torch.float32 and y.min() >= -1 and y.max() <= 1
    assert torch.allclose(y, x.float() / 127.5 - 1)
    assert torch.equal(enc.decode(y), x)
    # Out-of-range network output is clamped, not wrapped.
    assert enc.decode(torch.tensor([-3.0, 3.0]).reshape(1, 1, 1, 2)).tolist() == [[[[0, 255]]]]


@pytest.mark.parametrize("cfg", [{"class": "standard_rgb"}, {"class": "stability_vae", **STABILITY_VAE_DEFAULTS}])
def test_config_roundtrips_through_json(cfg):
    enc = encoder_from_config(json.loads(json.dumps(cfg)))
    assert enc.config() == cfg
    assert encoder_from_config(json.loads(json.dumps(enc.config()))).config() == cfg


def test_config_defaults_and_errors():
    # Settings without pixel_range were written before it existed: they keep this project's earlier convention.
    assert encoder_from_config({"class": "stability_vae"}).config() == {
        "class": "stability_vae",
        **STABILITY_VAE_DEFAULTS,
        "pixel_range": "-1,1",
    }
    assert StabilityVAEEncoder().config()["pixel_range"] == "0,1"  # new settings: the official convention
    with pytest.raises(ValueError, match="pixel_range"):
        StabilityVAEEncoder(pixel_range="0,255")
    with pytest.raises(ValueError, match="unknown class 'jpeg'"):
        encoder_from_config({"class": "jpeg"})
    with pytest.raises(ValueError, match=r"unknown keys \['scale'\]"):
        encoder_from_config({"class": "stability_vae", "scale": 0.18})
    with pytest.raises(ValueError, match=r"unknown keys \['vae_name'\]"):
        encoder_from_config({"class": "standard_rgb", "vae_name": "x"})
    with pytest.raises(ValueError, match="'class' key"):
        encoder_from_config({"vae_name": "x"})
    with pytest.raises(ValueError, match="raw_std"):
        StabilityVAEEncoder(raw_std=[1.0, 0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="uint8"):
        StandardRGBEncoder().encode_pixels(torch.zeros(1, 3, 8, 8))


def test_vae_is_lazy_and_missing_vae_is_named(tmp_path):
    enc = encoder_from_config({"class": "stability_vae", "vae_name": str(tmp_path / "no_such_vae")})
    assert enc._vae is None  # constructing never loads
    with pytest.raises(RuntimeError, match="no_such_vae"):
        enc.decode(torch.zeros(1, 4, 4, 4))


def test_vae_encode_pixels_gives_posterior_mean_and_std(tiny_vae_dir):
    x = _pixels(5)
    raw = encoder_from_config(
        {"class": "stability_vae", "vae_name": tiny_vae_dir, "batch_size": 2, "pixel_range": "0,1"}
    ).encode_pixels(x)
    assert raw.shape == (5, 8, 4, 4) and raw.dtype == torch.float32
    with torch.no_grad():
        # Pixels enter the VAE in [0, 1], as in the official EDM2 code (not the [-1, 1] the VAE was trained with).
        posterior = _load_reference_vae(tiny_vae_dir).encode(x.float() / 255).latent_dist
    torch.testing.assert_close(raw[:, :4], posterior.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(raw[:, 4:], posterior.std, rtol=1e-5, atol=1e-5)
    assert not raw.requires_grad


def test_vae_encode_latents_scaling_and_sampling():
    enc = StabilityVAEEncoder(vae_name="unused")  # no VAE needed for this step
    mean = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 3 + 1
    raw_mean = torch.tensor(enc.raw_mean).reshape(1, 4, 1, 1)
    raw_std = torch.tensor(enc.raw_std).reshape(1, 4, 1, 1)
    # With zero posterior std the sample is the mean: pure scaling (raw - raw_mean) * final_std / raw_std.
    out = enc.encode_latents(torch.cat([mean, torch.zeros_like(mean)], dim=1))
    torch.testing.assert_close(out, (mean - raw_mean) * 0.5 / raw_std + 0.0)
    # With a posterior std the sample varies, reproducibly per generator, with the expected spread.
    big = torch.cat([torch.zeros(1, 4, 64, 64), torch.ones(1, 4, 64, 64) * 2], dim=1)
    a = enc.encode_latents(big, torch.Generator().manual_seed(7))
    b = enc.encode_latents(big, torch.Generator().manual_seed(7))
    c = enc.encode_latents(big, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    expected_std = 2 * 0.5 / torch.tensor(enc.raw_std)
    measured_std = a[0].flatten(1).std(dim=1)
    torch.testing.assert_close(measured_std, expected_std, rtol=0.05, atol=0)
    with pytest.raises(ValueError, match=r"\[N, 8, H, W\]"):
        enc.encode_latents(mean)


def test_vae_decode_inverts_scaling(tiny_vae_dir):
    enc = encoder_from_config(
        {"class": "stability_vae", "vae_name": tiny_vae_dir, "batch_size": 3, "pixel_range": "0,1"}
    )
    raw = enc.encode_pixels(_pixels(4))
    raw_mean_only = torch.cat([raw[:, :4], torch.zeros_like(raw[:, 4:])], dim=1)
    images = enc.decode(enc.encode_latents(raw_mean_only))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.uint8
    with torch.no_grad():
        direct = _load_reference_vae(tiny_vae_dir).decode(raw[:, :4]).sample
    expected = (direct.clamp(0, 1) * 255).floor().to(torch.uint8)  # [0, 1] out, truncated, as the official decode
    # One step of rounding at most (the scaling round trip is float32).
    assert (images.int() - expected.int()).abs().max() <= 1
    assert (images == expected).float().mean() > 0.99
    with pytest.raises(ValueError, match=r"\[N, 4, h, w\]"):
        enc.decode(raw)


def test_vae_encoder_equals_the_official_one(tmp_path):
    """Pixels in [0, 1] in and out, as the official StabilityVAEEncoder (tests/data/NOTES.md)."""
    import pathlib

    import numpy as np
    from diffusers import AutoencoderKL

    ref = np.load(pathlib.Path(__file__).parent / "data" / "official_vae_tiny.npz")
    config = {k: v for k, v in json.loads(str(ref["config"])).items() if not k.startswith("_")}
    vae = AutoencoderKL(**config)
    vae.load_state_dict({k[len("state/"):]: torch.from_numpy(ref[k]) for k in ref.files if k.startswith("state/")})
    vae.save_pretrained(tmp_path)
    enc = encoder_from_config(
        {"class": "stability_vae", "vae_name": str(tmp_path), "batch_size": 2, "pixel_range": "0,1"}
    )
    raw = enc.encode_pixels(torch.from_numpy(ref["pixels"]))
    torch.testing.assert_close(raw, torch.from_numpy(ref["raw"]), rtol=1e-6, atol=1e-6)
    images = enc.decode(torch.from_numpy(ref["latents"])).numpy()
    assert np.array_equal(images, ref["images"])  # the [-1, 1] convention differs in nearly every value


def test_vae_legacy_pixel_range_of_settings_written_before_it(tiny_vae_dir):
    """Settings without pixel_range (this project's files from before it) keep the [-1, 1] convention they were
    made with: pixels / 127.5 - 1 in, (x + 1) * 127.5 rounded out."""
    legacy = encoder_from_config({"class": "stability_vae", "vae_name": tiny_vae_dir, "batch_size": 2})
    assert legacy.config()["pixel_range"] == "-1,1"
    x = _pixels(3)
    vae = _load_reference_vae(tiny_vae_dir)
    with torch.no_grad():
        posterior = vae.encode(x.float() / 127.5 - 1).latent_dist
        expected_images = ((vae.decode(posterior.mean).sample + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)
    raw = legacy.encode_pixels(x)
    torch.testing.assert_close(raw[:, :4], posterior.mean, rtol=1e-5, atol=1e-5)
    scaled_mean = legacy.encode_latents(torch.cat([raw[:, :4], torch.zeros_like(raw[:, 4:])], dim=1))
    images = legacy.decode(scaled_mean)
    assert (images.int() - expected_images.int()).abs().max() <= 1
    official = encoder_from_config({**legacy.config(), "pixel_range": "0,1"})
    assert not torch.allclose(official.encode_pixels(x), raw)  # the two conventions give other latents


def test_resume_names_the_vae_pixel_range_of_an_older_run():
    from training.run_dir import config_differences

    old = {
        "encoder": {"class": "stability_vae", **{k: v for k, v in STABILITY_VAE_DEFAULTS.items() if k != "pixel_range"}}
    }
    new = {"encoder": {"class": "stability_vae", **STABILITY_VAE_DEFAULTS}}
    differ = config_differences(old, new)
    assert "encoder pixel_range: '-1,1' there, '0,1' now" in differ
    assert any("--vae-pixel-range=-1,1" in line for line in differ)
    assert config_differences(old, {"encoder": {**new["encoder"], "pixel_range": "-1,1"}}) == []
    assert config_differences(new, new) == []
