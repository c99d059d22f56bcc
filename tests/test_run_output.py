"""What a training run prints and keeps: plain lines without a terminal, the details and every line in RUN/log.txt
(appended on resume), the options in training_options.json, a progress bar only on a terminal; and a run directory
that resumes after being copied elsewhere (its dataset compared by identity, not by path)."""

import io
import json
import shutil
import sys

import torch
from click.testing import CliRunner

from training.demo_data import write_demo_dataset

TINY_NET = json.dumps(dict(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8],
                           channels_per_head=8, logvar_channels=8))


def train(outdir, data, duration, *extra, net=None):
    from train_edm2 import main

    net = json.dumps(dict(json.loads(TINY_NET), **(net or {})))
    args = ["--outdir", str(outdir), "--data", str(data), f"--network-kwargs={net}", f"--duration={duration}",
            "--batch=8", "--status=8", "--snapshot=0", "--checkpoint=8", "--workers=0", "--rampup=8",
            "--precision=fp32",
            "--no-instruments", *extra]
    return CliRunner().invoke(main, args)


def test_plain_output_log_file_and_options_file(tmp_path):
    data = write_demo_dataset(str(tmp_path / "d.zip"), num_images=8, resolution=16)
    run = tmp_path / "run"
    result = train(run, data, 16, "--preset=demo", net=dict(img_resolution=16))
    assert result.exit_code == 0, result.output
    out = result.output
    assert "\r" not in out and "\x1b" not in out  # no bar, no terminal control, when not a terminal
    status = [line for line in out.splitlines() if line.startswith("kimg ")]
    assert len(status) == 2 and "loss" in status[0]
    assert "training_options.json" in out and "log.txt" in out
    assert not any(line.strip() in ("{", "}") for line in out.splitlines())  # the configuration is not dumped
    assert json.loads((run / "training_options.json").read_text())["duration"] == 16
    log = (run / "log.txt").read_text()
    assert all(line in log for line in status)
    assert '"network": {' in log  # the details went to the file
    assert log.rstrip().splitlines()[-1].startswith("Done: 16 images")
    result = train(run, data, 24, "--preset=demo", net=dict(img_resolution=16))
    assert result.exit_code == 0, result.output
    log2 = (run / "log.txt").read_text()
    assert log2.startswith(log) and "Resuming from 16 images" in log2[len(log):]  # appended on resume


def test_progress_bar_only_on_a_terminal(monkeypatch):
    from training.progress import Progress, RunLog

    err, out = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    bar = Progress(enabled=True)
    log = RunLog(None, stream=out)
    log.progress = bar
    bar.start(0, 64)
    bar.update(32)
    bar.bar.refresh()  # tqdm redraws at most every 0.1 s on its own
    log("kimg 0.1 loss 1.0")
    assert "to kimg 0.1" in err.getvalue() and "32/64" in err.getvalue()
    assert bar.bar is None and out.getvalue() == "kimg 0.1 loss 1.0\n"  # the bar cleared before the line
    quiet = Progress()  # stderr is a StringIO here, not a terminal
    quiet.start(0, 64)
    assert quiet.bar is None
    assert Progress(rank=1, enabled=True).enabled is False


def test_copied_run_directory_resumes(tmp_path):
    data = write_demo_dataset(str(tmp_path / "a" / "d.zip"), num_images=8, resolution=16)
    assert train(tmp_path / "run", data, 8).exit_code == 0
    # Run and data moved to another disk: new paths, same dataset.
    shutil.copytree(tmp_path / "run", tmp_path / "b" / "run")
    shutil.copy(data, tmp_path / "b" / "d.zip")
    result = train(tmp_path / "b" / "run", tmp_path / "b" / "d.zip", 16)
    assert result.exit_code == 0, result.output
    assert "Resuming from 8 images" in result.output
    # A dataset that really differs is named.
    other = write_demo_dataset(str(tmp_path / "c" / "d.zip"), num_images=9, resolution=16)
    result = train(tmp_path / "b" / "run", other, 24)
    assert result.exit_code != 0 and "dataset: 8 files" in result.output and "9 files" in result.output


def test_copied_demo_run_directory_resumes(tmp_path):
    net = dict(img_resolution=32)
    assert train(tmp_path / "run", "demo", 8, "--preset=demo", net=net).exit_code == 0
    shutil.copytree(tmp_path / "run", tmp_path / "elsewhere")
    result = train(tmp_path / "elsewhere", "demo", 16, "--preset=demo", net=net)
    assert result.exit_code == 0, result.output
    assert "Resuming from 8 images" in result.output


def test_rerun_with_the_same_seed_is_bit_identical(tmp_path):
    """The README's claim: the same seed gives the same losses, checkpoint and snapshots, byte for byte."""
    from safetensors.torch import load_file

    data = write_demo_dataset(str(tmp_path / "d.zip"), num_images=8, resolution=16)
    for name in ("a", "b"):
        assert train(tmp_path / name, data, 16, "--snapshot=16").exit_code == 0
    stats = [[json.loads(line)["loss"] for line in open(tmp_path / name / "stats.jsonl")] for name in ("a", "b")]
    assert stats[0] == stats[1]
    files = sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    assert any(f.startswith("network-snapshot") for f in files) and any(f.startswith("training-state") for f in files)
    for f in files:
        x, y = load_file(tmp_path / "a" / f), load_file(tmp_path / "b" / f)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f


def test_bar_on_a_terminal_plain_lines_in_the_pipe(tmp_path):
    """stderr on a pseudo-terminal gets the bar; stdout, a pipe, gets only the plain lines."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import termios
    import threading

    from conftest import ROOT

    data = write_demo_dataset(str(tmp_path / "d.zip"), num_images=8, resolution=16)
    args = ["--outdir", str(tmp_path / "run"), "--data", data, f"--network-kwargs={TINY_NET}", "--duration=32",
            "--batch=8", "--status=32", "--snapshot=0", "--checkpoint=0", "--workers=0", "--no-instruments"]
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new pty is 0 columns wide
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_edm2.py"), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=follower, text=True)
    os.close(follower)
    chunks = []

    def drain():
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal's other end is closed: the process ended
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    out, _ = proc.communicate(timeout=600)
    reader.join(timeout=60)
    os.close(leader)
    terminal = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, out + terminal
    assert "to kimg 0.0" in terminal and "img/s" in terminal and "\r" in terminal  # the bar, redrawn in place
    assert "kimg 0.0" in out and "\r" not in out  # the status line in the pipe, plain



def test_status_zero_prints_one_status_line_at_the_end(tmp_path):
    data = write_demo_dataset(str(tmp_path / "d.zip"), num_images=8, resolution=16)
    result = train(tmp_path / "run", data, 24, "--preset=demo", "--status=0", net=dict(img_resolution=16))
    assert result.exit_code == 0, result.output
    assert "Training from 0 to 24 images; a status line at the end." in result.output
    assert [line.split()[1] for line in result.output.splitlines() if line.startswith("kimg ")] == ["0.0"]
