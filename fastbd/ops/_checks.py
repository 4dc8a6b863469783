"""Input validation shared by the ops: every failure names the argument and the problem."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


def check_tensor(name: str, value: object, *, ndim: int | Iterable[int] | None = None,
                 dtypes: Sequence[torch.dtype] | None = None) -> torch.Tensor:
    """Raise ``TypeError``/``ValueError`` unless ``value`` is a tensor of the given rank/dtype."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.ndim not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name} must have rank {want}, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        want = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({want}), got {value.dtype}")
    return value


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """All given tensors on one device; returns it."""
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"tensors are on different devices: {listing}")
    return next(iter(devices.values()))


def all_finite(value: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN/Inf (one host read). A sum decides — any NaN or Inf makes
    it non-finite — with no tensor of flags allocated (float16/bfloat16 summed in float32);
    only a non-finite sum, a bad value or finite values too large to sum, is checked element
    by element."""
    if not value.is_floating_point() or not value.numel():
        return True
    wide = torch.float32 if value.dtype in (torch.float16, torch.bfloat16) else value.dtype
    return bool(torch.isfinite(value.sum(dtype=wide))) or bool(torch.isfinite(value).all())


def check_finite(name: str, value: torch.Tensor) -> None:
    """Reject NaN/Inf in a float tensor (``all_finite``), counting them in the message."""
    if not all_finite(value):
        bad = int((~torch.isfinite(value)).sum())
        raise ValueError(f"{name} contains {bad} NaN/Inf value(s)")


def check_finite_number(name: str, value: object) -> float:
    """A finite real number (not a bool, not NaN/Inf)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_window(name: str, value: object) -> tuple[int, int]:
    """A window given as a side ``w`` or a ``(height, width)`` pair of positive ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        return check_positive_int(name, value), value
    if isinstance(value, tuple | list) and len(value) == 2:
        return (check_positive_int(f"{name} height", value[0]),
                check_positive_int(f"{name} width", value[1]))
    raise ValueError(f"{name} must be a positive int or a (height, width) pair of them, got "
                     f"{value!r}")


def channel_affine(mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor,
                   channels: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``scale``, ``bias`` (float32, shape ``C``) with ``x_norm = u8 * scale + bias``.

    ``mean``/``std`` are in [0, 1] units (torchvision convention), so
    ``scale = 1 / (255 std)`` and ``bias = -mean / std``. The pair is computed once per
    (values, device) and shared — a hot loop copies nothing to the device after its first call;
    callers must not modify it in place.
    """
    mean_values = tuple(torch.as_tensor(mean, dtype=torch.float64).flatten().tolist())
    std_values = tuple(torch.as_tensor(std, dtype=torch.float64).flatten().tolist())
    if len(mean_values) != channels or len(std_values) != channels:
        raise ValueError(f"mean and std need {channels} values (one per channel), got "
                         f"{len(mean_values)} and {len(std_values)}")
    if not all(math.isfinite(v) for v in mean_values + std_values):
        raise ValueError("mean and std must be finite")
    if any(v <= 0 for v in std_values):
        raise ValueError(f"std must be positive, got {list(std_values)}")
    return _device_affine(mean_values, std_values, torch.device(device))


@functools.lru_cache(maxsize=64)
def _device_affine(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    mean_t = torch.tensor(mean, dtype=torch.float64)
    std_t = torch.tensor(std, dtype=torch.float64)
    scale = (1.0 / (255.0 * std_t)).to(torch.float32).to(device)
    bias = (-mean_t / std_t).to(torch.float32).to(device)
    return scale, bias
