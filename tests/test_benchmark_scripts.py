"""The GPU-only benchmarks refuse a machine without CUDA in one line, not with an assertion from inside torch."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script", ["check_cuda.py", "bench_post_step.py", "conv_ceiling.py", "profile_step.py"])
def test_gpu_only_benchmark_without_cuda_is_one_line(script, tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no GPU, also where the tests run on a GPU machine
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == "", done.stdout + done.stderr
    assert done.stderr.strip() == f"{script}: needs a CUDA GPU (torch.cuda.is_available() is False here)"
