"""Backend registry for ``fastbd.ops``.

Every op declares which backends it has and, per device type, the order in which they are
preferred. The backend for one call is chosen as:

1. the ``backend=`` argument of the call (an error if the op lacks it or it cannot run here);
2. else the ``FASTBD_BACKEND`` environment variable, when the op has that backend and it can run
   on the tensor's device (otherwise the variable is ignored for this op, with a debug log);
3. else the first available backend in the op's preference order for the device type.

On CUDA every op prefers ``torch`` until a GPU benchmark has measured another backend faster:
no GPU measurement exists yet, so the Triton kernels, CuPy and cuML run only when asked for
(``backend=`` or ``FASTBD_BACKEND=triton``); ``bench/gpu_validate.sh`` measures them.

Availability: ``torch`` always; ``triton`` on CUDA, and on CPU only under ``TRITON_INTERPRET=1``
(the interpreter, used by the tests); ``cupy`` and ``cuml`` on CUDA when importable. CuPy and
cuML are imported lazily, only when asked about.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache

import torch

log = logging.getLogger(__name__)

KNOWN_BACKENDS = ("triton", "cupy", "cuml", "torch")


@dataclass(frozen=True)
class OpSpec:
    """An op's backends and its per-device-type preference order (fastest first)."""

    name: str
    backends: tuple[str, ...]
    preference: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def order_for(self, device_type: str) -> tuple[str, ...]:
        return self.preference.get(device_type, ("torch",))


_REGISTRY: dict[str, OpSpec] = {}


def register(spec: OpSpec) -> OpSpec:
    unknown = set(spec.backends) - set(KNOWN_BACKENDS)
    if unknown:
        raise ValueError(f"op {spec.name!r}: unknown backends {sorted(unknown)}")
    for device_type, order in spec.preference.items():
        missing = set(order) - set(spec.backends)
        if missing:
            raise ValueError(f"op {spec.name!r}: preference for {device_type} names {missing}")
    _REGISTRY[spec.name] = spec
    return spec


def registered_ops() -> dict[str, OpSpec]:
    return dict(_REGISTRY)


@cache
def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception as exc:  # any import-time failure (missing CUDA libs too) means "absent"
        log.debug("backend module %s not importable: %s", module, exc)
        return False
    return True


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_available(backend: str, device: torch.device | str) -> bool:
    """Whether ``backend`` can run on ``device`` in this process."""
    device = torch.device(device)
    if backend == "torch":
        return True
    if backend == "triton":
        if device.type == "cuda":
            return _importable("triton")
        return device.type == "cpu" and triton_interpreter_enabled() and _importable("triton")
    if backend in ("cupy", "cuml"):
        return device.type == "cuda" and _importable(backend)
    raise ValueError(f"unknown backend {backend!r}; known: {', '.join(KNOWN_BACKENDS)}")


def available_backends(op: str, device: torch.device | str) -> list[str]:
    """The op's backends that can run on ``device``, in preference order."""
    spec = _spec(op)
    device = torch.device(device)
    ordered = list(spec.order_for(device.type)) + [
        b for b in spec.backends if b not in spec.order_for(device.type)
    ]
    return [b for b in ordered if backend_available(b, device)]


def choose_backend(op: str, device: torch.device | str, backend: str | None = None) -> str:
    """Pick the backend for one call of ``op`` on ``device`` (see the module docstring)."""
    spec = _spec(op)
    device = torch.device(device)
    if backend is not None:
        if backend not in spec.backends:
            raise ValueError(
                f"{op}: backend {backend!r} not implemented; choose from {', '.join(spec.backends)}"
            )
        if not backend_available(backend, device):
            raise ValueError(f"{op}: backend {backend!r} cannot run on device {device}"
                             + _why_unavailable(backend, device))
        return backend
    from_env = os.environ.get("FASTBD_BACKEND")
    if from_env:
        if from_env in spec.backends and backend_available(from_env, device):
            return from_env
        log.debug("%s: FASTBD_BACKEND=%s not usable on %s, using the default", op, from_env,
                  device)
    for candidate in spec.order_for(device.type):
        if backend_available(candidate, device):
            return candidate
    return "torch"


def _why_unavailable(backend: str, device: torch.device) -> str:
    if backend == "triton" and device.type == "cpu":
        return " (Triton runs on CPU tensors only under TRITON_INTERPRET=1)"
    if backend in ("cupy", "cuml") and device.type != "cuda":
        return f" ({backend} needs CUDA tensors)"
    if backend in ("cupy", "cuml", "triton"):
        return f" ({backend} is not installed or failed to import)"
    return ""


def _spec(op: str) -> OpSpec:
    try:
        return _REGISTRY[op]
    except KeyError:
        raise ValueError(f"unknown op {op!r}; registered: {', '.join(sorted(_REGISTRY))}") from None
