"""The official EDM2 code's training throughput and peak memory on the same random latents as bench_train.py, for
figures measured beside this project's in one lease; prints JSON.

    python benchmarks/bench_official_train.py --official-dir .official --preset edm2-img512-l --batch-gpu 32

DIR is a copy of the official repository (NVlabs/edm2), which runs unchanged in a subprocess: its train_edm2.py
with its preset, fp16, on one GPU, a status line every `--interval` steps. The figures are read off its status
lines: images per second from their sec/tick, the peak memory from their gpumem (it resets the peak after each
line); the first interval (start-up, cuDNN autotuning) is left out, as bench_train.py does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import click

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import random_latent_zip  # noqa: E402

# Newer torch's Sampler.__init__ takes no data source, which the official InfiniteSampler still passes; the shim
# accepts it, so that the official code runs unchanged (its files are not edited).
SAMPLER_SHIM = (
    "import runpy, sys, torch.utils.data as data; data.Sampler.__init__ = lambda self, *args, **kwargs: None; "
    "sys.argv[0] = 'train_edm2.py'; runpy.run_path('train_edm2.py', run_name='__main__')"
)
STATUS = re.compile(r"^Status: kimg\s+([\d.]+)\s+time\s+.+?\s+sec/tick\s+([\d.]+)\s.*gpumem\s+([\d.]+)")


@click.command()
@click.option("--official-dir", type=click.Path(exists=True, file_okay=False), required=True,
              help="A copy of the official EDM2 repository")
@click.option("--preset", default="edm2-img512-s", show_default=True, help="The official code's preset")
@click.option("--batch-gpu", "batch_gpu", type=int, default=64, show_default=True)
@click.option("--steps", type=int, default=60, show_default=True)
@click.option("--interval", type=int, default=20, show_default=True, help="Steps per status line")
@click.option("--timeout", type=int, default=900, show_default=True, help="Seconds before the run is stopped")
def main(official_dir: str, preset: str, batch_gpu: int, steps: int, interval: int, timeout: int) -> None:
    if not os.path.isfile(os.path.join(official_dir, "train_edm2.py")):
        raise click.BadParameter(f"{official_dir} holds no train_edm2.py", param_hint="'--official-dir'")
    if steps < 2 * interval:
        raise click.BadParameter("need at least two status intervals (the first is left out)", param_hint="'--steps'")
    tmp = tempfile.mkdtemp(prefix="bench_official_train_")
    try:
        data = random_latent_zip(os.path.join(tmp, "latents.zip"), 512, 64, 1000)
        command = [
            sys.executable, "-c", SAMPLER_SHIM,
            "--outdir", os.path.join(tmp, "run"), "--data", data, "--preset", preset,
            "--batch", str(batch_gpu), "--batch-gpu", str(batch_gpu), "--duration", str(batch_gpu * steps),
            "--status", str(batch_gpu * interval), "--snapshot", "0", "--checkpoint", "0",
        ]
        env = dict(os.environ, PYTHONPATH=os.path.abspath(official_dir))  # its own packages, not this project's
        try:
            done = subprocess.run(command, cwd=official_dir, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise click.ClickException(f"the official run took more than {timeout} s") from None
        if done.returncode != 0:
            sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
            raise click.ClickException(f"the official train_edm2.py failed with exit code {done.returncode}")
        ticks = [tuple(map(float, m.groups())) for m in map(STATUS.match, done.stdout.splitlines()) if m]
        ticks = [t for t in ticks if t[0] > 0]  # it also prints one at the start
        if len(ticks) < 2:
            raise click.ClickException(f"expected status lines from the official run, got:\n{done.stdout[-2000:]}")
        steady = [batch_gpu * interval / sec for _, sec, _ in ticks[1:]]  # its kimg has one decimal: count images
        import torch

        print(json.dumps(dict(
            benchmark="train", code="official", preset=preset, precision="fp16", gpus=1, batch_gpu=batch_gpu,
            batch=batch_gpu, steps=steps, img_per_s=round(sum(steady) / len(steady), 1),
            peak_mem_gib=round(max(mem for _, _, mem in ticks[1:]), 2),
            first_interval_peak_mem_gib=round(ticks[0][2], 2),
            device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", torch=torch.__version__,
        )))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
