"""Start-up cost of torch.compile, cold and cached: each benchmark process run three times, its wall time measured
from the outside; prints one JSON line per run and a summary.

    python benchmarks/bench_startup.py --preset edm2-img512-s --what train,sample

For each of train (benchmarks/bench_train.py, the real training loop) and sample (benchmarks/bench_sample.py, one
32-step Heun batch after one warm-up batch): uncompiled; compiled with empty compiler caches (the first run on a
machine); compiled again with the caches that run left (a resumed run, a second generate.py call). The caches are
a fresh temporary directory (TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR), removed afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import click

HERE = os.path.dirname(os.path.abspath(__file__))


def _command(what: str, preset: str, precision: str, batch: int, steps: int, compiled: bool) -> list[str]:
    flag = "--compile" if compiled else "--no-compile"
    if what == "train":
        return [sys.executable, os.path.join(HERE, "bench_train.py"), "--preset", preset, "--precision", precision,
                "--batch-gpu", str(batch), "--steps", str(steps), "--interval", str(max(steps // 3, 1)), flag]
    return [sys.executable, os.path.join(HERE, "bench_sample.py"), "--preset", preset, "--precision", precision,
            "--batch", str(batch), "--repeats", "1", flag]


def _timed(command: list[str], env: dict[str, str]) -> tuple[float, dict | None]:
    t0 = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-2000:] + done.stderr[-4000:])
        raise click.ClickException(f"{' '.join(command)} failed with exit code {done.returncode}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return seconds, json.loads(lines[-1]) if lines else None


@click.command()
@click.option("--preset", default="edm2-img512-s", show_default=True)
@click.option("--precision", type=click.Choice(["fp16", "bf16"]), default="fp16", show_default=True)
@click.option("--batch", type=int, default=64, show_default=True, help="Images per GPU and step / sampler batch")
@click.option("--train-steps", type=int, default=30, show_default=True)
@click.option("--what", default="train,sample", show_default=True, help="Comma-separated: train, sample")
def main(preset: str, precision: str, batch: int, train_steps: int, what: str) -> None:
    cache = tempfile.mkdtemp(prefix="bench_startup_")
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"),
               TRITON_CACHE_DIR=os.path.join(cache, "triton"), PYTHONUNBUFFERED="1")
    summary = dict(benchmark="startup", preset=preset, precision=precision, batch=batch)
    try:
        for kind in [w.strip() for w in what.split(",") if w.strip()]:
            if kind not in ("train", "sample"):
                raise click.BadParameter(f"expected train and/or sample, got {kind!r}", param_hint="'--what'")
            for run, compiled in (("uncompiled", False), ("cold", True), ("cached", True)):
                seconds, result = _timed(_command(kind, preset, precision, batch, train_steps, compiled), env)
                speed = None if result is None else result.get("img_per_s")
                print(json.dumps(dict(benchmark="startup", what=kind, run=run, wall_s=round(seconds, 1),
                                      img_per_s=speed, preset=preset, precision=precision, batch=batch)), flush=True)
                summary[f"{kind}_{run}_wall_s"] = round(seconds, 1)
                summary[f"{kind}_{run}_img_per_s"] = speed
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
