"""Instruments for ScaleLong (docs/design.md §9): per long skip and per stage, the RMS of the hidden features and the
gradient norms, measured on the steps that end at a status line and written into stats.jsonl with it.

What is measured on an armed step (all accumulation rounds and all processes together):
- `skips/NN/feat_rms`: RMS of skip NN's encoder-side feature (NN = 01 is the outermost skip);
- `skips/NN/scale`: RMS of the scaled skip / RMS of the raw skip (the coefficient; for LS the gate's effect);
- `skips/NN/grad_norm`: norm of d(loss)/d(feature) at that encoder feature (the whole batch);
- `stages/NAME/feat_rms`, `stages/NAME/feat_grad_norm`: the same for the output of each stage (EDM2 U-Net:
  the encoder and decoder levels `enc.32x32`, `dec.16x16`, ...; U-ViT: the blocks `in0` .. `mid` .. `outK`);
- `stages/NAME/param_grad_norm`: norm of the gradient of the stage's parameters; `grad_norm`: of all;
- `stages/NAME/weight_norm`: RMS of the norms of the stage's weight vectors (one per output unit), after the step:
  the weight magnitude of the ablation ladder (docs/design.md "Ablation ladder"); `feat_rms` is its activations'.
Comparing these across the status lines of a run shows the oscillation the ScaleLong paper speaks of.

The training loop uses it in four lines:

    instruments = SkipInstruments(net)                          # once, after the network is built
    instruments.arm(<this step ends at a status line>)          # at the start of every step
    entry.update(instruments.collect())                         # in the status block, on every process

Hooks exist only on armed steps; the other steps run exactly as without instruments.
`python -m training.instruments tensorboard RUN_DIR` writes a run's stats.jsonl as TensorBoard scalars.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from typing import Any

import torch


def backbone_of(net: torch.nn.Module) -> torch.nn.Module:
    """The backbone F inside a Precond (or the backbone itself), unwrapping DistributedDataParallel."""
    net = getattr(net, "module", net)
    return getattr(net, "backbone", net)


def stage_groups(backbone: torch.nn.Module) -> dict[str, list[torch.nn.Module]]:
    """name -> the modules of that stage, in order; the last one's output is the stage's feature."""
    if hasattr(backbone, "stage_modules"):  # U-ViT
        return {name: [m] for name, m in backbone.stage_modules().items()}
    if hasattr(backbone, "enc") and hasattr(backbone, "dec"):  # EDM2 U-Net: one stage per level and side
        groups: dict[str, list[torch.nn.Module]] = defaultdict(list)
        for side in ("enc", "dec"):
            for name, module in getattr(backbone, side).items():
                groups[f"{side}.{name.split('_')[0]}"].append(module)
        return dict(groups)
    raise ValueError(f"instruments: no stages known for backbone {type(backbone).__name__}")


class SkipInstruments:
    """Feature RMS and gradient norms per long skip and per stage; see the module docstring."""

    def __init__(self, net: torch.nn.Module):
        backbone = backbone_of(net)
        self.skip_module = getattr(backbone, "skip_scale", None)
        self.stages = stage_groups(backbone)
        self.stage_params = {
            name: [p for m in modules for p in m.parameters()] for name, modules in self.stages.items()
        }
        self.params = [p for p in getattr(net, "module", net).parameters()]
        self._handles: list[Any] = []
        self._sums: dict[str, torch.Tensor] = {}
        self.armed = False

    # --- hooks ---

    def _add(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().to(torch.float64)
        self._sums[key] = self._sums[key] + value if key in self._sums else value

    def _observe(self, key: str, x: torch.Tensor) -> None:
        """Sum of squares and count of a feature, and (through a tensor hook) of its gradient."""
        self._add(f"{key}/sq", x.detach().to(torch.float32).square().sum())
        self._add(f"{key}/n", torch.tensor(float(x.numel()), device=x.device))
        if x.requires_grad:
            x.register_hook(lambda g: self._add(f"{key}/grad_sq", g.to(torch.float32).square().sum()))

    def _skip_hook(self, module, args, output) -> None:
        if not torch.is_grad_enabled():
            return
        skip, index = args[0], int(args[1])
        key = f"skips/{index:02d}"
        self._observe(key, skip)
        self._add(f"{key}/out_sq", output.detach().to(torch.float32).square().sum())

    def _stage_hook(self, name: str):
        def hook(module, args, output) -> None:
            if torch.is_grad_enabled():
                self._observe(f"stages/{name}", output)

        return hook

    def arm(self, on: bool) -> None:
        """Measure the next step (on=True) or not; call at the start of every step."""
        self._remove()
        self._sums = {}
        self.armed = bool(on)
        if not self.armed:
            return
        if self.skip_module is not None:
            self._handles.append(self.skip_module.register_forward_hook(self._skip_hook))
        for name, modules in self.stages.items():
            self._handles.append(modules[-1].register_forward_hook(self._stage_hook(name)))

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # --- results ---

    def collect(self) -> dict[str, float]:
        """The armed step's figures as a flat dict (empty when the step was not armed). Call on every
        process after the optimizer step: it sums the feature statistics over processes (a collective)."""
        armed = self.armed
        self._remove()
        self.armed = False
        if not armed:
            return {}
        keys = sorted(self._sums)
        device = next((t.device for t in self._sums.values()), torch.device("cpu"))
        totals = (
            torch.stack([self._sums[k].to(device) for k in keys]) if keys else torch.zeros([0], dtype=torch.float64)
        )
        if (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        ):
            if torch.distributed.get_backend() == "nccl" and totals.device.type != "cuda":
                totals = totals.cuda()
            torch.distributed.all_reduce(totals)
        sums = dict(zip(keys, totals.tolist()))
        self._sums = {}

        out: dict[str, float] = {}
        prefixes = sorted({k.rsplit("/", 1)[0] for k in keys})
        for prefix in prefixes:
            n = sums.get(f"{prefix}/n", 0.0)
            if n <= 0:
                continue
            out[f"{prefix}/feat_rms"] = math.sqrt(sums[f"{prefix}/sq"] / n)
            if f"{prefix}/grad_sq" in sums:
                name = "grad_norm" if prefix.startswith("skips/") else "feat_grad_norm"
                out[f"{prefix}/{name}"] = math.sqrt(sums[f"{prefix}/grad_sq"])
            if f"{prefix}/out_sq" in sums:
                out[f"{prefix}/scale"] = math.sqrt(sums[f"{prefix}/out_sq"] / max(sums[f"{prefix}/sq"], 1e-30))
        # Parameter gradients are the same on every process after DistributedDataParallel's all-reduce.
        for name, params in self.stage_params.items():
            out[f"stages/{name}/param_grad_norm"] = _grad_norm(params)
            out[f"stages/{name}/weight_norm"] = _weight_norm(params)
        out["grad_norm"] = _grad_norm(self.params)
        return out


def _weight_norm(params: list[torch.nn.Parameter]) -> float:
    """RMS over the output units of the stage's weight tensors (2-D and up) of the units' norms ||w_i||: the weight
    magnitude of the EDM2 paper's figures, constant under forced weight normalization (Eq. 66), drifting without."""
    norms = [p.detach().to(torch.float32).flatten(1).square().sum(dim=1) for p in params if p.ndim >= 2]
    return math.sqrt(float(torch.cat(norms).mean())) if norms else 0.0


def _grad_norm(params: list[torch.nn.Parameter]) -> float:
    grads = [p.grad.detach().to(torch.float32).square().sum() for p in params if p.grad is not None]
    return math.sqrt(float(torch.stack(grads).sum())) if grads else 0.0


# --- reading the figures back --------------------------------------------------------------------------


def read_stats(run_dir: str) -> list[dict[str, Any]]:
    """The status lines of a run (stats.jsonl), oldest first. A last line cut short (a run killed while writing it;
    the resumed run drops it too) is left out; any other line that is no JSON object raises ValueError naming it."""
    path = os.path.join(run_dir, "stats.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no stats.jsonl (has the run written a status line yet?)")
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    lines = text.splitlines()
    entries = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            if number == len(lines) and not text.endswith("\n"):
                break
            entry = None
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: line {number} is not a status entry (a JSON object): {line[:60]!r}")
        entries.append(entry)
    return entries


def instrument_keys(entries: list[dict[str, Any]]) -> list[str]:
    """The instrument fields that occur in the entries."""
    keys = {k for e in entries for k in e if re.match(r"(skips|stages)/", k) or k == "grad_norm"}
    return sorted(keys)


def write_tensorboard(run_dir: str, logdir: str | None = None) -> str:
    """Write every numeric field of stats.jsonl as a TensorBoard scalar (step = images seen); needs the
    `tensorboard` package. Returns the log directory."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise RuntimeError("TensorBoard output needs the 'tensorboard' package: pip install tensorboard") from e
    logdir = logdir or os.path.join(run_dir, "tensorboard")
    writer = SummaryWriter(logdir)
    for entry in read_stats(run_dir):
        for key, value in entry.items():
            if key != "nimg" and isinstance(value, (int, float)):
                writer.add_scalar(key, value, global_step=int(entry["nimg"]))
    writer.close()
    return logdir


def main(argv: list[str] | None = None) -> None:
    import click

    @click.group()
    def cli() -> None:
        """Instrument figures of a training run."""

    @cli.command()
    @click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
    @click.option("--logdir", default=None, help="TensorBoard log directory [default: RUN_DIR/tensorboard]")
    def tensorboard(run_dir: str, logdir: str | None) -> None:
        """Write RUN_DIR/stats.jsonl as TensorBoard scalars."""
        try:
            click.echo(write_tensorboard(run_dir, logdir))
        except (RuntimeError, FileNotFoundError) as e:
            raise click.ClickException(str(e)) from None

    cli.main(args=argv, standalone_mode=True)


if __name__ == "__main__":
    main()
