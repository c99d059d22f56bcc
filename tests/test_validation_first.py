"""Every option, the dataset and the network arguments are checked before anything is written: a rejected command
exits non-zero with a one-line error naming the option, no traceback, and leaves no file or folder behind."""

import json
import os
import sys
import tempfile
import zipfile

import pytest
from click.testing import CliRunner

from training.demo_data import write_demo_dataset

TINY_NET = json.dumps(dict(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8],
                           channels_per_head=8, logvar_channels=8))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    labelled = write_demo_dataset(str(folder / "shapes.zip"), num_images=8, resolution=16)
    unlabelled = folder / "nolabels.zip"
    with zipfile.ZipFile(labelled) as src, zipfile.ZipFile(unlabelled, "w") as dst:
        for name in src.namelist():
            if name != "dataset.json":
                dst.writestr(name, src.read(name))
    return dict(labelled=labelled, unlabelled=str(unlabelled))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty folder as the working directory, with Python's temp folder inside it, so that a leftover anywhere
    (run directory, demo data, a temp file) shows up in its listing."""
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def listing(folder):
    paths = (os.path.relpath(os.path.join(d, n), folder) for d, dirs, files in os.walk(folder) for n in dirs + files)
    return sorted(p for p in paths if not p.startswith("tmp/torchinductor_"))  # torch's own compile cache


def assert_rejected(result, *words):
    assert result.exit_code not in (0, None), result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not an uncaught exception
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for word in words:
        assert word in errors[0], (word, result.output)


TRAIN_REJECTED = [
    (["--batch=31", "--batch-gpu=7"], ["--batch 31", "--batch-gpu 7"]),
    (["--batch=0"], ["--batch"]),
    (["--duration=12Xi"], ["--duration"]),
    (["--channels=-8"], ["--channels"]),
    (["--network-kwargs={\"model_channels\": -8}"], ["model_channels", "-8", "--network-kwargs"]),
    (["--network-kwargs={\"channel_mult\": []}"], ["channel_mult"]),
    (["--network-kwargs={\"model_channels\": 8.5}"], ["model_channels", "8.5"]),
    (["--network-kwargs=[1]"], ["--network-kwargs"]),
    (["--dropout=2"], ["--dropout"]),
    (["--lr=nan"], ["--lr"]),
    (["--preset=nope"], ["--preset"]),
    (["--preset=edm2-img64-s"], ["img_resolution 16", "expects 64"]),
    (["--cond=True", "--uncond"], ["--uncond"]),
    (["--cond=maybe"], ["--cond"]),
    (["--skip-scaling=none", "--kappa=0.5"], ["--kappa"]),
    # The power-function EMAs' stds and the seed, checked before the run starts (they once raised mid-start).
    (["--ema-stds=0.5"], ["--ema-stds", "0.5", "(0, 0.30028)"]),
    (["--ema-stds=0"], ["--ema-stds", "(0, 0.30028)"]),
    (["--ema-stds=0.05,0.05"], ["--ema-stds must be distinct"]),
    (["--ema-stds=,"], ["--ema-stds must name at least one"]),
    (["--seed=99999999999999999999"], ["--seed", "[0, 2**32)"]),
    (["--seed=-1"], ["--seed", "[0, 2**32)"]),
    # Attention heads that do not tile a level's channels (a reshape error in the first step once).
    (["--network-kwargs=" + TINY_NET.replace('"channels_per_head": 8', '"channels_per_head": 6')],
     ["channels_per_head 6", "16 channels"]),
]


@pytest.mark.parametrize("args,words", TRAIN_REJECTED, ids=[" ".join(a) for a, _ in TRAIN_REJECTED])
def test_train_rejects_before_writing(workdir, data, args, words):
    from train_edm2 import main

    base = ["--outdir", "run", "--data", data["labelled"], f"--network-kwargs={TINY_NET}", "--workers=0"]
    result = CliRunner().invoke(main, base + args)
    assert_rejected(result, *words)
    assert listing(workdir) == ["tmp"]


def test_missing_labels_and_missing_data_rejected_before_writing(workdir, data):
    from train_edm2 import main

    base = ["--outdir", "run", f"--network-kwargs={TINY_NET}"]
    assert_rejected(CliRunner().invoke(main, base + ["--data", data["unlabelled"]]), "--cond needs labels", "--uncond")
    assert_rejected(CliRunner().invoke(main, base + ["--data", "missing.zip"]), "--data", "missing.zip")
    assert listing(workdir) == ["tmp"]


def test_demo_data_is_written_only_once_everything_passed(workdir):
    from train_edm2 import main

    # A batch that does not divide, a negative width and a dry run: neither the run directory nor the demo data.
    demo = ["--outdir", "run", "--data", "demo", "--preset", "demo"]
    result = CliRunner().invoke(main, demo + ["--batch=31", "--batch-gpu=7"])
    assert_rejected(result, "--batch 31")
    result = CliRunner().invoke(main, demo + ["--network-kwargs={\"model_channels\": -8}"])
    assert_rejected(result, "model_channels")
    assert listing(workdir) == ["tmp"]
    result = CliRunner().invoke(main, demo + ["--dry-run"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["data"] == os.path.abspath("run/demo-data.zip")
    assert listing(workdir) == ["tmp"]  # the demo data checked in a temp folder, then removed


DATASET_TOOL_REJECTED = [
    # A folder --dest must be new or empty (as the official tool); "folder" holds a file here.
    (["convert", "--source", "{data}", "--dest", "folder", "--resolution", "16"], ["--dest", "empty folder"]),
    (["encode", "--source", "{data}", "--dest", "out/x.txt"], ["--dest", ".zip"]),
    (["convert", "--source", "missing", "--dest", "out/x.zip", "--resolution", "16"], ["--source"]),
    (["encode", "--source", "{data}", "--dest", "out/x.zip", "--device", "foo"], ["--device", "foo"]),
    (["encode", "--source", "{data}", "--dest", "out/x.zip", "--device", "cuda:99"], ["--device", "cuda:99"]),
    # The source as its own destination (once replaced by its conversion), a size of gigabytes per image (once
    # killed for memory).
    (["convert", "--source", "{data}", "--dest", "{data}", "--resolution", "16"], ["--dest", "is the --source"]),
    (["encode", "--source", "{data}", "--dest", "{data}"], ["--dest", "is the --source"]),
    (["convert", "--source", "{data}", "--dest", "out/x.zip", "--resolution", "99999"], ["--resolution", "at most"]),
]


@pytest.mark.parametrize("args,words", DATASET_TOOL_REJECTED,
                         ids=[" ".join(a[:1] + a[5:]) for a, _ in DATASET_TOOL_REJECTED])
def test_dataset_tool_rejects_before_writing(workdir, data, args, words):
    from dataset_tool import main

    (workdir / "folder").mkdir()
    (workdir / "folder" / "keep.txt").write_text("")
    result = CliRunner().invoke(main, [a.format(data=data["labelled"]) for a in args])
    assert_rejected(result, *words)
    assert listing(workdir) == ["folder", "folder/keep.txt", "tmp"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc takes no new folders")
def test_dataset_tool_destination_that_cannot_be_made_is_one_line(workdir, data):
    from dataset_tool import main

    result = CliRunner().invoke(main, ["convert", "--source", data["labelled"], "--dest", "/proc/edm2-no-such/x.zip"])
    assert_rejected(result, "cannot write --dest '/proc/edm2-no-such/x.zip' (No such file or directory)")
    assert listing(workdir) == ["tmp"]


def test_dataset_tool_failure_removes_the_folders_it_made(workdir, data):
    from dataset_tool import main

    bad = workdir / "src"
    (bad / "cls").mkdir(parents=True)
    (bad / "cls" / "a.png").write_bytes(b"not a png")
    result = CliRunner().invoke(main, ["convert", "--source", str(bad), "--dest", "a/b/x.zip", "--resolution", "16"])
    assert_rejected(result, "a.png")
    assert listing(workdir) == ["src", "src/cls", "src/cls/a.png", "tmp"]


def test_other_tools_refuse_a_file_for_a_folder_and_a_folder_for_a_file(workdir):
    import calculate_metrics
    import generate
    import reconstruct_phema

    (workdir / "folder").mkdir()
    (workdir / "afile").write_bytes(b"")
    cases = [
        (reconstruct_phema.main, ["--indir", "folder", "--outdir", "afile", "--outstd", "0.1"], "--outdir"),
        (calculate_metrics.main, ["calc", "--images", "folder", "--ref", "r.npz", "--out", "folder"], "--out"),
        (calculate_metrics.main, ["ref", "--data", "folder", "--dest", "folder"], "--dest"),
        (generate.main, ["--net", "n.safetensors", "--grid", "folder"], "--grid"),
        (generate.main, ["--net", "n.safetensors", "--outdir", "afile"], "--outdir"),
    ]
    for command, args, option in cases:
        assert_rejected(CliRunner().invoke(command, args), option)
    assert listing(workdir) == ["afile", "folder", "tmp"]


def test_run_directory_that_cannot_be_made_is_one_line(workdir, data):
    """--outdir below a file: the run directory cannot be created (once a FileNotFoundError traceback)."""
    from train_edm2 import main

    (workdir / "afile").write_bytes(b"")
    args = ["--outdir", "afile/run", "--data", data["labelled"], f"--network-kwargs={TINY_NET}", "--workers=0"]
    assert_rejected(CliRunner().invoke(main, args), "--outdir afile/run", "cannot create the run directory")
    assert listing(workdir) == ["afile", "tmp"]
    (workdir / "run" / ".lock").mkdir(parents=True)  # a folder where the lock file goes: once IsADirectoryError
    args[1] = "run"
    assert_rejected(CliRunner().invoke(main, args), "--outdir run", "cannot open its lock file", "Is a directory")
    assert listing(workdir) == ["afile", "run", "run/.lock", "tmp"]


@pytest.mark.skipif(sys.platform != "linux", reason="file names of any bytes: Linux's")
def test_run_directory_of_non_utf8_bytes_is_refused(workdir, data):
    """safetensors opens only UTF-8 paths: such a run once trained, then set every checkpoint aside as damaged on
    resume and started again from 0. Refused before anything is written; so is such a model file for loading."""
    from train_edm2 import main
    from training.model_files import ModelFileError, load_model_file

    outdir = os.fsdecode(b"run-\xff\xfe")
    args = ["--outdir", outdir, "--data", data["labelled"], f"--network-kwargs={TINY_NET}", "--workers=0"]
    assert_rejected(CliRunner().invoke(main, args), "--outdir", "the path is not valid UTF-8")
    assert listing(workdir) == ["tmp"]
    os.mkdir(outdir)
    (workdir / outdir / "net.safetensors").write_bytes(b"")
    with pytest.raises(ModelFileError, match="the path is not valid UTF-8"):
        load_model_file(os.path.join(outdir, "net.safetensors"))


@pytest.mark.parametrize("label", [1.5, True, "1"])
def test_label_that_is_no_class_index_is_refused(workdir, data, label):
    """dataset.json labels are class indices: int() once took 1.5 (and true) for class 1 without a word."""
    from train_edm2 import main

    with zipfile.ZipFile(data["labelled"]) as z:
        z.extractall("folder")
    meta = json.loads((workdir / "folder" / "dataset.json").read_text())
    name = meta["labels"][3][0]
    meta["labels"][3][1] = label
    (workdir / "folder" / "dataset.json").write_text(json.dumps(meta))
    args = ["--outdir", "run", "--data", "folder", f"--network-kwargs={TINY_NET}", "--workers=0"]
    assert_rejected(CliRunner().invoke(main, args), "--data", "dataset.json", name, f"got {label!r}")
    assert not (workdir / "run").exists()
