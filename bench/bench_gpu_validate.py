"""The prepared GPU run, dry: its plan checks out, and without a GPU it stops at once with
exit 2 and a line saying why (the run itself happens on a GPU machine)."""

import os
import subprocess
import sys
from pathlib import Path

import torch

import gpu_validate

SCRIPT = Path(__file__).with_name("gpu_validate.sh")


def test_the_plan_checks_out_and_prints():
    assert gpu_validate.check_plan() == []
    done = subprocess.run([str(SCRIPT), "--dry-run", "--budget-s", "480"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr
    for step in gpu_validate.STEPS:
        assert step.name in done.stdout
    assert "bench/scale.py --size gpu" in done.stdout


def test_a_missing_script_is_refused(monkeypatch):
    broken = gpu_validate.Step("x", ("python", "bench/nope.py"), (), 1.0)
    monkeypatch.setattr(gpu_validate, "STEPS", (broken,))
    assert gpu_validate.check_plan() == ["x: bench/nope.py does not exist"]
    assert gpu_validate.main(["--dry-run"]) == 2


def test_without_a_gpu_it_stops_with_exit_2():
    if torch.cuda.is_available():
        return
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=120,
                          env={**env, "PYTHON": sys.executable})
    assert done.returncode == 2
    assert done.stderr.startswith("gpu_validate: no CUDA GPU visible to torch")
    assert done.stderr.count("\n") == 1
