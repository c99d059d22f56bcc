"""Model files: safetensors save/load round trip, safe import of official EDM2 pickles, bad input.

The official-structure pickles are built here: throwaway classes named like the official ones pickle as
`torch_utils.persistence._reconstruct_persistent_obj(meta)` records whose `module_src` would create a marker
file if it were ever executed (a plain `pickle.load` does execute it; the tests check that ours does not).
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import sys
import types

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import build_reference_net, reference_net_kwargs
from edm2.convert_official import main as convert_main
from edm2.model_files import (
    ModelFileError,
    NETWORK_CLASSES,
    load_network,
    read_header,
    register_network_class,
    save_network,
)
from edm2.official import OFFICIAL_MODEL_ROOT, OFFICIAL_PRESETS, resolve_official_preset
from edm2.official_import import parse_snapshot_name
from edm2.official_pickle import UnsafePickleError

VAE_SETTINGS = {
    "class": "stability_vae",
    "vae_name": "stabilityai/sd-vae-ft-mse",
    "raw_mean": [5.81, 3.25, 0.12, -2.15],
    "raw_std": [4.17, 4.62, 3.71, 3.28],
    "final_mean": 0.0,
    "final_std": 0.5,
    "batch_size": 8,
    "pixel_range": "0,1",  # the official VAE convention
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny fixture networks run fastest single-threaded (and immune to other processes on the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel_err(a: torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    b = torch.as_tensor(b, dtype=torch.float64)
    return float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30))


def run_net(net: torch.nn.Module, ref: dict) -> tuple[torch.Tensor, torch.Tensor]:
    x, sigma, labels = (torch.from_numpy(ref[k]) for k in ("x", "sigma", "labels"))
    with torch.no_grad():
        return net(x, sigma, labels, return_logvar=True)


# ---------------------------------------------------------------------------------------------------------
# Building pickles with the official structure.


class OfficialPickler:
    """Registers stand-ins for `torch_utils.persistence` and `dnnlib.util` (as the official code would have
    them importable) so that pickle emits the official global names; the stand-in reconstruct function
    executes `module_src`, like the official one."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, marker: str):
        self.marker = marker
        self.module_src = f"import pathlib\npathlib.Path({marker!r}).write_text('module_src was executed')\n"

        def _reconstruct_persistent_obj(meta):  # what the official loader does: execute the module source
            exec(meta["module_src"], {})
            return types.SimpleNamespace(**meta["state"])

        persistence = types.ModuleType("torch_utils.persistence")
        _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
        _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
        persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
        package = types.ModuleType("torch_utils")
        package.persistence = persistence

        class EasyDict(dict):
            pass

        EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
        util = types.ModuleType("dnnlib.util")
        util.EasyDict = EasyDict
        dnnlib = types.ModuleType("dnnlib")
        dnnlib.util = util
        for name, module in [("torch_utils", package), ("torch_utils.persistence", persistence),
                             ("dnnlib", dnnlib), ("dnnlib.util", util)]:  # fmt: skip
            monkeypatch.setitem(sys.modules, name, module)
        self.reconstruct = _reconstruct_persistent_obj
        self.EasyDict = EasyDict

    def record(self, class_name: str, state: dict):
        """An object that pickles like an instance of an official persistent class."""
        meta = dict(type="class", version=6, module_src=self.module_src, class_name=class_name, state=state)
        reconstruct = self.reconstruct

        class Persistent:
            def __reduce__(self):
                return (reconstruct, (meta,))

        return Persistent()

    def module_record(self, module: torch.nn.Module, init_kwargs: dict | None = None, dtype=None):
        """The official record of a module: its __dict__ with submodules as records, _init_args/_init_kwargs."""
        state = dict(module.__dict__)
        state["_init_args"], state["_init_kwargs"] = (), dict(init_kwargs or {})
        if dtype is not None:
            state["_parameters"] = {
                k: torch.nn.Parameter(v.detach().to(dtype), requires_grad=False) for k, v in module._parameters.items()
            }
            state["_buffers"] = {k: v.to(dtype) for k, v in module._buffers.items()}
        state["_modules"] = {k: self.child(v, dtype) for k, v in module._modules.items()}
        return self.record(type(module).__name__, state)

    def child(self, module, dtype):
        if module is None:
            return None
        if isinstance(module, torch.nn.ModuleDict):  # not a persistent class: pickled the standard torch way
            plain = torch.nn.ModuleDict()
            plain.__dict__["_modules"] = {k: self.child(v, dtype) for k, v in module._modules.items()}
            return plain
        return self.module_record(module, dtype=dtype)

    def snapshot(self, ref: dict, dtype=None, ema_kwargs_extra: dict | None = None, encoder="vae", protocol=4) -> bytes:
        """A whole official network pickle: EasyDict(encoder, dataset_kwargs, loss_fn, ema)."""
        net = build_reference_net(ref)
        kwargs = {**reference_net_kwargs(ref), "use_fp16": False, **(ema_kwargs_extra or {})}
        raw_std = np.float32([4.17, 4.62, 3.71, 3.28])
        scale = np.float32(0.5) / raw_std
        encoders = {
            "vae": self.record("StabilityVAEEncoder", {
                "_init_args": (), "_init_kwargs": {}, "vae_name": "stabilityai/sd-vae-ft-mse", "scale": scale,
                "bias": np.float32(0) - np.float32([5.81, 3.25, 0.12, -2.15]) * scale, "batch_size": 8, "_vae": None,
            }),  # fmt: skip
            "rgb": self.record("StandardRGBEncoder", {"_init_args": (), "_init_kwargs": {}}),
        }
        data = self.EasyDict(
            encoder=encoders[encoder],
            dataset_kwargs=self.EasyDict(class_name="training.dataset.ImageFolderDataset", path="img512-sd.zip",
                                         use_labels=True, max_size=None),  # fmt: skip
            loss_fn=self.record("EDM2Loss", {"_init_args": (), "_init_kwargs": {"P_mean": -0.4, "P_std": 1.0},
                                             "P_mean": -0.4, "P_std": 1.0, "sigma_data": 0.5}),  # fmt: skip
        )
        data["ema"] = self.module_record(net, kwargs, dtype=dtype)
        return pickle.dumps(data, protocol=protocol)


@pytest.fixture
def official(monkeypatch, tmp_path):
    return OfficialPickler(monkeypatch, str(tmp_path / "MARKER_module_src_ran"))


# ---------------------------------------------------------------------------------------------------------
# Official pickles.


def test_official_pickle_loads_without_running_code_and_matches_reference(ref, official, tmp_path):
    path = tmp_path / "network-snapshot-0671088-0.100.pkl"
    path.write_bytes(official.snapshot(ref))
    loaded = load_network(path)
    assert not os.path.exists(official.marker), "loading executed module_src"

    D, logvar = run_net(loaded.net, ref)
    assert rel_err(D, ref["out_D"]) < 1e-5
    assert rel_err(logvar, ref["out_logvar"]) < 1e-5
    assert not loaded.net.training and not any(p.requires_grad for p in loaded.net.parameters())
    assert loaded.encoder == VAE_SETTINGS  # from the official defaults, consistent with the stored scale / bias
    assert loaded.meta["training_nimg"] == 640 << 20 and loaded.meta["ema_std"] == 0.1
    assert loaded.meta["loss"] == {"class": "EDM2Loss", "P_mean": -0.4, "P_std": 1.0, "sigma_data": 0.5}
    assert loaded.meta["dataset_kwargs"]["path"] == "img512-sd.zip"
    json.dumps(loaded.meta)  # the summary is plain JSON
    assert read_header(path) == loaded.meta and loaded.meta["init_kwargs"] == loaded.net.init_kwargs

    # The file is armed: the official way of loading (plain pickle with the persistence module importable)
    # does execute module_src. This is what the safe loader avoided above.
    with open(path, "rb") as f:
        pickle.load(f)
    assert os.path.exists(official.marker)


def test_official_fp16_snapshot_becomes_float32(ref, official, tmp_path):
    path = tmp_path / "edm2-img512-xs-2147483-0.135.pkl"
    path.write_bytes(official.snapshot(ref, dtype=torch.float16, encoder="rgb"))
    loaded = load_network(path)
    theirs = build_reference_net(ref).state_dict()
    for k, v in loaded.net.state_dict().items():
        assert v.dtype == torch.float32
        assert torch.equal(v, theirs[k].half().float()), k
    assert loaded.meta["source_dtypes"] == ["float16"]
    assert loaded.encoder == {"class": "standard_rgb"}
    assert (loaded.meta["training_nimg"], loaded.meta["ema_std"]) == (2 << 30, 0.135)  # kimg 2147483 = 2Gi images
    assert not os.path.exists(official.marker)


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_official_pickle_any_protocol_any_file_name(ref, official, tmp_path, protocol):
    path = tmp_path / ("weights.bin" if protocol >= 2 else "weights.pkl")  # by content (protocol 2+), not by name
    path.write_bytes(official.snapshot(ref, protocol=protocol))
    loaded = load_network(path)
    theirs = build_reference_net(ref).state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in loaded.net.state_dict().items())
    assert loaded.meta["training_nimg"] is None and loaded.meta["ema_std"] is None  # no official file name
    assert not os.path.exists(official.marker)


def test_crafted_build_cannot_modify_torch(tmp_path):
    """BUILD opcodes applied to the allowed callables only touch per-load stand-ins."""
    import torch._utils

    before = torch._utils._rebuild_tensor_v2.__defaults__
    path = tmp_path / "crafted.pkl"
    path.write_bytes(b"ctorch._utils\n_rebuild_tensor_v2\n(N}S'__defaults__'\n(I1\ntstb.")
    with pytest.raises(ModelFileError):
        load_network(path)  # loads the (altered) stand-in, which is no official network pickle
    assert torch._utils._rebuild_tensor_v2.__defaults__ == before


def test_official_unknown_constructor_argument_is_reported(ref, official, tmp_path):
    path = tmp_path / "net.pkl"
    path.write_bytes(official.snapshot(ref, ema_kwargs_extra={"fancy_new_option": 3}))
    with pytest.raises(ModelFileError, match="fancy_new_option"):
        load_network(path)
    assert not os.path.exists(official.marker)


class _RunsCode:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "nested_in_record", "builtins.exec"])
def test_pickle_that_runs_code_is_refused(ref, official, tmp_path, kind):
    marker = tmp_path / f"MARKER_{kind}"
    py_code = f"open({str(marker)!r}, 'w').write('pwned')"
    payload = {
        "os.system": _RunsCode(os.system, f"touch {marker}"),
        "builtins.eval": _RunsCode(eval, py_code),
        "builtins.exec": _RunsCode(exec, py_code),
        "nested_in_record": official.record("Precond", {"_init_args": (), "_init_kwargs": {},
                                                         "_parameters": {"w": _RunsCode(eval, py_code)}}),  # fmt: skip
    }[kind]
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ema": payload}))
    with pytest.raises(UnsafePickleError) as info:
        load_network(path)
    named = {"os.system": "system", "builtins.eval": "builtins.eval", "builtins.exec": "builtins.exec",
             "nested_in_record": "builtins.eval"}[kind]  # fmt: skip
    assert named in str(info.value) and str(path) in str(info.value)
    assert not marker.exists() and not os.path.exists(official.marker)


# ---------------------------------------------------------------------------------------------------------
# This project's format.


def test_round_trip_is_exact(ref, tmp_path):
    net = build_reference_net(ref)
    path = tmp_path / "snap" / "model.safetensors"
    save_network(path, net, encoder=VAE_SETTINGS, ema_std=0.05, training_nimg=123456789, extra={"note": "x"})
    assert sorted(os.listdir(path.parent)) == ["model.safetensors"]  # no temporary file left behind

    loaded = load_network(str(path))
    ours, theirs = loaded.net.state_dict(), net.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) and ours[k].dtype == torch.float32 for k in ours)
    D0, u0 = run_net(net, ref)
    D1, u1 = run_net(loaded.net, ref)
    assert torch.equal(D0, D1) and torch.equal(u0, u1)
    assert loaded.encoder == VAE_SETTINGS and loaded.ema_std == 0.05 and loaded.training_nimg == 123456789
    assert loaded.meta["init_kwargs"] == net.init_kwargs and loaded.meta["extra"] == {"note": "x"}
    assert loaded.meta["network_class"] == "Precond" and loaded.meta["edm2_version"]
    assert read_header(path) == loaded.meta
    assert not loaded.net.training and not any(p.requires_grad for p in loaded.net.parameters())


def test_half_precision_network_is_stored_as_float32(ref, tmp_path):
    net = build_reference_net(ref).half()
    save_network(tmp_path / "m.safetensors", net)
    loaded = load_network(tmp_path / "m.safetensors")
    for k, v in loaded.net.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, net.state_dict()[k].float())
    assert loaded.encoder is None and loaded.ema_std is None


def test_converter_cli(ref, official, tmp_path):
    src = tmp_path / "network-snapshot-0000512-0.050.pkl"
    src.write_bytes(official.snapshot(ref))
    dest = tmp_path / "converted.safetensors"
    result = CliRunner().invoke(convert_main, [str(src), str(dest)])
    assert result.exit_code == 0, result.output
    converted, direct = load_network(dest), load_network(src)
    assert torch.equal(run_net(converted.net, ref)[0], run_net(direct.net, ref)[0])
    assert converted.encoder == VAE_SETTINGS
    assert (converted.training_nimg, converted.ema_std) == (512000, 0.05)
    assert converted.meta["extra"]["converted_from"] == str(src)
    assert not os.path.exists(official.marker)

    bad = CliRunner().invoke(convert_main, [str(dest), str(tmp_path / "again.safetensors")])
    assert bad.exit_code != 0 and "not an official EDM2 pickle" in bad.output
    bad = CliRunner().invoke(convert_main, [str(src), str(tmp_path / "out.pkl")])
    assert bad.exit_code != 0 and ".safetensors" in bad.output


# ---------------------------------------------------------------------------------------------------------
# Bad input.


def _saved(ref, tmp_path) -> bytes:
    save_network(tmp_path / "good.safetensors", build_reference_net(ref))
    return (tmp_path / "good.safetensors").read_bytes()


def _rewrite_header(data: bytes, edit) -> bytes:
    """A safetensors file with its JSON header changed by `edit` (the tensor bytes unchanged)."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def test_corrupt_files_give_clear_errors(ref, official, tmp_path):
    good = _saved(ref, tmp_path)
    first_tensor = next(k for k in json.loads(good[8 : 8 + struct.unpack("<Q", good[:8])[0]]) if k != "__metadata__")

    def shape_lie(h):  # the header claims a shape its byte range cannot hold
        h[first_tensor]["shape"] = [s * 2 for s in h[first_tensor]["shape"]] or [2]

    def wider_network(h):  # the edm2 header describes a different network than the tensors
        meta = json.loads(h["__metadata__"]["edm2"])
        meta["init_kwargs"]["model_channels"] = 24
        h["__metadata__"]["edm2"] = json.dumps(meta)

    def no_edm2(h):
        del h["__metadata__"]

    def bad_json(h):
        h["__metadata__"]["edm2"] = "{not json"

    official_bytes = official.snapshot(ref)
    cases = {
        "truncated.safetensors": (good[: len(good) - 1000], "corrupt or truncated"),
        "shape.safetensors": (_rewrite_header(good, shape_lie), "corrupt or truncated"),
        "wider.safetensors": (_rewrite_header(good, wider_network), "do not match"),
        "plain.safetensors": (_rewrite_header(good, no_edm2), "not an edm2 model file"),
        "badjson.safetensors": (_rewrite_header(good, bad_json), "not valid JSON"),
        "garbage.safetensors": (b"\x00\x01 this is not a model file" * 10, "unrecognised file format"),
        "empty.safetensors": (b"", "empty file"),
        "truncated.pkl": (official_bytes[: len(official_bytes) // 2], "truncated or corrupt pickle"),
        "not_a_network.pkl": (pickle.dumps({"weights": [1, 2, 3]}), "dict with key 'ema'"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ModelFileError) as info:
            load_network(path)
        assert message in str(info.value) and str(path) in str(info.value), (name, str(info.value))
    assert not os.path.exists(official.marker)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_network(tmp_path / "missing.safetensors")


def test_save_network_argument_checks(ref, tmp_path):
    net = build_reference_net(ref)
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_network(tmp_path / "model.pkl", net)
    with pytest.raises(ValueError, match="ema_std"):
        save_network(tmp_path / "m.safetensors", net, ema_std=-1.0)
    with pytest.raises(ValueError, match="encoder"):
        save_network(tmp_path / "m.safetensors", net, encoder={"vae_name": "x"})
    with pytest.raises(ValueError, match="plain JSON"):
        save_network(tmp_path / "m.safetensors", net, extra={"t": torch.zeros(1)})
    with pytest.raises(ValueError, match="not registered"):
        save_network(tmp_path / "m.safetensors", torch.nn.Linear(2, 2))
    assert not any(tmp_path.iterdir())  # a refused save writes nothing


def test_network_class_registry(ref, tmp_path):
    class TinyNet(torch.nn.Module):
        def __init__(self, width: int = 3):
            super().__init__()
            self.init_kwargs = {"width": width}
            self.lin = torch.nn.Linear(width, width)

    register_network_class("TinyNetForTest", TinyNet)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_network_class("TinyNetForTest", torch.nn.Linear)
        net = TinyNet(5)
        save_network(tmp_path / "tiny.safetensors", net)
        loaded = load_network(tmp_path / "tiny.safetensors")
        assert isinstance(loaded.net, TinyNet) and torch.equal(loaded.net.lin.weight, net.lin.weight)
    finally:
        NETWORK_CLASSES.pop("TinyNetForTest")


# ---------------------------------------------------------------------------------------------------------
# Official presets.


def test_official_presets():
    # The official README's list of presets, expanded.
    sizes = ["xs", "s", "m", "l", "xl", "xxl"]
    expected = {f"edm2-img512-{s}-{m}" for s in sizes for m in ("fid", "dino")}
    expected |= {f"edm2-img64-{s}-fid" for s in ("s", "m", "l", "xl")}
    expected |= {f"edm2-img512-{s}-guid-{m}" for s in sizes for m in ("fid", "dino")}
    expected |= {f"edm2-img512-{s}-autog-{m}" for s in ("s", "xxl") for m in ("fid", "dino")}
    expected |= {f"edm2-img512-s-uncond-autog-{m}" for m in ("fid", "dino")}
    expected |= {f"edm2-img64-s-autog-{m}" for m in ("fid", "dino")}
    assert set(OFFICIAL_PRESETS) == expected
    for name, preset in OFFICIAL_PRESETS.items():
        assert set(preset) == {"net", "gnet", "guidance"}
        assert preset["net"].startswith(OFFICIAL_MODEL_ROOT + "/") and preset["net"].endswith(".pkl")
        kimg, std = parse_snapshot_name(preset["net"])
        assert kimg > 0 and 0 < std < 0.3, name
        guided = "-guid-" in name or "-autog-" in name
        assert (preset["gnet"] is not None) == guided and (preset["guidance"] > 1) == guided, name
        if "-guid-" in name:
            assert "-uncond-" in preset["gnet"]
    p = resolve_official_preset("edm2-img512-xxl-guid-dino")
    assert p == {"net": f"{OFFICIAL_MODEL_ROOT}/edm2-img512-xxl-0939524-0.015.pkl",
                 "gnet": f"{OFFICIAL_MODEL_ROOT}/edm2-img512-xs-uncond-2147483-0.015.pkl", "guidance": 1.7}  # fmt: skip
    p["guidance"] = 9.0
    assert OFFICIAL_PRESETS["edm2-img512-xxl-guid-dino"]["guidance"] == 1.7  # a copy
    with pytest.raises(ValueError, match="edm2-img512-s-autog-fid"):
        resolve_official_preset("edm2-img512-s-nonsense")


def test_safetensors_header_length_starting_with_0x80_is_not_taken_for_a_pickle(tmp_path):
    """A header of 128 + 256 k bytes makes the file start with byte 0x80, the pickle PROTO opcode."""
    import struct

    from edm2.model_files import detect_format

    header = b'{"__metadata__":{"a":"' + b"x" * 200 + b'"}}'
    header += b" " * (384 - len(header))
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    assert path.read_bytes()[:1] == b"\x80"
    assert detect_format(path) == "safetensors"
