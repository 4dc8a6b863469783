"""``window_argmax``: position of the w×w window with the largest sum, batched (integral image).

Only windows that lie fully inside the map are considered. Ties go to the first window in
row-major order of its top-left corner. Sums are accumulated in float64 so that the argmax of
large maps is not decided by float32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastbd.ops._backend import OpSpec, choose_backend, external_backend, register
from fastbd.ops._checks import FLOAT_DTYPES, check_finite, check_tensor, check_window

register(OpSpec("window_argmax", ("torch",), {"cuda": ("torch",)}))


def window_sums(maps: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """Sum of every in-map window: float64 ``B×(H−wh+1)×(W−ww+1)`` from float ``B×H×W``.

    Example:
        >>> import torch
        >>> window_sums(torch.ones(1, 3, 4), (2, 2))
        tensor([[[4., 4., 4.],
                 [4., 4., 4.]]], dtype=torch.float64)
    """
    integral = F.pad(maps.double().cumsum(1).cumsum(2), (1, 0, 1, 0))
    wh, ww = window
    return (integral[:, wh:, ww:] - integral[:, :-wh, ww:] - integral[:, wh:, :-ww]
            + integral[:, :-wh, :-ww])


def window_argmax(maps: torch.Tensor, window: int | tuple[int, int], *,
                  backend: str | None = None, validate: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Best window per map.

    Args:
        maps: float ``B×H×W`` (or ``H×W``) scores, e.g. attention maps.
        window: side ``w`` or ``(wh, ww)``.
        validate: check for NaN/Inf (a host sync); False skips it (then unspecified results).

    Returns:
        positions int64 ``B×2`` (top-left ``y, x``) and sums float64 ``B``
        (``2`` and a scalar for a single ``H×W`` map).

    Example:
        >>> import torch
        >>> from fastbd.ops import window_argmax
        >>> heat = torch.zeros(6, 6)
        >>> heat[3:5, 1:3] = 1.0
        >>> position, total = window_argmax(heat, 2)
        >>> position.tolist(), total.item()
        ([3, 1], 4.0)
    """
    check_tensor("maps", maps, ndim=(2, 3), dtypes=FLOAT_DTYPES + (torch.float64,))
    single = maps.ndim == 2
    batch = maps[None] if single else maps
    wh, ww = check_window("window", window)
    height, width = batch.shape[1:]
    if wh > height or ww > width:
        raise ValueError(f"window {wh}×{ww} is larger than the map {height}×{width}")
    if validate:
        check_finite("maps", batch)
    chosen = choose_backend("window_argmax", batch.device, backend)
    external = external_backend("window_argmax", chosen)
    if external is not None:
        return external(maps=maps, window=(wh, ww))
    if batch.shape[0] == 0:
        return (torch.empty(0, 2, dtype=torch.int64, device=batch.device),
                torch.empty(0, dtype=torch.float64, device=batch.device))
    sums = window_sums(batch, (wh, ww))
    best, flat = sums.flatten(1).max(dim=1)
    cols = sums.shape[2]
    positions = torch.stack([flat // cols, flat % cols], dim=1)
    if single:
        return positions[0], best[0]
    return positions, best
