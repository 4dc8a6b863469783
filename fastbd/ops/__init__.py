"""Functional GPU ops with torch references (see DESIGN.md §3).

Each op dispatches to a backend chosen per call (``backend=``), by ``FASTBD_BACKEND``, or by the
device's preference order; ``register_backend`` adds one from another library. See
``fastbd.ops._backend``.
"""

from fastbd.ops._backend import (
    available_backends,
    backend_available,
    choose_backend,
    register_backend,
    unregister_backend,
)
from fastbd.ops._checks import all_finite
from fastbd.ops.mask_fill import mask_fill, random_block_pattern, window_masks

__all__ = [
    "all_finite",
    "available_backends",
    "backend_available",
    "choose_backend",
    "mask_fill",
    "random_block_pattern",
    "register_backend",
    "unregister_backend",
    "window_masks",
]
from fastbd.ops.paste import pack_patches, paste  # noqa: E402

__all__ += ["pack_patches", "paste"]
from fastbd.ops.kmeans import KMeans, kmeans_assign  # noqa: E402

__all__ += ["KMeans", "kmeans_assign"]
from fastbd.ops.cosine import cosine_topk, pair_cosine  # noqa: E402

__all__ += ["cosine_topk", "pair_cosine"]
from fastbd.ops.window_argmax import window_argmax, window_sums  # noqa: E402

__all__ += ["window_argmax", "window_sums"]
