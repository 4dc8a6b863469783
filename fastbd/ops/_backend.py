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

Other libraries add backends with ``register_backend``: the op validates its inputs as usual
and then calls the registered function with the op's own arguments as keywords (defaults filled
in, without ``backend`` and ``validate``); it returns what the op returns. The ops smoke run
(``fastbd demo ops``, ``fastbd.smoke.run_smoke``) compares every available backend with the
torch reference.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
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
    extensible: bool = True
    """Whether ``register_backend`` may add backends (the op calls them)."""

    def order_for(self, device_type: str) -> tuple[str, ...]:
        return self.preference.get(device_type, ("torch",))


_REGISTRY: dict[str, OpSpec] = {}


@dataclass(frozen=True)
class ExternalBackend:
    """A backend added with ``register_backend``."""

    fn: Callable[..., object]
    devices: tuple[str, ...]
    available: Callable[[], bool] | None = None


_EXTERNAL: dict[tuple[str, str], ExternalBackend] = {}


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


def register_backend(op: str, name: str, fn: Callable[..., object], *,
                     devices: tuple[str, ...] = ("cuda",), prefer: bool = False,
                     available: Callable[[], bool] | None = None) -> None:
    """Add backend ``name`` to ``op``: ``fn(**arguments)`` runs the op on tensors of the given
    device types (``"cuda"``, ``"cpu"``, …). ``prefer``: first in those devices' default order
    (else last, so it runs only when asked for). ``available``: a check called before each use
    (e.g. whether an optional library imports). Re-registering a name replaces it."""
    spec = _spec(op)
    if not spec.extensible:
        extensible = sorted(o for o, sp in _REGISTRY.items() if sp.extensible)
        raise ValueError(f"{op!r} takes no registered backends; these do: "
                         f"{', '.join(extensible)}")
    if name in KNOWN_BACKENDS:
        raise ValueError(f"{name!r} is a built-in backend name; choose another")
    if not name or not name.isidentifier():
        raise ValueError(f"backend name must be an identifier, got {name!r}")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if isinstance(devices, str) or not devices:
        raise ValueError(f"devices must be a non-empty tuple of device types, got {devices!r}")
    preference = dict(spec.preference)
    for device_type in devices:
        order = [b for b in spec.order_for(device_type) if b != name]
        preference[device_type] = tuple([name, *order] if prefer else [*order, name])
    backends = spec.backends if name in spec.backends else (*spec.backends, name)
    _REGISTRY[op] = replace(spec, backends=backends, preference=preference)
    _EXTERNAL[(op, name)] = ExternalBackend(fn, tuple(devices), available)


def unregister_backend(op: str, name: str) -> None:
    """Remove a backend added with ``register_backend``."""
    if (op, name) not in _EXTERNAL:
        raise ValueError(f"{op!r} has no registered backend {name!r}")
    del _EXTERNAL[(op, name)]
    spec = _spec(op)
    preference = {device_type: tuple(b for b in order if b != name)
                  for device_type, order in spec.preference.items()}
    _REGISTRY[op] = replace(spec, backends=tuple(b for b in spec.backends if b != name),
                            preference=preference)


def external_backend(op: str, name: str) -> Callable[..., object] | None:
    """The function registered as ``op``'s backend ``name`` (None for built-in backends)."""
    external = _EXTERNAL.get((op, name))
    return None if external is None else external.fn


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


def backend_available(backend: str, device: torch.device | str, op: str | None = None) -> bool:
    """Whether ``backend`` (of ``op``, for registered backends) can run on ``device`` here."""
    device = torch.device(device)
    external = _EXTERNAL.get((op, backend))
    if external is not None:
        return device.type in external.devices and (external.available is None
                                                    or bool(external.available()))
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
    return [b for b in ordered if backend_available(b, device, op)]


def choose_backend(op: str, device: torch.device | str, backend: str | None = None) -> str:
    """Pick the backend for one call of ``op`` on ``device`` (see the module docstring)."""
    spec = _spec(op)
    device = torch.device(device)
    if backend is not None:
        if backend not in spec.backends:
            raise ValueError(
                f"{op}: backend {backend!r} not implemented; choose from {', '.join(spec.backends)}"
            )
        if not backend_available(backend, device, op):
            raise ValueError(f"{op}: backend {backend!r} cannot run on device {device}"
                             + _why_unavailable(op, backend, device))
        return backend
    from_env = os.environ.get("FASTBD_BACKEND")
    if from_env:
        if from_env in spec.backends and backend_available(from_env, device, op):
            return from_env
        log.debug("%s: FASTBD_BACKEND=%s not usable on %s, using the default", op, from_env,
                  device)
    for candidate in spec.order_for(device.type):
        if backend_available(candidate, device, op):
            return candidate
    return "torch"


def _why_unavailable(op: str, backend: str, device: torch.device) -> str:
    external = _EXTERNAL.get((op, backend))
    if external is not None:
        return (f" (registered for {', '.join(external.devices)})"
                if device.type not in external.devices else " (its availability check failed)")
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
