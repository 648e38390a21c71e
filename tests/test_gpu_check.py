"""`make gpu-check` (bench/gpu_check.sh) refuses clearly on a machine without a CUDA GPU."""

from __future__ import annotations

import subprocess

import torch
from after_training_helpers import PYTHON, REPO, env


def test_gpu_check_refuses_without_a_gpu():
    if torch.cuda.is_available():  # on a GPU machine the check itself is run by hand (minutes)
        result = subprocess.run([str(REPO / "bench" / "gpu_check.sh"), "--help"], capture_output=True, text=True,
                                env={**env(), "PYTHON": PYTHON}, timeout=120)
        assert result.returncode == 0 and "--steps" in result.stdout
        return
    result = subprocess.run([str(REPO / "bench" / "gpu_check.sh")], capture_output=True, text=True,
                            env={**env(), "PYTHON": PYTHON}, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("gpu-check: no CUDA GPU is visible on this machine")
    assert len(result.stderr.strip().splitlines()) == 1 and not result.stdout
