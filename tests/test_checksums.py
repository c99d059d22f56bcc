"""Per-tensor checksums of training states and model files: a flipped byte in the body is an error naming the
file and tensor; files written before checksums existed still load; malformed or incomplete checksums are damage."""

from __future__ import annotations

import json
import os
import pathlib
import struct
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from safetensors.torch import save_file

from edm2.model_files import HEADER_KEY, ModelFileError, load_network, make_header, save_network
from networks import Precond
from torch_utils.state_io import (
    CHECKSUM_KEY,
    SKELETON_KEY,
    StateFileError,
    flatten_state,
    load_state,
    save_state,
    tensor_checksum,
    verify_state,
)

TINY = {
    "img_resolution": 8,
    "img_channels": 3,
    "label_dim": 0,
    "model_channels": 8,
    "channel_mult": [1, 2],
    "num_blocks": 1,
    "attn_resolutions": [4],
    "channels_per_head": 8,
    "logvar_channels": 8,
}


def _state() -> dict:
    torch.manual_seed(0)
    return {
        "net": {"enc.conv.weight": torch.randn(4, 3, 3, 3), "gain": torch.tensor(0.5)},
        "optimizer": {"state": {0: {"exp_avg": torch.randn(7, dtype=torch.bfloat16)}}, "lr": 0.01},
        "mask": torch.tensor([True, False, True]),
        "nimg": 123,
    }


def _tensor_offsets(path: pathlib.Path, name: str) -> tuple[int, int]:
    """Absolute [begin, end) of a tensor's bytes, from the safetensors header (u64 LE length, JSON, data)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    begin, end = json.loads(data[8 : 8 + n])[name]["data_offsets"]
    return 8 + n + begin, 8 + n + end


def _flip_byte(path: pathlib.Path, name: str, index: int = 0) -> None:
    begin, end = _tensor_offsets(path, name)
    assert end - begin > index
    data = bytearray(path.read_bytes())
    data[begin + index] ^= 0x10
    path.write_bytes(bytes(data))


def _metadata(path: pathlib.Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.metadata()


def _tensors(path: pathlib.Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable


def _rewrite(path: pathlib.Path, **metadata: str | None) -> None:
    """Rewrite a safetensors file with the same tensors and changed metadata (None removes a key)."""
    meta = {k: v for k, v in {**_metadata(path), **metadata}.items() if v is not None}
    tensors = _tensors(path)
    save_file(tensors, path, metadata=meta)


def _assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    else:
        assert a == b


def _tiny_net() -> Precond:
    torch.manual_seed(1)
    net = Precond(**TINY)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("gain"):
                p.fill_(0.7)
    return net.eval()


# ---------------------------------------------------------------------------------------------------------
# Training states.


def test_tensor_checksum_is_crc32_of_raw_bytes():
    import zlib

    t = torch.arange(5, dtype=torch.int64)
    assert tensor_checksum(t) == "%08x" % zlib.crc32(t.numpy().tobytes())
    assert tensor_checksum(torch.zeros(0)) == "00000000"
    assert tensor_checksum(torch.tensor(1.0)) != tensor_checksum(torch.tensor(-1.0))
    view = torch.randn(4, 6)[:, ::2]  # non-contiguous: hashed as the contiguous bytes safetensors would store
    assert tensor_checksum(view) == tensor_checksum(view.contiguous())


def test_state_round_trip_stores_checksums(tmp_path):
    path = tmp_path / "state.safetensors"
    state = _state()
    save_state(path, state)
    record = json.loads(_metadata(path)[CHECKSUM_KEY])
    assert record["algorithm"] == "crc32"
    assert record["tensors"] == {k: tensor_checksum(t) for k, t in _tensors(path).items()}
    _assert_same(load_state(path), state)
    verify_state(path)


def test_state_flipped_byte_names_tensor(tmp_path):
    path = tmp_path / "state.safetensors"
    save_state(path, _state())
    _flip_byte(path, "/net/enc.conv.weight", index=17)
    for call in (load_state, verify_state):
        with pytest.raises(StateFileError) as e:
            call(path)
        msg = str(e.value)
        assert msg.startswith(f"{path}: damaged (checksum mismatch in tensor '/net/enc.conv.weight')"), msg
        assert "\n" not in msg


def test_state_flipped_byte_in_bfloat16_tensor(tmp_path):
    path = tmp_path / "state.safetensors"
    save_state(path, _state())
    _flip_byte(path, "/optimizer/state/0/exp_avg", index=3)
    with pytest.raises(StateFileError, match=r"checksum mismatch in tensor '/optimizer/state/0/exp_avg'"):
        load_state(path)


def test_state_without_checksums_still_loads(tmp_path):
    """A file written before checksums existed: skeleton + tensors, written with safetensors directly."""
    path = tmp_path / "old.safetensors"
    state = _state()
    skeleton, tensors = flatten_state(state)
    save_file(tensors, path, metadata={SKELETON_KEY: json.dumps(skeleton)})
    _assert_same(load_state(path), state)
    verify_state(path)


@pytest.mark.parametrize(
    "value, fragment",
    [
        ("not json", "malformed 'edm2_tensor_checksums'"),
        ('{"algorithm": "md5", "tensors": {}}', "malformed 'edm2_tensor_checksums'"),
        ('{"algorithm": "crc32"}', "malformed 'edm2_tensor_checksums'"),
        ('["crc32"]', "malformed 'edm2_tensor_checksums'"),
    ],
)
def test_state_malformed_checksums_are_damage(tmp_path, value, fragment):
    path = tmp_path / "state.safetensors"
    save_state(path, _state())
    _rewrite(path, **{CHECKSUM_KEY: value})
    with pytest.raises(StateFileError, match="damaged") as e:
        load_state(path)
    assert fragment in str(e.value)


def test_state_checksum_entries_must_cover_the_tensors(tmp_path):
    path = tmp_path / "state.safetensors"
    save_state(path, _state())
    good = json.loads(_metadata(path)[CHECKSUM_KEY])

    lacking = json.loads(json.dumps(good))
    del lacking["tensors"]["/mask"]
    _rewrite(path, **{CHECKSUM_KEY: json.dumps(lacking)})
    with pytest.raises(StateFileError, match=r"damaged \(no checksum for tensor '/mask'\)"):
        load_state(path)

    extra = json.loads(json.dumps(good))
    extra["tensors"]["/gone"] = "00000000"
    _rewrite(path, **{CHECKSUM_KEY: json.dumps(extra)})
    with pytest.raises(StateFileError, match=r"damaged \(tensor '/gone' has a checksum but is not in the file\)"):
        verify_state(path)

    bad_hex = json.loads(json.dumps(good))
    bad_hex["tensors"]["/mask"] = "XYZ"
    _rewrite(path, **{CHECKSUM_KEY: json.dumps(bad_hex)})
    with pytest.raises(StateFileError, match=r"damaged \(malformed checksum for tensor '/mask'"):
        load_state(path)

    _rewrite(path, **{CHECKSUM_KEY: json.dumps(good)})
    load_state(path)  # the rewrite itself kept the file intact


def test_verify_state_missing_and_truncated(tmp_path):
    with pytest.raises(StateFileError, match="no such file"):
        verify_state(tmp_path / "missing.safetensors")
    path = tmp_path / "state.safetensors"
    save_state(path, _state())
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(StateFileError, match="not a readable training state"):
        verify_state(path)


def test_damaged_checkpoint_is_skipped_on_resume(tmp_path):
    """The training loop's fallback to the previous checkpoint now also covers silent body damage."""
    from training.training_loop import load_latest_checkpoint

    save_state(tmp_path / "training-state-0000000100.safetensors", {"nimg": 100, "w": torch.ones(8)})
    save_state(tmp_path / "training-state-0000000200.safetensors", {"nimg": 200, "w": torch.ones(8)})
    _flip_byte(tmp_path / "training-state-0000000200.safetensors", "/w", index=5)
    log = []
    state = load_latest_checkpoint(str(tmp_path), log=log.append)
    assert state["nimg"] == 100
    assert len(log) == 1 and "checksum mismatch in tensor '/w'" in log[0]


# ---------------------------------------------------------------------------------------------------------
# Model files.


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("models") / "net.safetensors"
    save_network(path, _tiny_net(), encoder={"class": "standard_rgb"})
    return path


def _largest_tensor(path: pathlib.Path) -> str:
    return max(_tensors(path).items(), key=lambda kv: kv[1].numel())[0]


def test_model_file_round_trip_and_checksums(model_file):
    record = json.loads(_metadata(model_file)[CHECKSUM_KEY])
    assert record["algorithm"] == "crc32"
    assert record["tensors"] == {k: tensor_checksum(t) for k, t in _tensors(model_file).items()}
    loaded = load_network(model_file)
    net = _tiny_net()
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.net.state_dict()[k], v), k
    assert "checksums" not in json.dumps(loaded.meta)  # the header itself is unchanged


def test_model_file_flipped_byte_names_tensor(model_file, tmp_path):
    path = tmp_path / "flipped.safetensors"
    path.write_bytes(model_file.read_bytes())
    name = _largest_tensor(path)
    _flip_byte(path, name, index=101)
    with pytest.raises(ModelFileError) as e:
        load_network(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: damaged (checksum mismatch in tensor {name!r})"), msg
    assert "\n" not in msg


def test_model_file_without_checksums_still_loads(model_file, tmp_path):
    path = tmp_path / "old.safetensors"
    save_file(_tensors(model_file), path, metadata={HEADER_KEY: _metadata(model_file)[HEADER_KEY]})
    assert CHECKSUM_KEY not in _metadata(path)
    loaded = load_network(path)
    for k, v in _tiny_net().state_dict().items():
        assert torch.equal(loaded.net.state_dict()[k], v), k


def test_model_file_incomplete_or_malformed_checksums(model_file, tmp_path):
    path = tmp_path / "partial.safetensors"
    path.write_bytes(model_file.read_bytes())
    record = json.loads(_metadata(path)[CHECKSUM_KEY])
    name = sorted(record["tensors"])[0]
    del record["tensors"][name]
    _rewrite(path, **{CHECKSUM_KEY: json.dumps(record)})
    with pytest.raises(ModelFileError, match=rf"damaged \(no checksum for tensor '{name}'\)"):
        load_network(path)
    _rewrite(path, **{CHECKSUM_KEY: "{"})
    with pytest.raises(ModelFileError, match="damaged \\(malformed 'edm2_tensor_checksums'"):
        load_network(path)


def test_make_header_has_no_checksum_field():
    """Checksums live beside the header, so the header of a network does not depend on its weights."""
    assert "checksums" not in make_header(_tiny_net())


def test_generate_with_flipped_snapshot_is_a_one_line_error(model_file, tmp_path):
    path = tmp_path / "flipped.safetensors"
    path.write_bytes(model_file.read_bytes())
    name = _largest_tensor(path)
    _flip_byte(path, name, index=7)
    cmd = [sys.executable, "generate.py", "--net", str(path), "--outdir", str(tmp_path / "out"), "--seeds", "0"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    out = p.stdout + p.stderr
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if "checksum mismatch" in line]
    assert len(errors) == 1, out
    assert errors[0].startswith("Error: ") and str(path) in errors[0] and f"tensor {name!r}" in errors[0], out
    assert "damaged (checksum mismatch in tensor" in errors[0]
    assert not (tmp_path / "out").exists()
