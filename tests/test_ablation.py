"""The ablation ladder (configs A-G of the EDM2 paper's Table 1): presets, model files, training and exact resumption
in process, and the defining magnitude property of the configurations."""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_detectors import tiny_detector

import edm2.presets as presets
from edm2.detectors import save_detector
from networks import MPConv, Precond
from networks.ablation import AblationUNet, Conv
from training.config import TrainingConfig
from training.demo_data import write_demo_dataset
from training.instruments import read_stats
from training.loss import EDM2Loss
from training.plot_stats import magnitude_series
from training.plot_stats import main as plot_main
from training.model_files import load_model_file, save_network
from training.run_dir import load_state
from training.training_loop import list_checkpoints, training_loop

ROOT = pathlib.Path(__file__).resolve().parents[1]
LETTERS = "abcdefg"
TINY = dict(img_resolution=16, model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8],
            channels_per_head=8, logvar_channels=8)  # fmt: skip


def tiny_kwargs(letter: str) -> dict:
    return presets.preset_network_kwargs(f"ablation-{letter}-demo", **TINY)


def tiny_config(letter: str, data: str, duration: int) -> TrainingConfig:
    """The demo ablation preset's training settings on a tiny network: 8 images a step, a checkpoint every 16."""
    train = presets.preset_training_kwargs(f"ablation-{letter}-demo")
    c = TrainingConfig(data=data, duration=duration, batch=8, status=16, snapshot=0, checkpoint=16, workers=0)
    c.network = dict(tiny_kwargs(letter), precision="fp32")
    c.loss.__dict__.update(train["loss"])
    c.lr.__dict__.update(train["lr"], rampup_img=8)
    c.force_weight_norm = train["force_weight_norm"]
    c.ema_stds = [0.1]
    c.ema_halflife, c.ema_rampup = train.get("ema_halflife"), train.get("ema_rampup")  # A-B: the traditional EMA
    return c


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_demo_dataset(str(tmp_path_factory.mktemp("data") / "shapes16.zip"), num_images=32, resolution=16)


def hidden_weights(net: Precond, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The backbone's convolution / linear weights by name; without `names`, all but the zero-initialized ones (the
    last layers of A-C's branches), whose growth from zero would say nothing."""
    out = {}
    for name, m in net.backbone.named_modules():
        if isinstance(m, (Conv, MPConv)) and (m.weight.abs().sum() > 0 if names is None else name in names):
            out[name] = m.weight.detach().clone()
    return out


def unit_norms(w: torch.Tensor) -> torch.Tensor:
    """Per output unit: ||w_i|| / sqrt(fan_in), 1 for a forced-normalized MPConv weight (Eq. 66)."""
    return w.flatten(1).norm(dim=1) / math.sqrt(w[0].numel())


# --- presets and model files ---------------------------------------------------------------------------------


def test_presets_select_the_ladder():
    for letter in LETTERS:
        for size in ("xs", "demo"):
            kwargs = presets.preset_network_kwargs(f"ablation-{letter}-{size}")
            train = presets.preset_training_kwargs(f"ablation-{letter}-{size}")
            if letter == "g":  # the reference network and today's training, nothing else
                assert "arch" not in kwargs and "config" not in kwargs
                base = "demo" if size == "demo" else "edm2-img512-xs"
                assert kwargs == presets.preset_network_kwargs(base)
                assert {k: v for k, v in train.items() if k != "force_weight_norm"} | {"loss": train["loss"]} == (
                    presets.preset_training_kwargs(base) | {"loss": train["loss"]}
                )
            else:
                assert kwargs["arch"] == "ablation" and kwargs["config"] == letter
            assert train["loss"]["learned_weighting"] == (letter != "a")
            assert train["force_weight_norm"] == (letter in "efg")
            assert (train["lr"]["ref_batches"] > 0) == (letter in "efg")  # the decay comes with E
            if letter in "ab":  # EDM's ImageNet-64 EMA (half-life 50 of 2500 Mimg, ramp-up 0.05) scaled to the duration
                assert train["ema_halflife"] == {"xs": 42949673, "demo": 655}[size] == round(train["duration"] / 50)
                assert train["ema_rampup"] == 0.05
            else:
                assert "ema_halflife" not in train and "ema_rampup" not in train
    assert presets.preset_training_kwargs("ablation-a-xs")["loss"]["P_mean"] == -1.2  # EDM's distribution
    assert presets.preset_dataset("ablation-c-xs") == "img512"


@pytest.mark.parametrize("letter", LETTERS)
def test_model_file_round_trip(tmp_path, letter):
    torch.manual_seed(0)
    net = Precond(**tiny_kwargs(letter))
    with torch.no_grad():
        for p in net.parameters():  # non-zero everywhere, so that the zero-initialized layers count too
            p.add_(0.01 * torch.randn_like(p))
    save_network(tmp_path / "net.safetensors", net)
    loaded = load_model_file(tmp_path / "net.safetensors").net
    assert type(loaded.backbone) is type(net.backbone)
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 3.0])
    torch.testing.assert_close(loaded(x, sigma, torch.arange(2)), net.eval()(x, sigma, torch.arange(2)), rtol=0,
                               atol=0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="config must be one of"):
        Precond(**dict(tiny_kwargs("a"), config="g"))
    with pytest.raises(ValueError, match="goes with arch 'ablation' only"):
        Precond(**dict(tiny_kwargs("g"), config="a"))
    with pytest.raises(ValueError, match="skip_scaling"):
        Precond(**tiny_kwargs("c"), skip_scaling="cs")
    with pytest.raises(ValueError, match="unknown preset"):
        presets.get_preset("ablation-h-demo")


def test_edm_loss_weighting_without_uncertainty():
    """Config A's loss: lambda(sigma) (D - y)^2 with no learned u(sigma) (the EDM loss)."""
    torch.manual_seed(0)
    net = Precond(**tiny_kwargs("a"))
    images, noise, sigma = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16), torch.tensor([0.5, 2.0])
    loss = EDM2Loss(learned_weighting=False)(net, images, torch.arange(2), sigma=sigma, noise=noise)
    s = sigma.reshape(-1, 1, 1, 1)
    expected = (s**2 + 0.25) / (s * 0.5) ** 2 * (net(images + noise * s, sigma, torch.arange(2)) - images) ** 2
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    learned = EDM2Loss()(net, images, torch.arange(2), sigma=sigma, noise=noise)
    assert not torch.equal(learned, loss)  # the logvar term is there otherwise


# --- magnitudes ----------------------------------------------------------------------------------------------


def test_g_activations_near_unit_magnitude_at_initialization():
    torch.manual_seed(0)
    net = Precond(**presets.preset_network_kwargs("ablation-g-demo"))
    rms = {}
    hooks = [b.register_forward_hook(lambda m, a, o, k=k: rms.__setitem__(k, float(o.square().mean().sqrt())))
             for k, b in enumerate(net.backbone.blocks())]  # fmt: skip
    x = torch.randn(8, 3, 32, 32) * 0.5
    with torch.no_grad():
        net(x, torch.full([8], 1.0), torch.arange(8) % 10)
    for h in hooks:
        h.remove()
    assert len(rms) == len(net.backbone.blocks()) and all(0.6 < v < 1.6 for v in rms.values()), rms


# --- training in process ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("letter", LETTERS)
def test_trains_resumes_exactly_and_keeps_its_magnitude_property(tmp_path, data, letter):
    torch.set_num_threads(1)
    straight = tiny_config(letter, data, duration=48)
    training_loop(str(tmp_path / "straight"), straight)
    training_loop(str(tmp_path / "resumed"), tiny_config(letter, data, duration=24))
    training_loop(str(tmp_path / "resumed"), straight)  # resumes from the checkpoint at 24 images
    (na, pa), *_ = list_checkpoints(str(tmp_path / "straight"))
    (nb, pb), *_ = list_checkpoints(str(tmp_path / "resumed"))
    assert na == nb == 48
    a, b = load_state(pa), load_state(pb)
    for key in ("net", "ema"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    entries = read_stats(str(tmp_path / "straight"))
    assert [e["nimg"] for e in entries] == [16, 32, 48] and all(math.isfinite(e["loss"]) for e in entries)
    # A-B average the weights with EDM's traditional EMA, C-G with the power-function EMAs, whose runs' files keep
    # their keys (no EMA settings in training_options.json).
    options = json.loads((tmp_path / "straight" / "training_options.json").read_text())
    snapshots = sorted(p.name for p in (tmp_path / "straight").glob("network-snapshot-*"))
    if letter in "ab":
        assert options["ema_halflife"] == 655 and options["ema_rampup"] == 0.05
        assert snapshots == ["network-snapshot-0000000-ema.safetensors"]
        assert a["ema"]["halflife_nimg"].item() == 655 and "stds" not in a["ema"]
    else:
        assert snapshots == ["network-snapshot-0000000-0.100.safetensors"]
        switches = {"force_weight_norm"} if letter in "cd" else set()  # off: written
        assert set(options) == set(TrainingConfig().to_dict()) | {"data_identity"} | switches
        assert "learned_weighting" not in options["loss"]
    snapshot = load_model_file(tmp_path / "straight" / snapshots[0])
    assert snapshot.training_nimg == 48
    for k, v in snapshot.net.state_dict().items():  # the snapshot is the checkpoint's EMA
        assert torch.equal(v, a["ema"][f"ema.{k}" if letter in "ab" else f"ema.0.{k}"]), k
    # The magnitude instruments: every stage's activation RMS and weight norm on every status line.
    feats, norms = magnitude_series(entries, "feat_rms"), magnitude_series(entries, "weight_norm")
    stages = ["enc.16x16", "enc.8x8", "dec.8x8", "dec.16x16"]
    assert sorted(feats) == sorted(norms) == sorted(stages)
    assert all(len(v) == 3 for v in [*feats.values(), *norms.values()])
    if letter in "efg":
        assert all(v == pytest.approx([v[0]] * 3, rel=1e-5) for v in norms.values())
    if letter == "a":
        assert all(v[2] > v[0] for v in norms.values())
        r = CliRunner().invoke(plot_main, [str(tmp_path / "straight"), "--magnitudes"])
        assert r.exit_code == 0, r.output
        assert (tmp_path / "straight" / "magnitudes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        both = str(tmp_path / "both.png")
        r = CliRunner().invoke(plot_main, [str(tmp_path / "straight"), str(tmp_path / "resumed"), "--magnitudes",
                                           "--out", both])  # fmt: skip
        assert r.exit_code == 0 and os.path.getsize(both) > 1000, r.output

    # The defining property against the initial weights (the loop seeds the construction with config.seed).
    torch.manual_seed(straight.seed)
    init = Precond(**straight.network)
    trained = Precond(**straight.network)
    trained.load_state_dict(a["net"])
    before = hidden_weights(init)
    after = hidden_weights(trained, list(before))
    assert after.keys() == before.keys()
    def total(weights: dict[str, torch.Tensor]) -> float:
        return sum(float(w.square().sum()) for w in weights.values())

    growth = total(after) / total(before)
    if letter in "abcd":  # no forced normalization: Adam's updates, orthogonal on average, make the weights grow
        assert growth > 1.0001, growth
    if letter in "efg":  # forced weight normalization: unit norm per output unit after every step
        for w in after.values():
            torch.testing.assert_close(unit_norms(w), torch.ones(w.shape[0]), rtol=0, atol=3e-4)  # eps of Eq. 66
    if letter == "d":  # the same layers as E, not normalized: the stored norms drift away from 1
        assert max(float((unit_norms(w) - 1).abs().max()) for w in after.values()) > 1e-3


def test_ablation_unet_takes_g_topology():
    """Same block names as the reference network, so that per-stage instruments and plots line up across configs."""
    g = Precond(**tiny_kwargs("g")).backbone
    for letter in "abcdef":
        net = Precond(**tiny_kwargs(letter)).backbone
        assert isinstance(net, AblationUNet) and list(net.enc) == list(g.enc) and list(net.dec) == list(g.dec)


def load_experiment():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ablation_experiment", ROOT / "experiments" / "ablation.py")
    experiment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(experiment)
    return experiment


def test_experiment_bad_input(tmp_path):
    experiment = load_experiment()
    r = CliRunner().invoke(experiment.cli, ["run", "--outdir", str(tmp_path / "x"), "--configs", "az"])
    assert r.exit_code != 0 and "--configs" in r.output and "'az'" in r.output
    r = CliRunner().invoke(experiment.cli, ["analyze", "--outdir", str(tmp_path)])
    assert r.exit_code != 0 and "no run folder" in r.output
    r = CliRunner().invoke(experiment.cli, ["analyze", "--outdir", str(tmp_path), "--metric", "fid",
                                            "--inception-weights", str(tmp_path / "no.pth")])  # fmt: skip
    assert r.exit_code != 0 and "no run folder" in r.output  # before the detectors
    (tmp_path / "afile").write_bytes(b"")  # once FileExistsError tracebacks
    for option in ("--outdir", "--rundir"):
        args = ["run", "--outdir", str(tmp_path / "x"), "--configs", "a", option, str(tmp_path / "afile")]
        r = CliRunner().invoke(experiment.cli, args)
        assert r.exit_code == 2 and f"Invalid value for '{option}'" in r.output and "is a file" in r.output, r.output
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "stats.jsonl").write_text("garbage\n")  # once a JSONDecodeError traceback
    r = CliRunner().invoke(experiment.cli, ["analyze", "--outdir", str(tmp_path)])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    assert "a/stats.jsonl: line 1 is not a status entry (a JSON object): 'garbage'" in r.output


@pytest.fixture(scope="module")
def experiment_runs(tmp_path_factory, data) -> pathlib.Path:
    """Two short runs, A and G, for the experiment's analysis (the tests work on copies)."""
    torch.set_num_threads(1)
    runs = tmp_path_factory.mktemp("experiment") / "runs"
    for letter in "ag":
        training_loop(str(runs / letter), tiny_config(letter, data, duration=48))
    return runs


def copy_runs(runs: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
    shutil.copytree(runs, dest)
    return dest


def test_experiment_table_and_plot(tmp_path, experiment_runs):
    """experiments/ablation.py's analysis on two short runs: A's weights drift, G's do not."""
    experiment = load_experiment()
    copy_runs(experiment_runs, tmp_path / "runs")
    results = experiment.analyze(str(tmp_path / "out"), str(tmp_path / "runs"))
    assert results["common_images"] == 48 and list(results["configs"]) == ["a", "g"]
    a, g = results["configs"]["a"], results["configs"]["g"]
    assert a["weight_drift"] > 1 and g["weight_drift"] == pytest.approx(1, abs=1e-5)
    table = (tmp_path / "out" / "ablation.md").read_text()
    assert "| A | " in table and "| G | " in table and "EDM weighting" in table
    assert (tmp_path / "out" / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "out" / "ablation.json").read_text())
    assert saved["configs"]["g"]["images"] == 48
    # The EMA snapshots: A's traditional EMA and G's power-function EMA, scored on one scale (EDM weighting).
    ema = results["ema"]
    assert ema["a"]["best"]["file"] == "network-snapshot-0000000-ema.safetensors"
    assert ema["a"]["best"]["ema"] == "traditional, half-life 655 images" and ema["a"]["best"]["images"] == 48
    assert ema["g"]["best"]["ema"] == "power-function std 0.100"
    assert all(math.isfinite(e["best"]["loss"]) and e["best"]["loss"] > 0 for e in ema.values())
    assert ema["a"]["best"]["loss"] != ema["g"]["best"]["loss"] and saved["ema"] == ema
    assert "| traditional, half-life 655 images (48) | " in table
    # The runs the experiment starts: A-B with the traditional EMA's half-life scaled to their duration.
    settings = dict(experiment.SETTINGS["gpu"])
    command = experiment.train_command("r", "d.zip", "b", settings, 0)
    assert command[command.index("--ema-halflife") + 1] == str(round(settings["duration"] / 50))
    assert "--instruments" in command  # a long run compiles, which would turn the magnitudes off by default
    assert "--ema-halflife" not in experiment.train_command("r", "d.zip", "c", settings, 0)
    # A run whose status lines carry no magnitudes: its columns read "—", the rest of the analysis stands.
    stats = tmp_path / "runs" / "g" / "stats.jsonl"
    stripped = [{k: v for k, v in json.loads(line).items() if not k.startswith("stages/")}
                for line in stats.read_text().splitlines()]  # fmt: skip
    stats.write_text("".join(json.dumps(e) + "\n" for e in stripped))
    results = experiment.analyze(str(tmp_path / "out"), str(tmp_path / "runs"))
    g = results["configs"]["g"]
    assert g["activation_drift"] is None and g["weight_drift"] is None and g["final_activation_rms"] is None
    assert results["configs"]["a"]["weight_drift"] > 1
    assert "| G | " in (tmp_path / "out" / "ablation.md").read_text().split("| A | ")[1]
    assert "| — | — | — |" in (tmp_path / "out" / "ablation.md").read_text()


@pytest.fixture(scope="module")
def detector_files(tmp_path_factory) -> dict[str, str]:
    """Tiny random detectors saved as weight files (the real ones are downloads), as tests/test_metrics.py makes."""
    d = tmp_path_factory.mktemp("detectors")
    return {m: str(save_detector(d / f"{m}.safetensors", tiny_detector(m, seed=i)))
            for i, m in enumerate(("fid", "fd_dinov2"))}  # fmt: skip


def test_experiment_metrics_of_the_best_ema(tmp_path, data, experiment_runs, detector_files, monkeypatch):
    """--metric: FID / FD_DINOv2 of each configuration's best EMA snapshot against the statistics of the runs'
    training data, made once as OUTDIR/ref.npz and reused; the same numbers as calculate_metrics.py gen."""
    from calculate_metrics import main as metrics_main
    from edm2 import metrics as M

    experiment = load_experiment()
    runs = copy_runs(experiment_runs, tmp_path / "runs")
    shutil.copy(data, runs / "demo-data.zip")  # where `run` writes the demo data
    out = tmp_path / "out"
    fid_weights = ["--inception-weights", detector_files["fid"]]

    def analyze(*extra: str, outdir: pathlib.Path = out):
        r = CliRunner().invoke(experiment.cli, ["analyze", "--outdir", str(outdir), "--rundir", str(runs),
                                                "--seeds", "0-7", *extra])  # fmt: skip
        assert r.exit_code == 0, r.output
        return json.loads((outdir / "ablation.json").read_text())

    saved = analyze("--metric", "fid", *fid_weights)
    fid = {k: v["best"]["fid"] for k, v in saved["ema"].items()}
    assert list(fid) == ["a", "g"] and all(math.isfinite(v) and v > 0 for v in fid.values()) and fid["a"] != fid["g"]
    assert "fd_dinov2" not in saved["ema"]["g"]["best"]
    info = saved["metrics"]
    assert info["metrics"] == ["fid"] and info["seeds"] == "0-7" and info["num_images"] == 8
    assert info["reference"] == str(out / "ref.npz") and info["detectors"]["fid"]["weights"] == "fid.safetensors"
    table = (out / "ablation.md").read_text()
    assert "| EMA loss (EDM weighting, held out) | FID |" in table and "8 images (seeds 0-7" in table
    assert f"| {saved['ema']['a']['best']['loss']:.4f} | {fid['a']:.2f} |" in table.split("| A | ")[1]
    # The reference: all 32 training images, with the detector's statistics.
    ref = M.load_reference(out / "ref.npz")
    expected = M.dataset_statistics(data, "fid", weights={"fid": detector_files["fid"]}, workers=0, progress=False)
    assert list(ref) == ["fid"] and ref["fid"].num_images == 32
    np.testing.assert_allclose(ref["fid"].mu, expected["fid"].mu, rtol=1e-12)
    # G's FID is the one calculate_metrics.py gen gives its best snapshot with generate.py's default sampler.
    r = CliRunner().invoke(metrics_main, ["gen", "--net", str(runs / "g" / saved["ema"]["g"]["best"]["file"]),
                                          "--ref", str(out / "ref.npz"), "--seeds", "0-7", "--no-progress",
                                          "--out", str(tmp_path / "gen.json"), *fid_weights])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "gen.json").read_text())["results"]["fid"] == pytest.approx(fid["g"], rel=1e-6)

    # A second analysis reuses ref.npz (nothing recomputed) and gives the same numbers.
    made = []
    dataset_statistics = M.dataset_statistics
    monkeypatch.setattr(M, "dataset_statistics", lambda path, metrics, **kw: made.append(metrics) or
                        dataset_statistics(path, metrics, **kw))  # fmt: skip
    before = (out / "ref.npz").read_bytes()
    again = analyze("--metric", "fid", *fid_weights)
    assert made == [] and (out / "ref.npz").read_bytes() == before
    assert {k: v["best"]["fid"] for k, v in again["ema"].items()} == fid
    # Another metric: only its statistics are made, added to ref.npz; FID stays.
    both = analyze("--metric", "fid", "--metric", "fd_dinov2", *fid_weights, "--dinov2-weights",
                   detector_files["fd_dinov2"])  # fmt: skip
    assert made == [["fd_dinov2"]] and sorted(M.load_reference(out / "ref.npz")) == ["fd_dinov2", "fid"]
    assert {k: v["best"]["fid"] for k, v in both["ema"].items()} == fid
    dino = {k: v["best"]["fd_dinov2"] for k, v in both["ema"].items()}
    assert all(math.isfinite(v) and v > 0 for v in dino.values()) and dino["a"] != dino["g"]
    assert "| FID | FD_DINOv2 |" in (out / "ablation.md").read_text()
    # Other detector weights (another tiny Inception): the reference for them is made again.
    other = str(save_detector(tmp_path / "fid-other.safetensors", tiny_detector("fid", seed=7)))
    analyze("--metric", "fid", "--inception-weights", other)
    assert made == [["fd_dinov2"], ["fid"]]
    assert M.load_reference(out / "ref.npz")["fid"].detector["weights"] == "fid-other.safetensors"
    # --ref: a given reference is used as it is, and no ref.npz is made.
    shutil.copy(tmp_path / "out" / "ref.npz", tmp_path / "given.npz")
    given = analyze("--metric", "fd_dinov2", "--ref", str(tmp_path / "given.npz"), "--dinov2-weights",
                    detector_files["fd_dinov2"], outdir=tmp_path / "out2")  # fmt: skip
    assert {k: v["best"]["fd_dinov2"] for k, v in given["ema"].items()} == dino
    assert given["metrics"]["reference"] == str(tmp_path / "given.npz") and not (tmp_path / "out2" / "ref.npz").exists()
    assert len(made) == 2


def test_experiment_metric_bad_input(tmp_path, data, experiment_runs, detector_files):
    """Each problem with --metric and its options as one line naming the option or file, before any work."""
    from edm2 import metrics as M

    experiment = load_experiment()
    runs = copy_runs(experiment_runs, tmp_path / "runs")
    fid_weights = ["--inception-weights", detector_files["fid"]]

    def fails(*args: str) -> str:
        r = CliRunner().invoke(experiment.cli, list(args))
        assert r.exit_code != 0 and isinstance(r.exception, SystemExit) and "Traceback" not in r.output, r.output
        return r.output

    analyze = ["analyze", "--outdir", str(tmp_path / "out"), "--rundir", str(runs), "--seeds", "0-3"]
    assert "--metric" in (o := fails(*analyze, "--metric", "fid,xyz")) and "'fid,xyz'" in o
    assert "Invalid value for --seeds: given without --metric" in fails(*analyze)
    assert "--seeds" in (o := fails(*analyze[:-1], "0-x", "--metric", "fid", *fid_weights)) and "'0-x'" in o
    assert "at least 2 seeds" in fails(*analyze[:-1], "5", "--metric", "fid", *fid_weights)
    missing = str(tmp_path / "nothing.npz")
    assert "--ref" in (o := fails(*analyze, "--metric", "fid", "--ref", missing, *fid_weights)) and missing in o
    fid_only = str(tmp_path / "fid-only.npz")
    M.save_reference(fid_only, M.dataset_statistics(data, "fid", weights={"fid": detector_files["fid"]}, workers=0,
                                                    progress=False))  # fmt: skip
    o = fails(*analyze, "--metric", "fd_dinov2", "--ref", fid_only, "--dinov2-weights", detector_files["fd_dinov2"])
    assert "--ref" in o and "not for fd_dinov2" in o
    o = fails(*analyze, "--metric", "fid", "--inception-weights", str(tmp_path / "no.pth"))
    assert "--inception-weights: no such file" in o and "no.pth" in o
    o = fails(*analyze, "--metric", "fid", "--inception-weights", detector_files["fd_dinov2"])
    assert "holds a detector for 'fd_dinov2', not for 'fid'" in o
    wide = save_detector(tmp_path / "wide.safetensors", tiny_detector("fid").__class__(resolution=75, width=0.125))
    o = fails(*analyze, "--metric", "fid", "--ref", fid_only, "--inception-weights", str(wide))
    assert fid_only in o and "the reference was made with another detector" in o
    # The default reference needs the runs' training data.
    o = fails(*analyze, "--metric", "fid", *fid_weights)
    assert str(runs / "demo-data.zip") in o and "--ref" in o
    # No EMA snapshot to score: said, and the analysis without the scores is written.
    shutil.copy(data, runs / "demo-data.zip")
    for p in runs.glob("*/network-snapshot-*"):
        p.unlink()
    o = fails(*analyze, "--metric", "fid", *fid_weights)
    assert "--metric fid: no run in" in o and "wrote an EMA snapshot" in o
    assert "| A | " in (tmp_path / "out" / "ablation.md").read_text() and not (tmp_path / "out" / "ref.npz").exists()
    # `run` checks the options before it trains anything.
    o = fails("run", "--outdir", str(tmp_path / "new"), "--configs", "g", "--metric", "fid", "--inception-weights",
              str(tmp_path / "no.pth"))  # fmt: skip
    assert "--inception-weights" in o and not (tmp_path / "new").exists()


def test_experiment_metric_seeds_follow_the_setting(tmp_path, experiment_runs, detector_files):
    """--seeds' default: the setting's (few images on the CPU); analyze takes the setting run wrote and keeps it."""
    experiment = load_experiment()
    fid = detector_files["fid"]
    assert experiment.metric_plan("cpu", ("fid",), None, None, fid, None).seeds == list(range(256))
    plan = experiment.metric_plan("gpu", (" fid ,fd_dinov2", "fid"), None, None, fid, detector_files["fd_dinov2"])
    assert plan.seeds == list(range(2000)) and plan.metrics == ["fid", "fd_dinov2"] and plan.batch == 256
    assert experiment.metric_plan("gpu", (), None, None, None, None) is None
    assert experiment.previous_settings(str(tmp_path)) is None
    (tmp_path / "ablation.json").write_text(json.dumps({"settings": dict(experiment.SETTINGS["gpu"], setting="gpu")}))
    assert experiment.previous_settings(str(tmp_path))["setting"] == "gpu"
    runs = copy_runs(experiment_runs, tmp_path / "runs")
    r = CliRunner().invoke(experiment.cli, ["analyze", "--outdir", str(tmp_path), "--rundir", str(runs)])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "ablation.json").read_text())["settings"] == dict(experiment.SETTINGS["gpu"],
                                                                                      setting="gpu")  # fmt: skip


def test_traditional_ema_in_training_snapshots_and_tools(tmp_path, data):
    """Config A's traditional EMA in the loop: EDM's update after Adam (the ramp-up counting the images before the
    step), its snapshot network-snapshot-KIMG-ema with the settings in the header, loaded by generate.py, refused
    with its name by the post-hoc reconstruction."""
    from edm2.phema_reconstruct import SnapshotError, scan_snapshots
    from generate import main as generate_main
    from reconstruct_phema import main as reconstruct_main

    torch.set_num_threads(1)
    c = tiny_config("a", data, duration=48)
    c.checkpoint, c.ema_halflife, c.ema_rampup = 8, 16, 0.25  # a checkpoint every step; a memory of some steps
    run = tmp_path / "run"
    training_loop(str(run), c)
    (n48, p48), (n40, p40) = list_checkpoints(str(run))
    assert (n48, n40) == (48, 40)
    s48, s40 = load_state(p48), load_state(p40)
    beta = 0.5 ** (8 / min(16, 40 * 0.25))  # EDM: the half-life ramps up with the 40 images seen before the step
    moved = 0.0
    for key, net in s48["net"].items():
        expected = torch.lerp(s40["ema"][f"ema.{key}"], net, 1 - beta) if net.is_floating_point() else net
        torch.testing.assert_close(s48["ema"][f"ema.{key}"], expected, rtol=1e-6, atol=1e-7)
        moved = max(moved, float((s48["ema"][f"ema.{key}"] - net).abs().max()))
    assert moved > 1e-4  # the average lags the weights
    path = run / "network-snapshot-0000000-ema.safetensors"
    snapshot = load_model_file(path)
    assert snapshot.ema_std is None and snapshot.training_nimg == 48
    assert snapshot.meta["extra"]["ema"] == dict(kind="traditional", halflife_nimg=16.0, rampup_ratio=0.25,
                                                 count_before_step=True)  # fmt: skip
    r = CliRunner().invoke(generate_main, ["--net", str(path), "--seeds", "0-1", "--steps", "2", "--outdir",
                                           str(tmp_path / "images"), "--no-progress"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "images").rglob("*.png"))) == 2
    r = CliRunner().invoke(reconstruct_main, ["--indir", str(run), "--outdir", str(tmp_path / "phema"),
                                              "--outstd", "0.1"])  # fmt: skip
    assert r.exit_code != 0 and "network-snapshot-0000000-ema.safetensors" in r.output, r.output
    assert "traditional EMA snapshots" in r.output and "Traceback" not in r.output
    with pytest.raises(SnapshotError, match="a traditional EMA snapshot .half-life 16.0 images"):
        scan_snapshots([path])


def test_command_line_ema_options(tmp_path, data):
    """train_edm2.py: ablation-a/b take the preset's traditional EMA; --ema-halflife / --ema-rampup change it (or
    'none'), with one-line errors for bad values."""
    from train_edm2 import main as train_main

    tiny = json.dumps(dict(TINY, img_resolution=16))

    def dry_run(preset: str, *extra: str):
        args = ["--outdir", str(tmp_path / "x"), "--data", data, "--preset", preset, f"--network-kwargs={tiny}",
                "--precision", "fp32", "--dry-run", *extra]  # fmt: skip
        return CliRunner().invoke(train_main, args)

    def config(preset: str, *extra: str) -> dict:
        r = dry_run(preset, *extra)
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)

    a = config("ablation-a-demo")
    assert a["ema_halflife"] == 655 and a["ema_rampup"] == 0.05
    b = config("ablation-b-demo", "--ema-halflife", "4Ki", "--ema-rampup", "none")
    assert b["ema_halflife"] == 4096 and "ema_rampup" not in b
    power = config("ablation-a-demo", "--ema-halflife", "none", "--ema-stds", "0.1")
    assert "ema_halflife" not in power and "ema_rampup" not in power and power["ema_stds"] == [0.1]
    c = config("ablation-c-demo", "--ema-halflife", "1000", "--ema-rampup", "0.1")
    assert c["ema_halflife"] == 1000 and c["ema_rampup"] == 0.1
    for extra, message in [
        (["--ema-rampup", "2"], "--ema-rampup must lie in [0, 1]"),
        (["--ema-rampup", "x"], "expected a number or 'none', got 'x'"),
        (["--ema-halflife", "-5"], "--ema-halflife"),
        (["--ema-halflife", "none", "--ema-rampup", "0.1"], "--ema-rampup applies to the traditional EMA only"),
        (["--ema-stds", "0.1"], "the power-function EMA stds do not apply to a run with the traditional EMA"),
    ]:
        r = dry_run("ablation-a-demo", *extra)
        assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output, (extra, r.output)
    assert not (tmp_path / "x").exists()


def test_a_diverged_traditional_ema_is_named():
    """The check before saving names a non-finite traditional EMA (it has no std to print)."""
    from training.phema import TraditionalEMA
    from training.training_loop import TrainingError, check_finite

    net = Precond(**tiny_kwargs("a"))
    ema = TraditionalEMA(net, halflife_nimg=655, rampup_ratio=0.05)
    check_finite(net, ema, 64)
    with torch.no_grad():
        next(ema.ema.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(TrainingError, match=r"non-finite by 64 images \(1 tensor\(s\), e.g. ema traditional: "):
        check_finite(net, ema, 64)


def test_validation_loss_in_edm_weighting():
    """The experiment's EMA score: validation_loss_metric(learned_weighting=False) is the mean EDM loss (no u(sigma))
    with the metric's fixed sigma and noise, whatever the network's learned u(sigma)."""
    from edm2.phema_search import validation_loss_metric

    torch.manual_seed(0)
    net = Precond(**tiny_kwargs("g")).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a non-zero u(sigma) too
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    labels = torch.nn.functional.one_hot(torch.arange(6) % 10, 10).float()
    edm = validation_loss_metric(images, labels, P_mean=-0.8, P_std=1.6, seed=3, learned_weighting=False)(net)
    learned = validation_loss_metric(images, labels, P_mean=-0.8, P_std=1.6, seed=3)(net)
    gen = torch.Generator().manual_seed(3)
    loss_fn = EDM2Loss(P_mean=-0.8, P_std=1.6, learned_weighting=False)
    sigma = loss_fn.sample_sigma(6, generator=gen)
    noise = torch.randn(images.shape, generator=gen)
    with torch.no_grad():
        expected = loss_fn(net, images.float() / 127.5 - 1, labels, sigma=sigma, noise=noise).double().mean()
    assert edm == pytest.approx(float(expected), rel=1e-6) and edm != pytest.approx(learned, rel=1e-3)
