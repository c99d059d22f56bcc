"""Exact resume with dropout on CUDA (issue 20): a tiny run with dropout and the fast dropout kernel (the CUDA
default of the speed plan, accel/dropout.py), trained once straight through and once in two legs, the second a
resume in a fresh process; the final weights, EMAs, Adam moments and RNG states must agree bit for bit. Prints
JSON (one line) and exits 1 on a mismatch. Run on a GPU machine from the repository root:

    python benchmarks/check_resume_cuda.py

A second straight run is compared too ("repeat_*"): if it also differs, the processes disagree with each other
(an autotuner's choice, atomics), not the resume. For that reason cuDNN's autotuner, which the training loop turns
on and which may pick differently rounding convolution algorithms in different processes, is held off here unless
--cudnn-benchmark. Without CUDA this exits 2 with a message (the CPU resume is tested by tests/test_hardening.py);
--cpu runs the same check on the CPU (plain dropout), to try the harness without a GPU. --ema-halflife N (and
--ema-rampup R) trains with the traditional EMA of ablation configs A-B, updated by the fused post-step on CUDA.

Seen on one H200 (torch 2.11.0+cu130, Triton 3.6.0; the same runs and comparison as here, inline, on main at
76f3450): with the autotuner held off, the resumed run and a second straight run both equal the first bit for
bit, fast dropout on; with it on, as in training, even two straight runs differ (largest absolute difference over
all tensors, Adam moments included: 160; resumed vs straight: 1496), so CUDA runs repeat bit for bit only without
the autotuner.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import click
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from torch_utils.state_io import load_state  # noqa: E402
from training.demo_data import write_demo_dataset  # noqa: E402
from training.run_dir import list_checkpoints  # noqa: E402

TINY_NET = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], channels_per_head=16,
                logvar_channels=16)

# Runs train_edm2.main in the child process; with cuDNN's autotuner held off (the loop would turn it on).
LAUNCH = """
import sys, torch
if {hold_benchmark}:
    type(torch.backends.cudnn).benchmark = property(lambda self: False, lambda self, value: None)
    torch.backends.cudnn.deterministic = True
sys.path.insert(0, {root!r})
sys.argv[0] = "train_edm2.py"
import train_edm2
train_edm2.main()
"""


def train(outdir: str, data: str, duration: int, opts: dict, extra: list[str]) -> None:
    args = [
        f"--outdir={outdir}", f"--data={data}", f"--network-kwargs={json.dumps(TINY_NET)}", f"--duration={duration}",
        f"--batch={opts['batch']}", "--lr=0.01", f"--rampup={opts['batch'] * 4}", "--decay=10",
        f"--status={opts['status']}", f"--snapshot={opts['status']}", f"--checkpoint={opts['status']}",
        f"--dropout={opts['dropout']}", f"--workers={opts['workers']}", "--seed=5", *extra,
    ]
    code = LAUNCH.format(hold_benchmark=not opts["cudnn_benchmark"], root=ROOT)
    env = dict(os.environ, CUBLAS_WORKSPACE_CONFIG=":4096:8")
    p = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, env=env,
                       timeout=opts["timeout"])
    if p.returncode != 0:
        tail = (p.stdout + p.stderr)[-3000:]
        raise click.ClickException(f"training run into {outdir} failed (rc {p.returncode}):\n{tail}")


def tensors(obj, prefix=""):
    """(name, tensor) of every tensor in a nested state."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{prefix}/{i}")


def compare(dir_a: str, dir_b: str) -> dict:
    """Bit-exactness and the largest difference of the final checkpoints' tensors and of the snapshots."""
    (na, pa), *_ = list_checkpoints(dir_a)
    (nb, pb), *_ = list_checkpoints(dir_b)
    if na != nb:
        raise click.ClickException(f"final checkpoints differ in length: {na} images in {dir_a}, {nb} in {dir_b}")
    a, b = dict(tensors(load_state(pa))), dict(tensors(load_state(pb)))
    if a.keys() != b.keys():
        raise click.ClickException(f"the final checkpoints of {dir_a} and {dir_b} hold different tensors")
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    worst = max(((a[k].double() - b[k].double()).abs().max().item() for k in differ if a[k].is_floating_point()),
                default=0.0)
    snapshots = sorted(n for n in os.listdir(dir_a) if n.startswith("network-snapshot-"))
    from safetensors.torch import load_file

    snap_differ = []
    for name in snapshots:
        sa, sb = load_file(os.path.join(dir_a, name)), load_file(os.path.join(dir_b, name))
        if sa.keys() != sb.keys() or not all(torch.equal(sa[k], sb[k]) for k in sa):
            snap_differ.append(name)
    return dict(bitexact=not differ and not snap_differ, max_abs_diff=worst, tensors_differ=len(differ),
                first_differ=differ[:3], snapshots=len(snapshots), snapshots_differ=snap_differ)


@click.command()
@click.option("--steps", type=click.IntRange(min=4), default=16, show_default=True, help="Optimizer steps in all")
@click.option("--batch", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--dropout", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.1, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto", show_default=True)
@click.option("--compile/--no-compile", "compile_net", default=False, show_default=True)
@click.option("--cudnn-benchmark", "cudnn_benchmark", is_flag=True, help="Leave cuDNN's autotuner on, as in training")
@click.option("--cpu", is_flag=True, help="Run the check on the CPU (plain dropout), to try the harness")
@click.option("--workdir", default=None, help="Where the runs go [default: a temporary folder, removed]")
@click.option("--timeout", type=int, default=900, show_default=True, help="Seconds one training run may take")
@click.option("--ema-halflife", "ema_halflife", type=click.IntRange(min=0), default=None,
              help="Train with the traditional EMA of ablation configs A-B (half-life in images) instead of the "
              "power-function EMAs")
@click.option("--ema-rampup", "ema_rampup", type=click.FloatRange(0, 1), default=None,
              help="The traditional EMA's ramp-up ratio [default: none]")
def main(steps, batch, dropout, workers, precision, compile_net, cudnn_benchmark, cpu, workdir, timeout, ema_halflife,
         ema_rampup) -> None:  # fmt: skip
    """Straight vs resumed training with dropout on CUDA, bit for bit."""
    if not cpu and not torch.cuda.is_available():
        click.echo("check_resume_cuda.py: no CUDA device (torch.cuda.is_available() is False); the CPU resume is "
                   "tested by tests/test_hardening.py, or pass --cpu to try this harness on the CPU", err=True)
        sys.exit(2)
    res = dict(device="cpu" if cpu else torch.cuda.get_device_name(), torch=torch.__version__)
    extra = [f"--precision={precision}", "--compile" if compile_net else "--no-compile"]
    if ema_halflife is not None:
        extra += [f"--ema-halflife={ema_halflife}"] + ([f"--ema-rampup={ema_rampup}"] if ema_rampup is not None else [])
    elif ema_rampup is not None:
        raise click.BadParameter("applies to the traditional EMA only: give --ema-halflife too",
                                 param_hint="--ema-rampup")
    # The children train with the default kernels: 'fast' on CUDA (the fast dropout kernel), 'reference' on the CPU.
    if cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the children train on the CPU
    else:
        from accel import resolve_speed_plan

        if not resolve_speed_plan(torch.device("cuda")).fast_dropout:
            click.echo("check_resume_cuda.py: the fast dropout kernel cannot run here (no Triton for this GPU)",
                       err=True)
            sys.exit(2)
    steps -= steps % 2  # two legs of whole status intervals
    status = batch * (steps // 4) if steps % 4 == 0 else batch * (steps // 2)
    opts = dict(batch=batch, status=status, dropout=dropout, workers=workers, cudnn_benchmark=cudnn_benchmark,
                timeout=timeout)
    duration, half = batch * steps, batch * (steps // 2)
    res.update(steps=steps, batch=batch, dropout=dropout, fast_dropout=not cpu, precision=precision,
               compile=compile_net, cudnn_benchmark=cudnn_benchmark, resumed_at=half, ema_halflife=ema_halflife,
               ema_rampup=ema_rampup)
    with tempfile.TemporaryDirectory(prefix="check-resume-") as tmp:
        work = workdir or tmp
        os.makedirs(work, exist_ok=True)
        data = write_demo_dataset(os.path.join(work, "data.zip"), num_images=40, resolution=16)
        straight, repeat, legs = (os.path.join(work, name) for name in ("straight", "repeat", "legs"))
        train(straight, data, duration, opts, extra)
        train(repeat, data, duration, opts, extra)
        train(legs, data, half, opts, extra)
        train(legs, data, duration, opts, extra)  # a fresh process resumes from the first leg's checkpoint
        with open(os.path.join(legs, "training_options.json")) as f:
            options = json.load(f)
        if options["network"].get("dropout") != dropout:
            raise click.ClickException(f"the runs trained without dropout: {options['network']}")
        res.update(compare(straight, legs))
        repeat_res = compare(straight, repeat)
        res.update(repeat_bitexact=repeat_res["bitexact"], repeat_max_abs_diff=repeat_res["max_abs_diff"])
    if not res["bitexact"] and not res["repeat_bitexact"]:
        res["note"] = "two straight runs differ too: the processes disagree (autotuning, atomics), not only the resume"
    print(json.dumps(res))
    sys.exit(0 if res["bitexact"] else 1)


if __name__ == "__main__":
    main()
