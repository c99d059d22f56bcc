"""Power-function EMA and post-hoc EMA reconstruction (docs/design.md §6): the public namespace.

Example:

    import edm2.phema as phema
    phema.std_to_exp(0.1)                                 # exponent g of the profile (Eq. 126)
    ema = phema.PowerFunctionEMA(net, stds=[0.05, 0.10])  # training: ema.update(net, cur_nimg, batch_size)
    for rec in phema.reconstruct("training-runs/00000", "0.05,0.06,...,0.20"):
        print(rec.std, metric(rec.net))                   # nothing written to disk
"""

from training.phema import (
    DEFAULT_STDS,
    STD_LIMIT,
    PowerFunctionEMA,
    TraditionalEMA,
    check_std,
    exp_to_std,
    power_function_beta,
    power_function_correlation,
    solve_posthoc_coefficients,
    std_to_exp,
)
from .phema_reconstruct import (
    ReconstructedNetwork,
    SnapshotError,
    SnapshotInfo,
    StdList,
    parse_std_list,
    reconstruct,
    reconstruct_to_dir,
    scan_snapshots,
)
from .phema_search import (
    SweepResult,
    load_validation_data,
    plot_sweep,
    save_sweep_table,
    sweep_ema_length,
    validation_loss_metric,
)

__all__ = [
    "DEFAULT_STDS",
    "STD_LIMIT",
    "PowerFunctionEMA",
    "ReconstructedNetwork",
    "SnapshotError",
    "SnapshotInfo",
    "StdList",
    "SweepResult",
    "TraditionalEMA",
    "check_std",
    "exp_to_std",
    "load_validation_data",
    "parse_std_list",
    "plot_sweep",
    "power_function_beta",
    "power_function_correlation",
    "reconstruct",
    "reconstruct_to_dir",
    "save_sweep_table",
    "scan_snapshots",
    "solve_posthoc_coefficients",
    "std_to_exp",
    "sweep_ema_length",
    "validation_loss_metric",
]
