"""Both spellings of the loss options are accepted by the tools that take them."""
import importlib

import pytest


@pytest.mark.parametrize("module", ["train_edm2", "phema_sweep"])
def test_P_mean_P_std_both_spellings(module):
    command = importlib.import_module(module).main
    opts = {p.name: set(p.opts) for p in command.params}
    assert {"--P_mean", "--P-mean"} <= opts["P_mean"]
    assert {"--P_std", "--P-std"} <= opts["P_std"]
    ctx = command.make_context(module, ["--P-mean", "-0.5", "--P_std", "1.1"], resilient_parsing=True)
    assert ctx.params["P_mean"] == -0.5 and ctx.params["P_std"] == 1.1


def test_one_image_is_singular(tmp_path):
    import numpy as np
    from PIL import Image

    from edm2.metrics import MetricsError, open_image_dataset

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(MetricsError, match=r"holds 1 image, fewer than the 2 asked for"):
        open_image_dataset(tmp_path, num=2)


def test_outdir_that_is_a_file_is_refused_without_writing(tmp_path):
    from click.testing import CliRunner

    import train_edm2

    target = tmp_path / "afile"
    target.write_bytes(b"")
    result = CliRunner().invoke(train_edm2.main, ["--outdir", str(target), "--data", "demo", "--preset", "demo"])
    assert result.exit_code == 2 and "is a file; expected a directory" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_nesting_bomb_header_gives_model_file_error(tmp_path):
    from edm2.model_files import HEADER_KEY, ModelFileError, _parse_header

    bomb = "[" * 200000 + "]" * 200000
    with pytest.raises(ModelFileError, match="nested too deeply"):
        _parse_header({HEADER_KEY: bomb}, tmp_path / "x.safetensors")


def _parse(command, args):
    return command.make_context(command.name or "cmd", args, resilient_parsing=True).params


def test_official_sampler_option_names_are_aliases():
    import calculate_metrics
    import generate

    params = _parse(generate.main, ["--sigma_min", "0.01", "--sigma_max", "50", "--S_churn", "5", "--S_min", "0.1",
                                    "--S_max", "9", "--S_noise", "1.01"])
    assert (params["sigma_min"], params["sigma_max"]) == (0.01, 50)
    assert (params["S_churn"], params["S_min"], params["S_max"], params["S_noise"]) == (5, 0.1, 9, 1.01)
    params = _parse(generate.main, ["--sigma-min", "0.02", "--s-churn", "3"])
    assert (params["sigma_min"], params["S_churn"]) == (0.02, 3)
    gen = calculate_metrics.main.commands["gen"]
    params = _parse(gen, ["--ref", "r.npz", "--sigma_min", "0.01", "--sigma_max", "40", "--num", "10", "--seed", "5"])
    assert (params["sigma_min"], params["sigma_max"], params["num_images"], params["first_seed"]) == (0.01, 40, 10, 5)


def test_metrics_gen_num_and_seeds_are_exclusive(tmp_path):
    from click.testing import CliRunner

    import calculate_metrics

    args = ["gen", "--net", str(tmp_path / "n.safetensors"), "--ref", str(tmp_path / "r.npz"), "--seeds", "0-3",
            "--num", "4"]
    result = CliRunner().invoke(calculate_metrics.main, args)
    assert result.exit_code == 2 and "--seeds, or --num and --seed, not both" in result.output


def test_dataset_tool_encode_options():
    from dataset_tool import main

    encode = main.commands["encode"]
    params = _parse(encode, ["--source", "a.zip", "--dest", "b.zip", "--model-url", "some/vae"])
    assert params["vae"] == "some/vae"
    device = next(p for p in encode.params if p.name == "device")
    assert device.default is None and "cuda if available" in device.help  # decided at run time, not import time
    transform = next(p for p in main.commands["convert"].params if p.name == "transform")
    assert transform.default is None and "default: none" in transform.help  # the official default (plain resize)


@pytest.fixture(scope="module")
def demo_like(tmp_path_factory):
    from training.demo_data import write_demo_dataset

    return write_demo_dataset(str(tmp_path_factory.mktemp("d") / "d.zip"), num_images=10, resolution=32)


def _dry_run(tmp_path, *args, env=None):
    import json

    from click.testing import CliRunner

    from train_edm2 import main

    result = CliRunner(env=env).invoke(main, ["--outdir", str(tmp_path / "run"), *args, "-n"])
    return result, (json.loads(result.stdout) if result.exit_code == 0 else None)


@pytest.mark.parametrize("order", ["flag-first", "preset-first"])
def test_uncond_with_a_conditional_preset_in_either_order(tmp_path, demo_like, order):
    flags = ["--uncond", "--preset", "demo"] if order == "flag-first" else ["--preset", "demo", "--uncond"]
    result, config = _dry_run(tmp_path, "--data", demo_like, *flags)
    assert result.exit_code == 0, result.output
    assert config["cond"] is False and config["network"]["label_dim"] == 0


@pytest.mark.parametrize("value,cond", [("False", False), ("0", False), ("true", True)])
def test_cond_takes_a_boolean(tmp_path, demo_like, value, cond):
    result, config = _dry_run(tmp_path, "--data", demo_like, "--preset", "demo", f"--cond={value}")
    assert result.exit_code == 0, result.output
    assert config["cond"] is cond and config["network"]["label_dim"] == (10 if cond else 0)


def test_fp16_switch_and_no_preset_notice(tmp_path, demo_like):
    net = '--network-kwargs={"model_channels": 8, "channel_mult": [1], "num_blocks": 1, "attn_resolutions": []}'
    result, config = _dry_run(tmp_path, "--data", demo_like, "--fp16=False", net)
    assert result.exit_code == 0, result.output
    assert config["network"]["precision"] == "fp32"
    assert "No --preset: training the default recipe" in result.stderr and "for 2Gi images" in result.stderr
    result, _ = _dry_run(tmp_path, "--data", demo_like, "--preset", "demo", "--fp16=True", "--precision=fp32")
    assert result.exit_code == 2 and "--precision or --fp16" in result.output
    result, _ = _dry_run(tmp_path, "--data", demo_like, "--preset", "demo")
    assert result.exit_code == 0 and "No --preset" not in result.stderr


def test_batch_that_does_not_divide_names_the_given_options_on_rank_0_only(tmp_path, demo_like):
    args = ["--data", demo_like, "--preset", "demo", "--batch", "62"]
    result, _ = _dry_run(tmp_path, *args, env={"WORLD_SIZE": "4", "RANK": "0"})
    assert result.exit_code == 1 and "--batch 62 must be divisible by the number of processes, 4" in result.output
    assert "--batch-gpu" not in result.output  # the user gave none
    result, _ = _dry_run(tmp_path, *args, "--batch-gpu", "4", env={"WORLD_SIZE": "4", "RANK": "0"})
    assert result.exit_code == 1 and "--batch 62 must be divisible by --batch-gpu 4 x 4 process(es)" in result.output
    result, _ = _dry_run(tmp_path, *args, env={"WORLD_SIZE": "4", "RANK": "3"})
    assert result.exit_code == 1 and result.output == ""  # rank 0 alone says it
    assert not (tmp_path / "run").exists()


def test_cudnn_benchmark_switch_is_recorded_and_may_change_on_resume(tmp_path, demo_like):
    from training.run_dir import RESUMABLE_CHANGES

    _, config = _dry_run(tmp_path, "--data", demo_like, "--preset", "demo")
    assert config["cudnn_benchmark"] is True  # the fast default
    _, config = _dry_run(tmp_path, "--data", demo_like, "--preset", "demo", "--no-cudnn-benchmark")
    assert config["cudnn_benchmark"] is False  # for runs that must repeat bit for bit on CUDA
    assert "cudnn_benchmark" in RESUMABLE_CHANGES  # it changes the speed, not what is computed
