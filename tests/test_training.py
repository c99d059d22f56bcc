"""Training end to end on CPU: exact resume after a kill, SIGTERM checkpoints, 1 vs 2 processes, bad input."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

from conftest import ROOT
from torch_utils.state_io import load_state
from training.demo_data import write_demo_dataset
from training.training_loop import list_checkpoints

TINY_NET = json.dumps(dict(
    model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], channels_per_head=8, logvar_channels=8
))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_demo_dataset(str(tmp_path_factory.mktemp("data") / "shapes16.zip"), num_images=40, resolution=16)


def train_args(outdir, data, duration=320, batch=16, **extra):
    args = dict(
        outdir=outdir, data=data, duration=duration, batch=batch, lr=0.01, rampup=64, decay=10, status=64,
        snapshot=96, checkpoint=32, workers=0, seed=3, precision="fp32",
    )
    args.update(extra)
    out = [f"--network-kwargs={TINY_NET}"]
    for k, v in args.items():
        out.append(f"--{k.replace('_', '-')}={v}")
    return out


def run_cli(args, **kwargs):
    return subprocess.run(
        [sys.executable, str(ROOT / "train_edm2.py"), *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
        **kwargs,
    )


def final_state(outdir):
    (nimg, path), *_ = list_checkpoints(str(outdir))
    return nimg, load_state(path)


def assert_states_equal(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for key in ("net", "ema"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.allclose(a[key][k], b[key][k], rtol=0, atol=atol), (
                key, k, (a[key][k] - b[key][k]).abs().max()
            )
    oa, ob = a["optimizer"]["state"], b["optimizer"]["state"]
    assert oa.keys() == ob.keys()
    for i in oa:
        for name in oa[i]:
            # Adam moments of a scalar gain reach hundreds: compare them relatively.
            assert torch.allclose(oa[i][name], ob[i][name], rtol=atol, atol=atol), (i, name)


def test_killed_and_resumed_run_equals_straight_run(tmp_path, data):
    straight = run_cli(train_args(tmp_path / "straight", data))
    assert straight.returncode == 0, straight.stderr
    nimg, reference = final_state(tmp_path / "straight")
    assert nimg == 320

    outdir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_edm2.py"), *train_args(outdir, data)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        done = [n for n, _ in list_checkpoints(str(outdir))]
        if done and 64 <= max(done) < 320:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed half-way"
    killed_at = max(n for n, _ in list_checkpoints(str(outdir)))
    assert killed_at < 320

    resumed = run_cli(train_args(outdir, data))
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming from {killed_at} images" in resumed.stdout
    nimg, state = final_state(outdir)
    assert nimg == 320
    assert_states_equal(state, reference)  # bit for bit
    # The EMA snapshots of both runs agree too.
    for name in sorted(os.listdir(tmp_path / "straight")):
        if name.startswith("network-snapshot-0000000"):
            from safetensors.torch import load_file

            a, b = load_file(tmp_path / "straight" / name), load_file(outdir / name)
            assert all(torch.equal(a[k], b[k]) for k in a), name
    stats = [json.loads(line) for line in open(outdir / "stats.jsonl")]
    assert stats[-1]["nimg"] == 320 and all(s["loss"] > 0 for s in stats)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_checkpoints_and_stops(tmp_path, data, sig):
    """SIGTERM (a scheduler) or SIGINT to the whole process group (Ctrl-C), DataLoader workers included."""
    outdir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_edm2.py"),
                             *train_args(outdir, data, duration=100000, checkpoint=0, workers=2)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (outdir / "stats.jsonl").exists():
        time.sleep(0.05)
    os.killpg(proc.pid, sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err  # as a shell reports a signalled program: 130 for SIGINT, 143 for SIGTERM
    assert "Stopped by signal" in out and "Run the same command to resume" in out and "Done" not in out
    (nimg, _path), = list_checkpoints(str(outdir))  # checkpoint=0: the only checkpoint is the signal's
    assert 0 < nimg < 100000
    assert f"Stopped by signal at {nimg} images; the checkpoint is saved." in out


def test_damaged_newest_checkpoint_falls_back_to_previous(tmp_path, data):
    outdir = tmp_path / "run"
    assert run_cli(train_args(outdir, data, duration=96)).returncode == 0
    (newest, path), (previous, _) = list_checkpoints(str(outdir))[:2]
    with open(path, "r+b") as f:
        f.truncate(100)
    result = run_cli(train_args(outdir, data, duration=128))
    assert result.returncode == 0, result.stderr
    assert "skipping damaged checkpoint" in result.stdout and os.path.basename(path) in result.stdout
    assert f"Resuming from {previous} images" in result.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("grad_sync,batch_gpu,layout", [("ddp", 4, "4 x 2 x 1"), ("flat", 2, "2 x 2 x 2")])
def test_two_processes_equal_one_process(tmp_path, data, grad_sync, batch_gpu, layout):
    one = run_cli(train_args(tmp_path / "one", data, duration=128, batch=8))
    assert one.returncode == 0, one.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "--master_addr=127.0.0.1", str(ROOT / "train_edm2.py"),
           *train_args(tmp_path / "two", data, duration=128, batch=8, grad_sync=grad_sync, batch_gpu=batch_gpu)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert f"batch 8 = {layout} round(s)" in two.stdout
    _, a = final_state(tmp_path / "one")
    _, b = final_state(tmp_path / "two")
    assert_states_equal(a, b, atol=1e-5)


def test_accumulation_rounds_equal_one_round(tmp_path, data):
    one = run_cli(train_args(tmp_path / "one", data, duration=64, batch=8))
    acc = run_cli(train_args(tmp_path / "acc", data, duration=64, batch=8, batch_gpu=2))
    assert one.returncode == 0 and acc.returncode == 0, acc.stderr
    assert "batch 8 = 2 x 1 x 4 round(s)" in acc.stdout
    assert_states_equal(final_state(tmp_path / "one")[1], final_state(tmp_path / "acc")[1], atol=1e-5)


def test_fast_kernels_train_like_the_reference_and_resume_across_kernels(tmp_path, data):
    """kernels 'fast' (on the CPU: fused attention) for 32 images, then 'reference' (the speed options may change on
    resume): the same training as the reference all along, within float rounding."""
    from training.training_loop import training_loop

    dry = invoke(train_args(tmp_path / "x", data, duration=64, batch=8, checkpoint=32) + ["--dry-run"])
    assert dry.exit_code == 0, dry.output
    config = json.loads(dry.output[dry.output.index("{"):])  # after the notice about the missing --preset
    training_loop(str(tmp_path / "ref"), dict(config, kernels="reference"))
    training_loop(str(tmp_path / "mix"), dict(config, duration=32, kernels="fast"))
    training_loop(str(tmp_path / "mix"), dict(config, kernels="reference"))
    assert "Resuming from 32 images" in open(tmp_path / "mix" / "log.txt").read()
    assert_states_equal(final_state(tmp_path / "ref")[1], final_state(tmp_path / "mix")[1], atol=1e-5)


# --- command line and bad input (in process) -------------------------------------------------------------


def invoke(args):
    from train_edm2 import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_dry_run_prints_resolved_config(tmp_path, data):
    # The dry run checks the data against the network too: the preset's 64x64x4, 1000 classes made to fit.
    fit = json.dumps(dict(json.loads(TINY_NET), img_resolution=16, img_channels=3, label_dim=10))
    extra = ["--dry-run", "--preset=edm2-img512-s", "--ema-stds=0.05,0.07", f"--network-kwargs={fit}"]
    result = invoke(train_args(tmp_path / "x", data) + extra)
    assert result.exit_code == 0, result.output
    config = json.loads(result.output)
    # The preset's network, with --network-kwargs on top.
    assert config["network"]["img_channels"] == 3 and config["network"]["label_dim"] == 10
    assert config["network"]["dropout"] == 0.0 and config["network"]["img_resolution"] == 16
    assert config["network"]["model_channels"] == 8 and config["network"]["channel_mult"] == [1, 2]
    assert config["duration"] == 320 and config["batch"] == 16  # the options override the preset
    assert config["lr"]["ref_lr"] == 0.01 and config["ema_stds"] == [0.05, 0.07]
    assert config["kernels"] is None and config["grad_sync"] is None  # resolved for the device by the loop
    assert config["network"]["precision"] == "fp32"  # --precision fp32 (train_args)
    assert not (tmp_path / "x" / "training_options.json").exists()
    result = invoke(train_args(tmp_path / "x", data, precision="auto") + ["--dry-run", "--kernels=reference"])
    assert result.exit_code == 0 and json.loads(result.stdout)["kernels"] == "reference"
    # auto: fp16 on CUDA, fp32 elsewhere, resolved where the device is chosen
    assert json.loads(result.stdout)["network"]["precision"] == ("fp16" if torch.cuda.is_available() else "fp32")
    for removed in ("--ddp-overlap", "--channels-last", "--fused-step", "--batched-weights", "--fast-dropout"):
        result = invoke(train_args(tmp_path / "x", data) + ["--dry-run", removed])
        assert result.exit_code == 2 and "No such option" in result.output


@pytest.mark.parametrize(
    "value,expected", [("4096", 4096), ("128Ki", 131072), ("8Mi", 8 << 20), ("2Gi", 2 << 30), ("1.5Ki", 1536)]
)
def test_count_suffixes(value, expected):
    from train_edm2 import parse_nimg

    assert parse_nimg(value) == expected


def test_bad_inputs_are_named(tmp_path, data):
    r = invoke(train_args(tmp_path / "a", str(tmp_path / "missing.zip")))
    assert r.exit_code != 0 and "--data" in r.output and "missing.zip" in r.output
    r = invoke(train_args(tmp_path / "a", data, batch=10, batch_gpu=4))
    assert r.exit_code != 0 and "--batch 10 must be divisible by --batch-gpu 4" in r.output
    r = invoke(train_args(tmp_path / "a", data, duration="12Xi"))
    assert r.exit_code != 0 and "--duration" in r.output
    r = invoke(train_args(tmp_path / "a", data) + ["--preset=edm2-img64-s"])
    assert r.exit_code != 0 and "img_resolution 16" in r.output and "network expects 64" in r.output
    r = invoke(train_args(tmp_path / "a", data) + ["--preset=edm2-img1024-s"])
    assert r.exit_code != 0 and "unknown preset" in r.output
    r = invoke(train_args(tmp_path / "a", data) + ["--network-kwargs=[1]"])
    assert r.exit_code != 0 and "--network-kwargs" in r.output


def test_outdir_with_another_configuration_is_refused(tmp_path, data):
    outdir = tmp_path / "run"
    assert invoke(train_args(outdir, data, duration=16)).exit_code == 0
    r = invoke(train_args(outdir, data, duration=32, lr=0.02))
    assert r.exit_code != 0 and "different configuration" in r.output and "ref_lr" in r.output
    r = invoke(train_args(outdir, data, duration=32))  # a longer duration is a continuation
    assert r.exit_code == 0, r.output
    assert "Resuming from 16 images" in r.output


def test_labels_that_do_not_match_files(tmp_path):
    import zipfile

    path = tmp_path / "bad.zip"
    write_demo_dataset(str(tmp_path / "good.zip"), num_images=4, resolution=16)
    with zipfile.ZipFile(tmp_path / "good.zip") as src, zipfile.ZipFile(path, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name == "dataset.json":
                meta = json.loads(data)
                meta["labels"] = meta["labels"][:-1]
                data = json.dumps(meta).encode()
            dst.writestr(name, data)
    r = invoke(train_args(tmp_path / "a", str(path)))
    assert r.exit_code != 0 and "dataset.json" in r.output and "no label for 1 file" in r.output


def test_loss_plot(tmp_path, data):
    from training.plot_stats import main as plot_main

    outdir = tmp_path / "run"
    assert invoke(train_args(outdir, data, duration=64, status=16, snapshot=64)).exit_code == 0
    assert (outdir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # written with the snapshots
    r = CliRunner().invoke(plot_main, [str(outdir), str(outdir), "--out", str(tmp_path / "both.png")])
    assert r.exit_code == 0 and (tmp_path / "both.png").stat().st_size > 1000
    r = CliRunner().invoke(plot_main, [str(tmp_path / "nothing")])
    assert r.exit_code != 0 and "stats.jsonl" in r.output


def test_loss_plot_bad_input_is_one_line(tmp_path):
    """stats.jsonl with a line that is no JSON, without any status line, or with its last line cut short by a kill;
    an --out that cannot be written: one line each (once JSONDecodeError / OSError tracebacks, or an empty plot)."""
    from training.plot_stats import main as plot_main

    def error(*args):
        r = CliRunner().invoke(plot_main, [str(a) for a in args])
        assert r.exit_code != 0 and isinstance(r.exception, SystemExit), r.output
        lines = [line for line in r.output.splitlines() if line.startswith("Error")]
        assert len(lines) == 1 and "Traceback" not in r.output, r.output
        return lines[0]

    run = tmp_path / "run"
    run.mkdir()
    good = [json.dumps(dict(nimg=16 * i, kimg=0.016 * i, loss=1.0 / i, lr=0.01)) for i in range(1, 4)]
    (run / "stats.jsonl").write_text("\n".join([good[0], "garbage", *good[1:]]) + "\n")
    assert "stats.jsonl: line 2 is not a status entry (a JSON object): 'garbage'" in error(run)
    (run / "stats.jsonl").write_text("")
    assert "stats.jsonl: no status line with a loss yet" in error(run)
    (run / "stats.jsonl").write_text("\n".join(good) + '\n{"nimg": 6')  # a kill in the middle of a line
    (tmp_path / "afile").write_bytes(b"")
    assert "Invalid value for --out: cannot write" in error(run, "--out", tmp_path / "afile" / "x.png")
    assert "Invalid value for --out: cannot write" in error(run, "--out", tmp_path)  # a folder in its place
    r = CliRunner().invoke(plot_main, [str(run)])
    assert r.exit_code == 0 and (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", r.output
    assert sorted(os.listdir(tmp_path)) == ["afile", "run"] and sorted(os.listdir(run)) == ["loss.png", "stats.jsonl"]


def test_out_of_memory_is_one_line_naming_batch_gpu(tmp_path, data, monkeypatch):
    """A GPU that runs out of memory: one line that names --batch-gpu and says how to go on; the run directory's lock
    is released (a rerun may start at once)."""
    import training.training_loop as loop

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(loop, "_train", oom)
    r = invoke(train_args(tmp_path / "run", data, batch=8, batch_gpu=4))
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "Error: out of memory with --batch-gpu 4 (images per GPU and accumulation round); give a smaller " \
           "--batch-gpu" in r.output and "resume from the last checkpoint" in r.output  # fmt: skip
    monkeypatch.undo()
    assert invoke(train_args(tmp_path / "run", data, duration=16, batch=8, batch_gpu=4)).exit_code == 0
