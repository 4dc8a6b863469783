"""What this installation can run: library versions, devices, and backends per op."""

from __future__ import annotations

import importlib.metadata
import platform
from dataclasses import asdict, dataclass, field

import torch

from fastbd.ops._backend import available_backends, registered_ops

DISTRIBUTIONS = ("fastbd", "torch", "torchvision", "triton", "numpy", "timm", "open_clip_torch",
                 "cupy-cuda12x", "cupy-cuda13x", "cupy", "cuml-cu12", "cuml-cu13",
                 "scikit-learn", "pytest-benchmark")


@dataclass
class EnvironmentReport:
    python: str
    platform: str
    versions: dict[str, str]
    cpu_threads: int
    cuda_devices: list[dict[str, object]] = field(default_factory=list)
    backends: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def lines(self) -> list[str]:
        out = [f"python {self.python} on {self.platform}, {self.cpu_threads} CPU threads"]
        out += [f"  {name:<18} {version}" for name, version in self.versions.items()]
        if self.cuda_devices:
            for d in self.cuda_devices:
                out.append(f"cuda:{d['index']} {d['name']} ({d['memory_gib']:.1f} GiB, "
                           f"sm_{d['capability']})")
        else:
            out.append("no CUDA device")
        for device, per_op in self.backends.items():
            out.append(f"backends on {device} (preferred first):")
            out += [f"  {op:<14} {', '.join(names)}" for op, names in per_op.items()]
        return out


def environment_report() -> EnvironmentReport:
    """Collect the report (imports nothing optional beyond a metadata lookup per backend)."""
    versions = {}
    for name in DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    devices = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            devices.append({"index": index, "name": props.name,
                            "memory_gib": props.total_memory / 2**30,
                            "capability": f"{props.major}{props.minor}"})
    targets = ["cpu"] + [f"cuda:{d['index']}" for d in devices[:1]]
    backends = {device: {op: available_backends(op, device) for op in sorted(registered_ops())}
                for device in targets}
    return EnvironmentReport(python=platform.python_version(), platform=platform.platform(),
                             versions=versions, cpu_threads=torch.get_num_threads(),
                             cuda_devices=devices, backends=backends)
