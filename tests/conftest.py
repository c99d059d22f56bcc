"""Shared test fixtures: the reference numbers of the paper's official implementation (tests/data)."""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DATA = pathlib.Path(__file__).resolve().parent / "data"
REFERENCE_NPZ = DATA / "edm2_reference_public.npz"
PHEMA_NPZ = DATA / "phema_reference.npz"


def run_in_triton_interpreter(code: str) -> dict:
    """Run `code` in a subprocess with TRITON_INTERPRET=1 (it must be set before Triton is imported, so the
    Triton kernels run on the CPU) and return the JSON it prints on its last line starting with 'RESULT '."""
    import os
    import subprocess

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def load_reference() -> dict[str, np.ndarray]:
    with np.load(REFERENCE_NPZ) as d:
        return {k: d[k] for k in d.files}


def reference_meta(ref: dict[str, np.ndarray]) -> dict:
    return json.loads(bytes(ref["meta_json"]))


def reference_net_kwargs(ref: dict[str, np.ndarray], prefix: str = "net") -> dict:
    """Constructor arguments of the fixture's main ('net') or guiding ('gnet') network."""
    meta = reference_meta(ref)
    kwargs = dict(meta["config"])
    if prefix == "gnet":
        kwargs["model_channels"] = meta["gnet_model_channels"]
    return kwargs


def build_reference_net(ref: dict[str, np.ndarray], prefix: str = "net", **overrides):
    """This project's Precond holding the fixture's weights, in eval mode."""
    from networks import Precond

    net = Precond(**reference_net_kwargs(ref, prefix), **overrides)
    state = {k[len(prefix) + 1 :]: torch.from_numpy(v) for k, v in ref.items() if k.startswith(prefix + "/")}
    net.load_state_dict(state, strict=True)
    return net.eval()


@pytest.fixture(scope="session")
def ref() -> dict[str, np.ndarray]:
    return load_reference()


@pytest.fixture(scope="session")
def phema_ref() -> dict[str, np.ndarray]:
    with np.load(PHEMA_NPZ) as d:
        return {k: d[k] for k in d.files}


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny networks: extra threads only add synchronisation (badly so on a busy machine). Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ref_nets(ref):
    """The fixture's main and guiding networks, built once per module."""
    return build_reference_net(ref, "net"), build_reference_net(ref, "gnet")
