"""Metric feature detectors: published key names and shapes, input resizes, weight loading and its errors."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import math
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edm2.detectors import (
    DETECTORS,
    DetectorWeightsError,
    DINOv2ViT,
    InceptionV3FID,
    build_detector,
    load_detector,
    save_detector,
    tf_legacy_bilinear_resize,
)
from edm2.detectors.dinov2 import resize_positional_grid
from edm2.detectors.inception import avg_pool_valid_only
from edm2.download import file_sha256


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny networks: one thread is faster


# ----------------------------------------------------------------------------------------------------------
# The published checkpoints' key names and shapes, written out here independently of the modules.

# pt_inception-2015-12-05-6726825d.pth: every conv layer as (name, out, in, kh, kw); each has
# `.conv.weight` and `.bn.{weight,bias,running_mean,running_var}`; then fc (1008 classes).
INCEPTION_CONVS = (
    """
Conv2d_1a_3x3 32 3 3 3
Conv2d_2a_3x3 32 32 3 3
Conv2d_2b_3x3 64 32 3 3
Conv2d_3b_1x1 80 64 1 1
Conv2d_4a_3x3 192 80 3 3
"""
    + "".join(
        f"""
Mixed_5{b}.branch1x1 64 {cin} 1 1
Mixed_5{b}.branch5x5_1 48 {cin} 1 1
Mixed_5{b}.branch5x5_2 64 48 5 5
Mixed_5{b}.branch3x3dbl_1 64 {cin} 1 1
Mixed_5{b}.branch3x3dbl_2 96 64 3 3
Mixed_5{b}.branch3x3dbl_3 96 96 3 3
Mixed_5{b}.branch_pool {pool} {cin} 1 1
"""
        for b, cin, pool in (("b", 192, 32), ("c", 256, 64), ("d", 288, 64))
    )
    + """
Mixed_6a.branch3x3 384 288 3 3
Mixed_6a.branch3x3dbl_1 64 288 1 1
Mixed_6a.branch3x3dbl_2 96 64 3 3
Mixed_6a.branch3x3dbl_3 96 96 3 3
"""
    + "".join(
        f"""
Mixed_6{b}.branch1x1 192 768 1 1
Mixed_6{b}.branch7x7_1 {c} 768 1 1
Mixed_6{b}.branch7x7_2 {c} {c} 1 7
Mixed_6{b}.branch7x7_3 192 {c} 7 1
Mixed_6{b}.branch7x7dbl_1 {c} 768 1 1
Mixed_6{b}.branch7x7dbl_2 {c} {c} 7 1
Mixed_6{b}.branch7x7dbl_3 {c} {c} 1 7
Mixed_6{b}.branch7x7dbl_4 {c} {c} 7 1
Mixed_6{b}.branch7x7dbl_5 192 {c} 1 7
Mixed_6{b}.branch_pool 192 768 1 1
"""
        for b, c in (("b", 128), ("c", 160), ("d", 160), ("e", 192))
    )
    + """
Mixed_7a.branch3x3_1 192 768 1 1
Mixed_7a.branch3x3_2 320 192 3 3
Mixed_7a.branch7x7x3_1 192 768 1 1
Mixed_7a.branch7x7x3_2 192 192 1 7
Mixed_7a.branch7x7x3_3 192 192 7 1
Mixed_7a.branch7x7x3_4 192 192 3 3
"""
    + "".join(
        f"""
Mixed_7{b}.branch1x1 320 {cin} 1 1
Mixed_7{b}.branch3x3_1 384 {cin} 1 1
Mixed_7{b}.branch3x3_2a 384 384 1 3
Mixed_7{b}.branch3x3_2b 384 384 3 1
Mixed_7{b}.branch3x3dbl_1 448 {cin} 1 1
Mixed_7{b}.branch3x3dbl_2 384 448 3 3
Mixed_7{b}.branch3x3dbl_3a 384 384 1 3
Mixed_7{b}.branch3x3dbl_3b 384 384 3 1
Mixed_7{b}.branch_pool 192 {cin} 1 1
"""
        for b, cin in (("b", 1280), ("c", 2048))
    )
)


def published_inception_shapes(with_counters: bool = False) -> dict[str, list[int]]:
    shapes = {}
    for line in INCEPTION_CONVS.split("\n"):
        if line.strip():
            name, out, cin, kh, kw = line.split()
            shapes[f"{name}.conv.weight"] = [int(out), int(cin), int(kh), int(kw)]
            for stat in ("weight", "bias", "running_mean", "running_var"):
                shapes[f"{name}.bn.{stat}"] = [int(out)]
            if with_counters:  # torchvision-era files may carry batch-norm step counters
                shapes[f"{name}.bn.num_batches_tracked"] = []
    shapes["fc.weight"] = [1008, 2048]
    shapes["fc.bias"] = [1008]
    return shapes


def published_dinov2_shapes() -> dict[str, list[int]]:
    """dinov2_vitl14_pretrain.pth: ViT-L/14, 24 blocks of width 1024, 37x37 + 1 positions."""
    shapes = {
        "cls_token": [1, 1, 1024],
        "pos_embed": [1, 1370, 1024],
        "mask_token": [1, 1024],
        "patch_embed.proj.weight": [1024, 3, 14, 14],
        "patch_embed.proj.bias": [1024],
        "norm.weight": [1024],
        "norm.bias": [1024],
    }
    for i in range(24):
        b = f"blocks.{i}"
        shapes.update({
            f"{b}.norm1.weight": [1024], f"{b}.norm1.bias": [1024],
            f"{b}.attn.qkv.weight": [3072, 1024], f"{b}.attn.qkv.bias": [3072],
            f"{b}.attn.proj.weight": [1024, 1024], f"{b}.attn.proj.bias": [1024],
            f"{b}.ls1.gamma": [1024],
            f"{b}.norm2.weight": [1024], f"{b}.norm2.bias": [1024],
            f"{b}.mlp.fc1.weight": [4096, 1024], f"{b}.mlp.fc1.bias": [4096],
            f"{b}.mlp.fc2.weight": [1024, 4096], f"{b}.mlp.fc2.bias": [1024],
            f"{b}.ls2.gamma": [1024],
        })  # fmt: skip
    return shapes


def _meta_state(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v, device="meta", dtype=torch.int64 if not v else torch.float32) for k, v in shapes.items()}


@pytest.mark.parametrize("counters", [False, True])
def test_inception_loads_the_published_key_names_and_shapes_strictly(counters):
    shapes = published_inception_shapes(counters)
    assert len(shapes) == 94 * (5 + counters) + 2
    model = build_detector("fid", _meta_state(shapes), None, "pt_inception-2015-12-05-6726825d.pth")
    assert isinstance(model, InceptionV3FID) and model.feature_dim == 2048 and model.resolution == 299
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == published_inception_shapes(False)
    assert model.Mixed_7c.max_pool and not model.Mixed_7b.max_pool  # the FID graph's last-block max pool
    assert sum(p.numel() for p in model.parameters()) == 23_885_392 - 2 * sum(  # parameters + BN statistics
        v[0] for k, v in shapes.items() if k.endswith("bn.running_mean")
    )


def test_dinov2_loads_the_published_key_names_and_shapes_strictly():
    shapes = published_dinov2_shapes()
    model = build_detector("fd_dinov2", _meta_state(shapes), None, "dinov2_vitl14_pretrain.pth")
    assert isinstance(model, DINOv2ViT) and model.feature_dim == 1024 and model.resolution == 224
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == shapes
    assert sum(p.numel() for p in model.parameters()) == 304_368_640  # ViT-L/14: 304M


def test_wrong_keys_and_shapes_are_named():
    shapes = published_dinov2_shapes()
    bad = dict(shapes)
    del bad["blocks.3.ls1.gamma"]
    bad["head.weight"] = [10, 1024]
    bad["pos_embed"] = [1, 257, 1024]
    with pytest.raises(DetectorWeightsError) as info:
        build_detector("fd_dinov2", _meta_state(bad), None, "some/dir/dinov2.pth")
    message = str(info.value)
    assert "some/dir/dinov2.pth" in message and "blocks.3.ls1.gamma" in message and "head.weight" in message
    assert "pos_embed: [1, 257, 1024] (expected [1, 1370, 1024])" in message


# ----------------------------------------------------------------------------------------------------------
# Input handling


def _reference_tf_resize_1d(row: np.ndarray, size: int) -> np.ndarray:
    """TF1 ResizeBilinear along one axis, written as the definition: source = i * in / out."""
    n = len(row)
    out = np.empty(size)
    for i in range(size):
        src = i * n / size
        lo = min(math.floor(src), n - 1)
        hi = min(lo + 1, n - 1)
        out[i] = row[lo] + (row[hi] - row[lo]) * (src - lo)
    return out


@pytest.mark.parametrize("h, w, size", [(5, 7, 11), (13, 9, 4), (6, 6, 6)])
def test_tf_resize_matches_the_definition(h, w, size):
    x = torch.rand(2, 3, h, w, dtype=torch.float64)
    y = tf_legacy_bilinear_resize(x, size)
    expected = np.apply_along_axis(_reference_tf_resize_1d, 2, x.numpy(), size)
    expected = np.apply_along_axis(_reference_tf_resize_1d, 3, expected, size)
    np.testing.assert_allclose(y.numpy(), expected, rtol=0, atol=1e-12)
    if (h, w) == (size, size):
        assert torch.equal(y, x)
    else:  # not torch's half-pixel bilinear (what pytorch-fid uses)
        assert not torch.allclose(y, F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False))


def test_inception_preprocessing_is_the_tf_graphs():
    model = InceptionV3FID(resolution=75, width=0.05)
    images = torch.randint(0, 256, (2, 3, 30, 40), dtype=torch.uint8)
    x = model.preprocess(images)
    assert x.shape == (2, 3, 75, 75)
    expected = (tf_legacy_bilinear_resize(images.double(), 75) - 128) / 128
    torch.testing.assert_close(x.double(), expected, rtol=0, atol=1e-5)
    assert avg_pool_valid_only(torch.ones(1, 1, 4, 4)).eq(1).all()  # TF SAME pooling: padding not counted


def _cubic_weights(t: float, a: float = -0.75) -> list[float]:
    """Keys' cubic convolution weights of the 4 taps around a sample at fractional offset t."""

    def k(x):
        x = abs(x)
        return (a + 2) * x**3 - (a + 3) * x**2 + 1 if x <= 1 else a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a

    return [k(t + 1), k(t), k(1 - t), k(2 - t)]


def _reference_pos_resize(grid_in: np.ndarray, grid: int) -> np.ndarray:
    """Bicubic resample of an [M, M] map to [grid, grid] sampling at (i + 0.5) * M / (grid + 0.1) - 0.5."""
    m = grid_in.shape[0]

    def along(rows: np.ndarray) -> np.ndarray:
        out = np.zeros((grid, rows.shape[1]))
        for i in range(grid):
            src = (i + 0.5) * m / (grid + 0.1) - 0.5
            base = math.floor(src)
            for tap, wgt in zip(range(base - 1, base + 3), _cubic_weights(src - base)):
                out[i] += wgt * rows[min(max(tap, 0), m - 1)]
        return out

    return along(along(grid_in).T).T


def test_positional_embeddings_are_resized_the_dinov2_way():
    m, dim, grid = 37, 2, 16
    pos = torch.randn(1, m * m, dim, dtype=torch.float64)
    out = resize_positional_grid(pos, grid)
    assert out.shape == (1, grid * grid, dim)
    for c in range(dim):
        expected = _reference_pos_resize(pos[0, :, c].reshape(m, m).numpy(), grid)
        np.testing.assert_allclose(out[0, :, c].reshape(grid, grid).numpy(), expected, atol=1e-5)
    assert resize_positional_grid(pos, m) is pos


def test_dinov2_preprocessing_and_attention():
    model = DINOv2ViT(resolution=28, embed_dim=32, depth=1, num_heads=4, pos_grid=3)
    images = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)
    x = model.preprocess(images)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = F.interpolate(images.float() / 255, size=(28, 28), mode="bicubic", antialias=True)
    torch.testing.assert_close(x, (expected - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
    attn = model.blocks[0].attn
    tokens = torch.randn(2, 5, 32)
    q, k, v = attn.qkv(tokens).view(2, 5, 3, 4, 8).unbind(2)  # naive multi-head attention
    weights = torch.softmax(torch.einsum("nqhd,nkhd->nhqk", q, k) / math.sqrt(8), dim=-1)
    naive = attn.proj(torch.einsum("nhqk,nkhd->nqhd", weights, v).reshape(2, 5, 32))
    torch.testing.assert_close(attn(tokens), naive, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [torch.zeros(2, 3, 8, 8), torch.zeros(2, 4, 8, 8, dtype=torch.uint8)])
def test_detectors_reject_non_uint8_rgb(bad):
    for model in (
        InceptionV3FID(resolution=75, width=0.05),
        DINOv2ViT(resolution=28, embed_dim=8, depth=1, num_heads=2),
    ):
        with pytest.raises(ValueError, match=r"uint8 RGB images \[N, 3, H, W\]"):
            model(bad)


# ----------------------------------------------------------------------------------------------------------
# Weight files: local, environment variable, URL through the cache; errors


def tiny_detector(metric: str, seed: int = 0) -> torch.nn.Module:
    """A narrow random detector whose features vary with the image (He-normal convolutions keep the
    activations' scale through Inception's ~50 ReLU layers; the default init shrinks them to denormals)."""
    gen = torch.Generator().manual_seed(seed)
    if metric == "fid":
        model = InceptionV3FID(resolution=75, width=0.0625)
    else:
        model = DINOv2ViT(resolution=28, embed_dim=16, depth=2, num_heads=2, pos_grid=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 4:
                p.normal_(0, math.sqrt(2 / p[0].numel()), generator=gen)
            elif p.ndim >= 2:
                p.normal_(0, 0.02 * math.sqrt(1024 / p.shape[-1]), generator=gen)
            else:  # biases near 0, scales (batch / layer norm, LayerScale) near 1
                p.copy_((0 if name.endswith("bias") else 1) + 0.1 * torch.randn(p.shape, generator=gen))
    return model


_tiny = tiny_detector


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("detectors")
    return {m: save_detector(d / f"{m}-tiny.safetensors", _tiny(m)) for m in DETECTORS}


@pytest.mark.parametrize("metric", list(DETECTORS))
def test_saved_detector_loads_back_through_option_and_env_var(metric, tiny_files, monkeypatch):
    images = torch.randint(0, 256, (3, 3, 20, 20), dtype=torch.uint8)
    expected = _tiny(metric)(images)
    assert expected.std(dim=0).mean() > 1e-3 * expected.abs().mean()  # features depend on the image
    loaded = load_detector(metric, tiny_files[metric])
    assert type(loaded) is type(_tiny(metric)) and loaded.init_kwargs == _tiny(metric).init_kwargs
    torch.testing.assert_close(loaded(images), expected, rtol=1e-6, atol=1e-7)
    monkeypatch.setenv(DETECTORS[metric].env_var, str(tiny_files[metric]))
    torch.testing.assert_close(load_detector(metric)(images), expected, rtol=1e-6, atol=1e-7)
    with pytest.raises(DetectorWeightsError, match="holds a detector for"):  # the other metric's file
        load_detector(next(m for m in DETECTORS if m != metric), tiny_files[metric])


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_torch_pickle_weights_load_with_weights_only(tiny_files, tmp_path):
    model = _tiny("fd_dinov2")
    path = tmp_path / "plain.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(DetectorWeightsError, match=r"plain\.pth: does not fit DINOv2ViT: .*wrong shapes"):
        load_detector("fd_dinov2", path)  # a .pth carries no architecture: the published one is expected
    (tmp_path / "code.pth").write_bytes(b"\x80\x04cos\nsystem\n(S'echo pwned'\ntR.")
    with pytest.raises(DetectorWeightsError, match=r"code\.pth: cannot read detector weights"):
        load_detector("fd_dinov2", tmp_path / "code.pth")


def test_damaged_or_incomplete_files_are_named(tiny_files, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(tiny_files["fid"]), "pt") as f:
        metadata = f.metadata()
    state = load_file(tiny_files["fid"])
    del state["Mixed_6b.branch7x7_2.conv.weight"]
    state["extra.weight"] = torch.zeros(3)
    save_file(state, tmp_path / "incomplete.safetensors", metadata=metadata)
    with pytest.raises(DetectorWeightsError) as info:
        load_detector("fid", tmp_path / "incomplete.safetensors")
    assert "incomplete.safetensors" in str(info.value)
    assert "missing keys: Mixed_6b.branch7x7_2.conv.weight" in str(info.value)
    assert "unexpected keys: extra.weight" in str(info.value)
    (tmp_path / "truncated.safetensors").write_bytes(tiny_files["fid"].read_bytes()[:1000])
    with pytest.raises(DetectorWeightsError, match=r"truncated\.safetensors: cannot read"):
        load_detector("fid", tmp_path / "truncated.safetensors")


def test_hash_in_the_file_name_is_checked(tiny_files, tmp_path):
    data = tiny_files["fid"].read_bytes()
    good = tmp_path / f"inception-{file_sha256(tiny_files['fid'])[:8]}.safetensors"
    good.write_bytes(data)
    load_detector("fid", good)
    bad = tmp_path / "pt_inception-2015-12-05-6726825d.safetensors"
    bad.write_bytes(data)
    with pytest.raises(DetectorWeightsError, match=r"pt_inception-2015-12-05-6726825d\.safetensors: checksum mismatch"):
        load_detector("fid", bad)


def test_missing_weights_without_network_say_which_file_and_where(tmp_path, monkeypatch):
    monkeypatch.delenv("EDM2_INCEPTION_WEIGHTS", raising=False)
    spec = DETECTORS["fid"]
    unreachable = spec.url.replace("https://github.com", "http://127.0.0.1:9")  # nothing listens on port 9
    monkeypatch.setitem(DETECTORS, "fid", dataclasses.replace(spec, url=unreachable))
    with pytest.raises(DetectorWeightsError) as info:
        load_detector("fid", cache_dir=tmp_path, progress=False)
    message = str(info.value)
    for needle in (
        "pt_inception-2015-12-05-6726825d.pth",
        "--inception-weights",
        "EDM2_INCEPTION_WEIGHTS",
        str(tmp_path),
    ):
        assert needle in message
    with pytest.raises(DetectorWeightsError, match="no such file 'nowhere.pth'.*--inception-weights"):
        load_detector("fid", "nowhere.pth")


def test_url_weights_are_downloaded_once_into_the_cache(tiny_files, tmp_path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tiny_files["fid"].parent))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{tiny_files['fid'].name}"
    try:
        first = load_detector("fid", url, cache_dir=tmp_path, progress=False)
    finally:
        server.shutdown()
        server.server_close()
    second = load_detector("fid", url, cache_dir=tmp_path, progress=False)  # server gone: from the cache
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    torch.testing.assert_close(first(images), second(images), rtol=0, atol=0)
