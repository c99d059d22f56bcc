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
