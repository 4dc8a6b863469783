"""Benchmark session hook: machine facts (GPU, versions, copy bandwidth) in the JSON."""

import platform

import pytest
import torch

from benchutil import HAS_CUDA, copy_bandwidth_bytes_per_s


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_json(config, benchmarks, output_json):
    import importlib.metadata as md

    machine = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "cupy-cuda12x", "cupy-cuda13x", "scikit-learn"):
        try:
            machine[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    if HAS_CUDA:
        machine["gpu"] = torch.cuda.get_device_name()
        machine["cuda"] = torch.version.cuda
        machine["copy_bandwidth_GBps"] = copy_bandwidth_bytes_per_s() / 1e9
    output_json["fastbd_machine"] = machine
