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
