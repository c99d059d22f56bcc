"""sweep_solvers.py and edm2.solver_sweep: every point scored, the proxy score, the table, the plot, bad input."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from test_generate import _tiny_net

from edm2.model_files import save_network
from edm2.sampling import sampling_settings
from edm2.solver_sweep import PROXY, SolverSweep, SweepPoint, image_distance_score, sweep_solvers

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny networks: one thread is faster


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("sweep") / "net.safetensors"
    save_network(path, _tiny_net(0, img_resolution=8, attn_resolutions=[4], channel_mult=[1, 2]),
                 encoder={"class": "standard_rgb"})
    return path


def _invoke(*args):
    from sweep_solvers import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_sweep_writes_table_json_and_plot(model, tmp_path):
    out = tmp_path / "out"
    r = _invoke("--net", model, "--seeds", "0-3", "--solvers", "dpmpp_2m,euler_ancestral", "--steps", "2,4",
                "--baseline-steps", "3", "--reference-steps", "12", "--eta", "0.5", "--outdir", out)
    assert r.exit_code == 0, r.output
    data = json.loads((out / "solver_sweep.json").read_text())
    assert data["metric"] == PROXY and "heun with 12 steps" in data["note"]
    assert data["baseline"] == {**data["baseline"], "solver": "heun", "steps": 3, "evals": 5}
    points = {(p["solver"], p["steps"]): p for p in data["points"]}
    assert sorted(points) == [("dpmpp_2m", 2), ("dpmpp_2m", 4), ("euler_ancestral", 2), ("euler_ancestral", 4)]
    assert all(p["evals"] == p["steps"] and p["value"] > 0 for p in points.values())
    # More steps of a deterministic solver land closer to the converged sample.
    assert points["dpmpp_2m", 4]["value"] < points["dpmpp_2m", 2]["value"]
    table = (out / "solver_sweep.md").read_text()
    assert "| dpmpp_2m | 4 | 4 |" in table and "Fewest steps at or below the baseline" in table
    assert (out / "solver_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["solver_sweep.json", "solver_sweep.md", "solver_sweep.png"]


def test_proxy_is_zero_for_the_reference_itself_and_deterministic():
    net = _tiny_net(1, img_resolution=8, attn_resolutions=[4], channel_mult=[1, 2])
    target = sampling_settings("heun", 6)
    score = image_distance_score(net, [0, 1, 2], target, batch_size=2)
    assert score(target) == 0
    one = score(sampling_settings("euler_ancestral", 3))
    assert one > 0 and score(sampling_settings("euler_ancestral", 3)) == one  # per-seed noise: reproducible


def test_matches_pick_the_fewest_steps_at_or_below_the_baseline():
    base = SweepPoint("heun", 32, 63, 1.0)
    pts = [SweepPoint("a", 4, 4, 3.0), SweepPoint("a", 8, 8, 1.0), SweepPoint("a", 16, 16, 0.5),
           SweepPoint("b", 4, 4, 2.0)]
    matches = SolverSweep(PROXY, "", base, pts).matches()
    assert matches["a"].steps == 8 and matches["b"] is None


def test_sweep_checks_every_setting_before_scoring():
    calls = []
    with pytest.raises(ValueError, match="eta"):
        sweep_solvers(lambda s: calls.append(s) or 1.0, ["euler", "dpmpp_2m_sde"], [2], eta=-1)
    assert calls == []


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--solvers", "heun,nope"], "'--solvers'"),
        (["--steps", "0,4"], "'--steps'"),
        (["--steps", "4,x"], "'--steps'"),
        (["--eta", "-1", "--solvers", "euler_ancestral"], "'--eta'"),
        (["--metric", "fid"], "'--ref'"),
        (["--ref", "ref.npz"], "'--ref'"),  # with the default metric, once ignored without a word
        (["--seeds", "3"], "'--seeds'"),
        (["--guidance", "2"], "'--guidance'"),
        (["--guidance-interval", "3,1"], "'--guidance-interval'"),
    ],
)
def test_bad_input_names_the_option(model, tmp_path, args, fragment):
    r = _invoke("--net", model, "--outdir", tmp_path / "never", *args)
    assert r.exit_code == 2 and fragment in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "never").exists()


def test_out_of_memory_names_batch(model, tmp_path, monkeypatch):
    import torch

    import sweep_solvers

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(sweep_solvers, "run_sweep", oom)
    r = CliRunner().invoke(sweep_solvers.main, ["--net", str(model), "--seeds", "0-3", "--solvers", "euler",
                                                "--steps", "2", "--outdir", str(tmp_path / "out")])  # fmt: skip
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "Error: out of GPU memory; give a smaller --batch (images per batch;" in r.output
    assert not (tmp_path / "out").exists()
