"""Parity with the official EDM2 tools (issue 21, points 5 and 6), against facts the official code produced for
the same inputs (tests/data/official_tools.json; how it was made: tests/data/NOTES.md):
dataset_tool.py convert (file names, order, labels, dataset.json, pixels and PNG bytes) for each transform,
the seeded image subset of calculate_metrics.py --num, and reference pickles that the official tool reads."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import pickletools
import zlib

import numpy as np
import PIL
import PIL.Image
import pytest
from click.testing import CliRunner
from conftest import ROOT
from official_trees import (
    CONVERT_CASES,
    SUBSET_CASES,
    SUBSET_FILES,
    build_source,
    build_subset_folder,
    feature_stats,
    zip_facts,
)

OFFICIAL = json.loads((ROOT / "tests" / "data" / "official_tools.json").read_text())
SAME_PNG_ENCODER = (
    PIL.__version__ == OFFICIAL["made_with"]["pil"] and zlib.ZLIB_RUNTIME_VERSION == OFFICIAL["made_with"]["zlib"]
)


def _convert(*args: str):
    import dataset_tool

    return CliRunner().invoke(dataset_tool.main, ["convert", *args])


# ----------------------------------------------------------------------------------------------------------
# dataset_tool.py convert


@pytest.mark.parametrize("case,kind,options", CONVERT_CASES, ids=[c[0] for c in CONVERT_CASES])
def test_convert_equals_the_official_tool(tmp_path, case, kind, options):
    source = build_source(kind, str(tmp_path / "src"))
    dest = tmp_path / "out.zip"
    r = _convert(f"--source={source}", f"--dest={dest}", *options)
    assert r.exit_code == 0, r.output
    got, expected = zip_facts(str(dest)), OFFICIAL["convert"][case]
    assert got["names"] == expected["names"]  # order and numbering (gaps where center-crop-wide skips)
    assert got["dataset_json"] == expected["dataset_json"]  # labels, including files outside class folders
    assert got["dataset_json_sha256"] == expected["dataset_json_sha256"]  # the same bytes, not only the same JSON
    for name, facts in expected["images"].items():
        assert got["images"][name]["shape"] == facts["shape"], name
        assert got["images"][name]["pixels_sha256"] == facts["pixels_sha256"], name
        if SAME_PNG_ENCODER:
            assert got["images"][name]["png_sha256"] == facts["png_sha256"], name
    if case == "json-partial":
        assert "warning:" in r.output and "no label for 'k/two.png'" in r.output


def test_convert_to_a_folder_as_official(tmp_path):
    """--dest naming a folder (new or empty) holds the files that the official tool puts in the zip."""
    source = build_source("main", str(tmp_path / "src"))
    expected = OFFICIAL["convert"]["center-crop"]
    (tmp_path / "out").mkdir()
    r = _convert(f"--source={source}", f"--dest={tmp_path / 'out'}", "--resolution=32x32", "--transform=center-crop")
    assert r.exit_code == 0, r.output
    files = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert files == sorted(expected["names"])
    data = (tmp_path / "out" / "dataset.json").read_bytes()
    assert hashlib.sha256(data).hexdigest() == expected["dataset_json_sha256"]
    for name, facts in expected["images"].items():
        pixels = np.asarray(PIL.Image.open(tmp_path / "out" / name))
        assert hashlib.sha256(pixels.tobytes()).hexdigest() == facts["pixels_sha256"], name
    r = _convert(f"--source={source}", f"--dest={tmp_path / 'out'}", "--resolution=32")
    assert r.exit_code == 2 and "must be an empty folder" in r.output
    # A failure half-way leaves neither the folder nor a temporary one.
    bad = build_source("square", str(tmp_path / "bad"))
    with open(os.path.join(bad, "one", "d.png"), "wb") as f:
        f.write(b"not a png")
    r = _convert(f"--source={bad}", f"--dest={tmp_path / 'new'}")
    assert r.exit_code == 1 and "cannot read 'one/d.png'" in r.output
    assert sorted(os.listdir(tmp_path)) == ["bad", "out", "src"]


def test_convert_labels_of_the_folder_tree_as_official():
    """The rule behind the stored labels: the top-level name in sorted order, files outside folders first."""
    labels = dict(OFFICIAL["convert"]["resize"]["dataset_json"]["labels"])
    # sorted inputs: B_cls/x.JPEG B_cls/y.bmp B_cls/z_icc.png Zeta.PNG a_cls/deeper/nest.png a_cls/img1.jpg
    # a_cls/img10.png a_cls/img2.png c_cls/q.tiff top_rgb.png; classes: '' 0, B_cls 1, a_cls 2, c_cls 3
    assert list(labels.values()) == [1, 1, 1, 0, 2, 2, 2, 2, 3, 0]


def test_resolution_forms_and_errors(tmp_path):
    source = build_source("main", str(tmp_path / "src"))
    expected = OFFICIAL["convert"]["center-crop"]
    for i, form in enumerate(["32", "32,32", " 32X32 "]):
        dest = tmp_path / f"o{i}.zip"
        r = _convert(f"--source={source}", f"--dest={dest}", f"--resolution={form}", "--transform=center-crop")
        assert r.exit_code == 0, r.output
        got = zip_facts(str(dest))
        assert [got["images"][n]["pixels_sha256"] for n in expected["images"]] == [
            f["pixels_sha256"] for f in expected["images"].values()
        ]
    bad = {
        "--resolution=abc": "expected N or WxH",
        "--resolution=32x": "expected N or WxH",
        "--resolution=0x0": "expected N or WxH",
        "--resolution=-4": "expected N or WxH",
    }
    for option, message in bad.items():
        r = _convert(f"--source={source}", f"--dest={tmp_path / 'bad.zip'}", option)
        assert r.exit_code == 2 and "Invalid value for '--resolution'" in r.output and message in r.output, option
    cases = [
        (["--transform=center-crop"], "needs --resolution"),
        (["--transform=center-crop-dhariwal", "--resolution=32x16"], "must be square"),
        (["--resolution=32x16"], "must be square"),
        (["--transform=center-crop-wide", "--resolution=16x32"], "needs H <= W"),
    ]
    for options, message in cases:
        r = _convert(f"--source={source}", f"--dest={tmp_path / 'bad.zip'}", *options)
        assert r.exit_code == 2 and message in r.output and "--resolution" in r.output, options
    # Without --resolution the inputs must already be square and of one size; the error names the file.
    r = _convert(f"--source={source}", f"--dest={tmp_path / 'bad.zip'}")
    assert r.exit_code == 1 and "'B_cls/x.JPEG' gives a 48x64 image" in r.output
    assert sorted(os.listdir(tmp_path)) == ["o0.zip", "o1.zip", "o2.zip", "src"]  # nothing else, no temp files


def test_help_states_the_default_transform():
    r = _convert("--help")
    assert r.exit_code == 0 and "[default: none, as the official tool" in " ".join(r.output.split())


# ----------------------------------------------------------------------------------------------------------
# calculate_metrics.py: the seeded subset, and reference pickles the official tool reads


def test_num_below_the_folder_size_picks_the_official_subset(tmp_path):
    from edm2.metrics import official_subset
    from training.dataset import list_dataset_files

    names = list_dataset_files(build_subset_folder(str(tmp_path)))
    assert sorted(names) == names and len(names) == len(SUBSET_FILES)
    assert [(c["num"], c["seed"]) for c in OFFICIAL["subset"]] == SUBSET_CASES
    for case in OFFICIAL["subset"]:
        chosen = official_subset(len(names), case["num"], case["seed"])
        assert chosen == case["indices"], case
        assert [names[i] for i in chosen] == case["names"]
    assert official_subset(len(names), None) == list(range(len(names)))


def _stats(seed: int):
    from edm2.metrics import FeatureStatistics

    return {m: FeatureStatistics(m, mu, sigma, n, None) for m, (mu, sigma, n) in feature_stats(seed).items()}


def test_official_layout_reference_round_trip(tmp_path):
    from edm2 import metrics as M
    from edm2.official_pickle import UnsafePickleError

    facts = OFFICIAL["metrics_pickle"]
    loaded = {}
    for seed in (1, 2):
        path = M.save_reference(tmp_path / f"stats{seed}.pkl", _stats(seed))
        # The very bytes that the official calculate_metrics.load_stats read (tests/data/NOTES.md).
        assert hashlib.sha256(path.read_bytes()).hexdigest() == facts["sha256"][f"stats{seed}.pkl"]
        loaded[seed] = M.load_reference(path)
        for metric, (mu, sigma, n) in feature_stats(seed).items():
            s = loaded[seed][metric]
            assert np.array_equal(s.mu, mu) and np.array_equal(s.sigma, sigma) and s.num_images == n
    # Only names that every numpy has (numpy 1.x cannot import numpy 2's `numpy._core` of a plain pickle).
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(path.read_bytes()) if op.name != "MEMOIZE"]
    found = {(ops[i - 2][1], ops[i - 1][1]) for i, (name, _) in enumerate(ops) if name == "STACK_GLOBAL"}
    assert found == {("numpy", "ndarray"), ("builtins", "bytearray")} and "GLOBAL" not in dict(ops)
    assert facts["official_load_stats_keys"] == ["num_images", "fid", "fd_dinov2"]
    assert facts["max_abs_diff_vs_written"] == {"fid": 0.0, "fd_dinov2": 0.0}
    # The project's FD between the two files equals the official tool's.
    fd = M.compare_to_reference(loaded[1], loaded[2], "stats2.pkl")
    for metric, value in facts["official_fd_stats1_vs_stats2"].items():
        assert fd[metric] == pytest.approx(value, rel=1e-9), metric
    assert not [p for p in os.listdir(tmp_path) if p not in ("stats1.pkl", "stats2.pkl")]  # no temp files left
    # Loading stays behind the allow-list: the same layout with a foreign global is refused, not run.
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"num_images": 2, "fid": _RunsCode()}, protocol=4))
    with pytest.raises(UnsafePickleError, match="system"):
        M.load_reference(evil)


class _RunsCode:
    def __reduce__(self):
        return os.system, ("echo this must not run > /dev/null",)
