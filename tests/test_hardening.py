"""A hardened training run (issue 20), end to end on CPU: every error ends the run at once with one line (no hang
in the DataLoader workers), a diverged state is never saved, damaged checkpoints are set aside, dropout resumes
bit for bit, signals give honest exit codes, one writer per run directory, no debris after a kill.

Every run is a subprocess with a timeout, so that a hang fails its test instead of hanging the suite."""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile

import pytest
import torch
from safetensors.torch import load_file
from test_training import assert_states_equal, final_state, train_args

from conftest import ROOT
from torch_utils.state_io import load_state, verify_state
from training.demo_data import write_demo_dataset
from training.training_loop import list_checkpoints

TIMEOUT = 120  # seconds for one tiny run; far above what one takes, far below a CI job's limit
BAD_FILE = "00000/img00000017.png"  # not the first file, which the dataset reads up front


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_demo_dataset(str(tmp_path_factory.mktemp("data") / "shapes16.zip"), num_images=40, resolution=16)


DROPOUT = dict(dropout=0.1)  # every resumed run below has dropout: its masks must resume exactly too


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data):
    """An uninterrupted run of train_args' 320 images with dropout, to compare interrupted ones with."""
    outdir = tmp_path_factory.mktemp("straight") / "run"
    result = train(outdir, data, **DROPOUT)
    assert result.returncode == 0, result.stderr
    return outdir


@pytest.fixture
def folder(tmp_path, data):
    """The demo data as a folder, to damage single files in."""
    path = tmp_path / "folder"
    with zipfile.ZipFile(data) as z:
        z.extractall(path)
    return path


# One thread per run: on a shared 2-core machine, OpenMP threads that spin waiting for each other slow a tiny run
# tenfold. Every run of a test uses the same setting, so their results still compare bit for bit.
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def train(outdir, data, timeout=TIMEOUT, preexec_fn=None, **extra):
    return subprocess.run([sys.executable, str(ROOT / "train_edm2.py"), *train_args(outdir, data, **extra)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, preexec_fn=preexec_fn, env=ENV)


def start(outdir, data, **extra):
    return subprocess.Popen([sys.executable, str(ROOT / "train_edm2.py"), *train_args(outdir, data, **extra)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def wait_for(condition, proc=None, timeout=TIMEOUT):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            tail = proc.stderr.read()[-2000:]
            pytest.fail(f"the run ended (rc {proc.returncode}) before it could be interrupted: {tail}")
        time.sleep(0.01)
    pytest.fail("timed out")


def error_line(result):
    """The run's one error line: no traceback, exactly one 'Error: ' line."""
    out = result.stdout + result.stderr
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, out[-3000:]
    return errors[0]


def assert_no_temp_files(outdir):
    assert not [name for name in os.listdir(outdir) if name.endswith(".tmp")]


def stats_nimg(outdir):
    return [json.loads(line)["nimg"] for line in open(os.path.join(outdir, "stats.jsonl"))]


# --- 1. no hang: errors while DataLoader workers run --------------------------------------------------------


def test_corrupt_image_met_by_a_worker_ends_the_run_at_once(tmp_path, folder):
    """A PNG that is damaged after the run started (same size, so the resume is allowed), met by a worker process:
    the run ends with one line naming the file, the checkpoints before it intact."""
    outdir = tmp_path / "run"
    assert train(outdir, folder, duration=64).returncode == 0
    before = {path: open(path, "rb").read() for _, path in list_checkpoints(str(outdir))}
    bad = folder / BAD_FILE
    data = bad.read_bytes()
    bad.write_bytes(data[:40] + bytes(len(data) - 40))
    result = train(outdir, folder, duration=320, workers=2)
    assert result.returncode == 1
    line = error_line(result)
    assert BAD_FILE in line and str(folder) in line, line
    assert line.endswith("cannot read '00000/img00000017.png': not a decodable image"), line
    after = {path: open(path, "rb").read() for _, path in list_checkpoints(str(outdir))}
    assert after == before and len(after) == 2
    for path in after:
        verify_state(path)
    assert_no_temp_files(outdir)


def test_wrong_size_image_met_by_a_worker_ends_the_run_at_once(tmp_path, folder):
    import numpy as np
    import PIL.Image

    PIL.Image.fromarray(np.zeros([8, 8, 3], np.uint8)).save(folder / BAD_FILE)
    result = train(tmp_path / "run", folder, duration=320, workers=1)
    assert result.returncode == 1
    line = error_line(result)
    assert BAD_FILE in line and "has shape [3, 8, 8], expected [3, 16, 16]" in line, line


def _limit_file_size(nbytes):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))


def test_failed_checkpoint_write_ends_the_run_at_once(tmp_path, data):
    """A file-size limit (as `ulimit -f` sets) that a checkpoint exceeds, with DataLoader workers running: one line
    naming the run directory and the reason, exit 1, the earlier checkpoints intact, no temp file left."""
    outdir = tmp_path / "run"
    assert train(outdir, data, duration=64).returncode == 0
    (_, newest), *_ = list_checkpoints(str(outdir))
    size = os.path.getsize(newest)
    before = {path: open(path, "rb").read() for _, path in list_checkpoints(str(outdir))}
    # Below a checkpoint's size, above everything else the run writes before it (status lines, options).
    result = train(outdir, data, duration=320, snapshot=0, workers=2, preexec_fn=_limit_file_size(size // 2))
    assert result.returncode == 1
    line = error_line(result)
    assert "cannot write a training checkpoint into" in line and str(outdir) in line and "File too large" in line, line
    assert "the last good checkpoint is kept" in line
    assert "Resuming from 64 images" in result.stdout
    after = {path: open(path, "rb").read() for _, path in list_checkpoints(str(outdir))}
    assert after == before
    assert_no_temp_files(outdir)


def test_failed_snapshot_write_is_one_line(tmp_path, data):
    """Model files go through the same writer: their failure is the same kind of one-line error."""
    result = train(tmp_path / "run", data, duration=32, snapshot=16, checkpoint=0, preexec_fn=_limit_file_size(50_000))
    assert result.returncode == 1
    line = error_line(result)
    assert "cannot write EMA snapshots into" in line and "File too large" in line, line
    assert_no_temp_files(tmp_path / "run")


# --- 2. non-finite runs are stopped and never saved ---------------------------------------------------------


def assert_all_finite(outdir):
    for name in os.listdir(outdir):
        path = os.path.join(outdir, name)
        if name.startswith("training-state-") and name.endswith(".safetensors"):
            tensors = [t for t in _tensors(load_state(path)) if t.is_floating_point()]
        elif name.startswith("network-snapshot-"):
            tensors = [t for t in load_file(path).values() if t.is_floating_point()]
        else:
            continue
        assert tensors and all(torch.isfinite(t).all() for t in tensors), name


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _tensors(v)


def test_diverged_weights_are_never_saved(tmp_path, data):
    """A huge but finite --lr: the weights overflow within a few steps. The run stops non-zero at the first save
    that would hold them; every file it wrote holds finite tensors, and its last good checkpoint is kept."""
    outdir = tmp_path / "run"
    result = train(outdir, data, duration=640, lr=1e30, rampup=16, status=16, snapshot=16, checkpoint=16)
    assert result.returncode == 1
    line = error_line(result)
    assert "became non-finite" in line and "the last good checkpoint is kept" in line, line
    assert any(not math.isfinite(n) for n in (json.loads(s)["loss"] for s in open(outdir / "stats.jsonl")))
    checkpoints = list_checkpoints(str(outdir))
    assert checkpoints, "no good checkpoint was kept"
    assert_all_finite(outdir)
    stopped_at = int(line.split("non-finite by ")[1].split()[0])
    assert checkpoints[0][0] < stopped_at


def test_nonfinite_loss_stops_after_max_status_intervals(tmp_path, data):
    """With no save due, the loss itself stops the run after --max-nonfinite-status intervals in a row."""
    outdir = tmp_path / "run"
    result = train(outdir, data, duration=6400, lr=1e30, rampup=16, status=16, snapshot=0, checkpoint=0,
                   max_nonfinite_status=2)
    assert result.returncode == 1
    line = error_line(result)
    assert "non-finite for 2 status interval(s) in a row" in line and "stopped without saving" in line, line
    losses = [json.loads(s)["loss"] for s in open(outdir / "stats.jsonl")]
    assert [math.isfinite(x) for x in losses[-3:]] == [True, False, False], losses
    assert list_checkpoints(str(outdir)) == []
    assert not [n for n in os.listdir(outdir) if n.startswith("network-snapshot-")]


@pytest.mark.parametrize("option", ["--lr=nan", "--lr=inf", "--lr=1e38", "--P_mean=nan", "--dropout=nan"])
def test_nonfinite_options_are_refused_before_training(tmp_path, data, option):
    from click.testing import CliRunner

    from train_edm2 import main

    r = CliRunner().invoke(main, [*train_args(tmp_path / "run", data), option, "--dry-run"])
    assert r.exit_code != 0 and "Traceback" not in r.output, r.output
    assert option.split("=")[0].lstrip("-").replace("_", "") in r.output.replace("_", "").replace("-", "")
    assert not (tmp_path / "run" / "training_options.json").exists()


# --- 3. damaged checkpoints are set aside, progress is kept ------------------------------------------------


def _flip_body_byte(path):
    import struct

    raw = bytearray(open(path, "rb").read())
    (n,) = struct.unpack("<Q", raw[:8])
    raw[8 + n + (len(raw) - 8 - n) // 2] ^= 0x10  # the middle of the tensor data, past the header
    open(path, "wb").write(bytes(raw))


def test_two_damaged_newest_checkpoints_resume_from_an_older_valid_one(tmp_path, data, straight):
    """The newest checkpoint has a flipped byte (a checksum mismatch), the one before is truncated: both are
    renamed *.damaged and reported, the run resumes from the older valid one, and its new checkpoints (with lower
    image counts than the damaged ones had) are kept. The result equals an uninterrupted run."""
    outdir = tmp_path / "run"
    assert train(outdir, data, duration=32, **DROPOUT).returncode == 0
    old = outdir / "training-state-000000000032.safetensors"
    shutil.copy(old, tmp_path / "old")
    assert train(outdir, data, duration=96, **DROPOUT).returncode == 0
    assert [n for n, _ in list_checkpoints(str(outdir))] == [96, 64]
    shutil.copy(tmp_path / "old", old)  # an older checkpoint, as kept with more retention
    _flip_body_byte(outdir / "training-state-000000000096.safetensors")
    with open(outdir / "training-state-000000000064.safetensors", "r+b") as f:
        f.truncate(1000)

    result = train(outdir, data, **DROPOUT)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if "skipping damaged checkpoint" in line]
    assert len(warnings) == 2, result.stdout
    assert "checksum mismatch" in warnings[0] and "training-state-000000000096.safetensors.damaged" in warnings[0]
    assert "training-state-000000000064.safetensors.damaged" in warnings[1]
    assert "Resuming from 32 images" in result.stdout
    assert (outdir / "training-state-000000000096.safetensors.damaged").exists()
    assert (outdir / "training-state-000000000064.safetensors.damaged").exists()
    assert [n for n, _ in list_checkpoints(str(outdir))] == [320, 288]
    assert_states_equal(final_state(outdir)[1], final_state(straight)[1])


def test_all_checkpoints_damaged_restarts_from_zero_and_keeps_progress(tmp_path, data):
    outdir = tmp_path / "run"
    assert train(outdir, data, duration=64).returncode == 0
    shutil.copy(list_checkpoints(str(outdir))[0][1], tmp_path / "reference.safetensors")
    reference = load_state(tmp_path / "reference.safetensors")  # loaded tensors map the file: copy it first
    for _, path in list_checkpoints(str(outdir)):
        _flip_body_byte(path)
    result = train(outdir, data, duration=64)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("skipping damaged checkpoint") == 2 and "Resuming" not in result.stdout
    assert [n for n, _ in list_checkpoints(str(outdir))] == [64, 32]  # the new ones, not deleted by retention
    assert len([n for n in os.listdir(outdir) if n.endswith(".damaged")]) == 2
    assert_states_equal(final_state(outdir)[1], reference)


# --- 4. dropout resumes bit for bit ------------------------------------------------------------------------


def test_dropout_run_resumed_after_a_finished_leg_is_bit_exact(tmp_path, data, straight):
    """Dropout draws from the global CPU generator, which the checkpoint restores: nothing after the restore
    (the DataLoader's base seed once did) may draw from it, or the resumed run's masks differ."""
    outdir = tmp_path / "run"
    assert train(outdir, data, duration=160, **DROPOUT).returncode == 0
    second = train(outdir, data, **DROPOUT)
    assert second.returncode == 0 and "Resuming from 160 images" in second.stdout, second.stderr
    a, b = final_state(straight)[1], final_state(outdir)[1]
    assert_states_equal(a, b)
    assert torch.equal(a["rng"][0]["cpu"], b["rng"][0]["cpu"])
    assert b["config"]["network"]["dropout"] == 0.1


def test_dropout_run_stopped_by_sigterm_resumes_bit_exact(tmp_path, data, straight):
    """The issue's probe: SIGTERM after a checkpoint, with DataLoader workers, then the same command again."""
    outdir = tmp_path / "run"
    proc = start(outdir, data, workers=2, **DROPOUT)
    wait_for(lambda: list_checkpoints(str(outdir)), proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=TIMEOUT)
    if proc.returncode == 0:
        pytest.fail("the run finished before SIGTERM reached it")
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Done" not in out
    stopped = int(out.split("Stopped by signal at ")[1].split()[0])
    assert stopped < 320 and max(n for n, _ in list_checkpoints(str(outdir))) == stopped
    resumed = train(outdir, data, workers=2, **DROPOUT)
    assert resumed.returncode == 0 and f"Resuming from {stopped} images" in resumed.stdout, resumed.stderr
    assert_states_equal(final_state(outdir)[1], final_state(straight)[1])
    for name in os.listdir(straight):
        if name.startswith("network-snapshot-"):
            a, b = load_file(straight / name), load_file(outdir / name)
            assert all(torch.equal(a[k], b[k]) for k in a), name


# --- 6. one writer per run directory -----------------------------------------------------------------------


def test_second_process_on_a_run_directory_is_refused_naming_the_holder(tmp_path, data):
    outdir = tmp_path / "run"
    first = start(outdir, data, duration=1_000_000, checkpoint=0, snapshot=0)
    try:
        wait_for(lambda: (outdir / "stats.jsonl").exists(), first)  # it holds the lock and trains
        second = train(outdir, data, duration=1_000_000, checkpoint=0, snapshot=0, timeout=60)
        assert second.returncode == 1
        line = error_line(second)
        assert "is in use by another training process" in line, line
        assert f"pid {first.pid} on {socket.gethostname()}" in line, line
        assert first.poll() is None  # the first one goes on
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=TIMEOUT)
    assert first.returncode == 128 + signal.SIGTERM


def test_lock_of_a_killed_process_never_blocks_and_its_debris_is_cleaned(tmp_path, data, straight):
    """kill -9 leaves the lock file (naming the dead process), the temp files of a save it was in, and status lines
    past its last checkpoint. The same command resumes: temp files removed, stats.jsonl without a duplicate."""
    outdir = tmp_path / "run"
    proc = start(outdir, data, **DROPOUT)
    wait_for(lambda: (outdir / "stats.jsonl").exists() and list_checkpoints(str(outdir)), proc)
    proc.kill()
    proc.communicate(timeout=TIMEOUT)
    assert f"pid {proc.pid} on" in (outdir / ".lock").read_text()
    checkpoint = max(n for n, _ in list_checkpoints(str(outdir)))
    assert checkpoint < 320
    # What a kill in the middle of a save leaves: temp files of both writers and status lines past the checkpoint,
    # the last one cut short.
    (outdir / ".training-state-000000000320.safetensors.abc123.tmp").write_bytes(bytes(4096))
    (outdir / ".network-snapshot-0000000-0.050.safetensors.def456.tmp").write_bytes(bytes(100))
    with open(outdir / "stats.jsonl", "a") as f:
        for nimg in range(checkpoint + 16, 320, 16):
            f.write(json.dumps(dict(nimg=nimg, loss=1.0)) + "\n")
        f.write('{"nimg": 3')

    resumed = train(outdir, data, **DROPOUT)
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming from {checkpoint} images" in resumed.stdout, resumed.stdout
    # The planted files, and any the kill itself left if it hit a save.
    removed = next(line for line in resumed.stdout.splitlines() if line.startswith("Removed "))
    assert ".training-state-000000000320.safetensors.abc123.tmp" in removed
    assert ".network-snapshot-0000000-0.050.safetensors.def456.tmp" in removed
    assert_no_temp_files(outdir)
    nimgs = stats_nimg(outdir)
    assert nimgs == sorted(set(nimgs)) and nimgs == stats_nimg(straight)
    assert_states_equal(final_state(outdir)[1], final_state(straight)[1])


def test_resume_compares_the_checkpoint_configuration_without_options_file(tmp_path, data):
    outdir = tmp_path / "run"
    assert train(outdir, data, duration=32).returncode == 0
    os.remove(outdir / "training_options.json")
    result = train(outdir, data, duration=64, lr=0.05)
    assert result.returncode == 1
    line = error_line(result)
    assert "different configuration" in line and "ref_lr" in line and "training-state-000000000032" in line, line
    assert not (outdir / "training_options.json").exists()


# --- 7. workers die with their parent ----------------------------------------------------------------------


def _children(pid):
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def _alive(pid):
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent (here init) has yet to reap it


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and PR_SET_PDEATHSIG")
def test_dataloader_workers_die_with_a_killed_parent(tmp_path, data):
    outdir = tmp_path / "run"
    proc = start(outdir, data, duration=1_000_000, checkpoint=0, snapshot=0, workers=2)
    try:
        wait_for(lambda: (outdir / "stats.jsonl").exists(), proc)
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
    finally:
        proc.kill()
        proc.communicate(timeout=TIMEOUT)
    wait_for(lambda: not any(_alive(pid) for pid in workers), timeout=60)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_worker_init_asks_for_sigkill_when_the_parent_dies():
    code = (
        "import ctypes, signal\n"
        "from training.training_loop import _init_worker\n"
        "_init_worker(0)\n"
        "sig = ctypes.c_int()\n"
        "ctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0)  # PR_GET_PDEATHSIG\n"
        "ignored = [signal.getsignal(s) is signal.SIG_IGN for s in (signal.SIGINT, signal.SIGTERM)]\n"
        "print(sig.value, *ignored)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, env=ENV)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == [str(int(signal.SIGKILL)), "True", "True"]


def test_adam_betas_outside_their_range_are_refused():
    from training.config import TrainingConfig
    from training.training_loop import TrainingError

    for betas in ([1.0, 0.99], [0.9, -0.1]):
        with pytest.raises(TrainingError, match=r"--betas must lie in \[0, 1\)"):
            TrainingConfig(data="x", betas=betas).validate(1)


def test_nonfinite_optimizer_moments_count_as_a_diverged_state():
    """An overflowed second moment freezes its weight for good while the weight stays finite: never saved either."""
    from training.training_loop import TrainingError, check_finite

    net = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(net.parameters())
    net(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    check_finite(net, None, 16, optimizer)
    optimizer.state[net.bias]["exp_avg_sq"][0] = float("inf")
    expected = r"non-finite by 16 images \(1 tensor\(s\), e\.g\. optimizer exp_avg_sq: bias\)"
    with pytest.raises(TrainingError, match=expected):
        check_finite(net, None, 16, optimizer)
