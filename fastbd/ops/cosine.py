"""Cosine similarity ops: ``cosine_topk`` (chunked top-k search) and ``pair_cosine`` (row-wise).

``cosine_topk`` never holds more than ``query_chunk × key_chunk`` similarities: for each query
chunk it walks the key chunks, keeps the running top-k and merges each chunk's top-k into it.
Backends: ``torch`` (matmul + ``torch.topk``, a radix select on CUDA) and ``triton`` (one fused
kernel: a tensor-core tile product and a running top-k per query row, so the Q × K similarities
are never written; k ≤ 64; equal similarities prefer the lower key index). There is no CuPy
backend for it: CuPy's matmul is the same cuBLAS call as torch's and its ``argpartition`` fully
sorts (CuPy's documentation says so), so it could only be slower. ``pair_cosine`` has ``torch``,
``cupy`` and a one-pass ``triton`` kernel (dot and both norms in a single read of the inputs).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from fastbd.ops._backend import OpSpec, choose_backend, external_backend, register
from fastbd.ops._checks import FLOAT_DTYPES, check_finite, check_same_device, check_tensor

log = logging.getLogger(__name__)

register(OpSpec("cosine_topk", ("triton", "torch"), {"cuda": ("torch", "triton")}))
register(OpSpec("pair_cosine", ("triton", "cupy", "torch"), {"cuda": ("torch", "triton")}))


def _check_pair(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor,
                validate: bool) -> None:
    check_tensor(name_a, a, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(name_b, b, ndim=2, dtypes=FLOAT_DTYPES)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{name_a} has {a.shape[1]} dims but {name_b} has {b.shape[1]}")
    check_same_device(**{name_a: a, name_b: b})
    if validate:
        check_finite(name_a, a)
        check_finite(name_b, b)


def _triton_topk_unsupported(k: int, query: torch.Tensor, max_k: int) -> str:
    """Why the fused kernel cannot serve this call ('' when it can)."""
    if k > max_k:
        return f"takes k ≤ {max_k}, got {k}"
    if query.device.type == "cpu" and query.dtype == torch.bfloat16:
        return "runs bfloat16 only on CUDA (the Triton interpreter has none)"
    return ""


def cosine_topk(query: torch.Tensor, keys: torch.Tensor, k: int, *, largest: bool = True,
                normalized: bool = False, query_chunk: int = 4096, key_chunk: int = 65536,
                backend: str | None = None, validate: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k keys by cosine similarity for every query row.

    Args:
        query: float ``Q×D``.
        keys: float ``K×D`` (same D, same device).
        k: results per query, ``0 ≤ k ≤ K``.
        largest: most similar (True) or least similar (False) first.
        normalized: rows already have unit norm (skips normalising).
        query_chunk, key_chunk: tile of the similarity matrix held at once.
        validate: check the inputs for NaN/Inf (a device-wide reduction read by the host);
            False skips it on hot paths — non-finite inputs then give unspecified results.

    Returns:
        values float32 ``Q×k`` (sorted) and indices int64 ``Q×k`` into ``keys``.

    Example:
        >>> import torch
        >>> from fastbd.ops import cosine_topk
        >>> keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        >>> values, indices = cosine_topk(torch.tensor([[1.0, 0.1]]), keys, 2)
        >>> indices.tolist()
        [[0, 2]]
    """
    _check_pair("query", query, "keys", keys, validate)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be a non-negative int, got {k!r}")
    if k > keys.shape[0]:
        raise ValueError(f"k={k} is larger than the number of keys ({keys.shape[0]})")
    if query_chunk < 1 or key_chunk < 1:
        raise ValueError("query_chunk and key_chunk must be positive")
    chosen = choose_backend("cosine_topk", query.device, backend)
    external = external_backend("cosine_topk", chosen)
    if external is not None:
        return external(query=query, keys=keys, k=k, largest=largest, normalized=normalized,
                        query_chunk=query_chunk, key_chunk=key_chunk)
    if query.dtype != keys.dtype:
        keys = keys.to(query.dtype)
    if not normalized:
        query = F.normalize(query, dim=1)
        keys = F.normalize(keys, dim=1)
    n_query = query.shape[0]
    values = torch.empty(n_query, k, dtype=torch.float32, device=query.device)
    indices = torch.empty(n_query, k, dtype=torch.int64, device=query.device)
    if n_query == 0 or k == 0:
        return values, indices
    if chosen == "triton":
        from fastbd.kernels import cosine as kernel

        unsupported = _triton_topk_unsupported(k, query, kernel.MAX_K)
        if unsupported and backend == "triton":
            raise ValueError(f"the triton backend of cosine_topk {unsupported}; use "
                             "backend='torch'")
        if unsupported:
            log.debug("cosine_topk: FASTBD_BACKEND=triton %s, using torch", unsupported)
            chosen = "torch"
    if chosen == "triton":
        name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
        config = (kernel.TOPK_INTERPRETER_CONFIG if query.device.type == "cpu"
                  else kernel.TOPK_CONFIGS[name[query.dtype]])
        kernel.launch_topk(_unit_inner(query), _unit_inner(keys), values, indices, k, largest,
                           config)
        return values, indices
    for q0 in range(0, n_query, query_chunk):
        block = query[q0:q0 + query_chunk]
        best_v = best_i = None
        for k0 in range(0, keys.shape[0], key_chunk):
            v, i = _chunk_topk_torch(block, keys[k0:k0 + key_chunk], k, largest)
            i += k0
            if best_v is None:
                best_v, best_i = v, i
            else:
                pooled = torch.cat([best_v, v], 1)
                merged_v, pos = pooled.topk(min(k, pooled.shape[1]), dim=1, largest=largest)
                best_i = torch.gather(torch.cat([best_i, i], 1), 1, pos)
                best_v = merged_v
        values[q0:q0 + query_chunk] = best_v
        indices[q0:q0 + query_chunk] = best_i
    return values, indices


def _chunk_topk_torch(query: torch.Tensor, keys: torch.Tensor, k: int, largest: bool
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-min(k, chunk) of one similarity tile, sorted: float32 and int64 ``q×k'``."""
    sims = (query @ keys.T).float()
    return sims.topk(min(k, sims.shape[1]), dim=1, largest=largest)


def pair_cosine(a: torch.Tensor, b: torch.Tensor, *, eps: float = 1e-8,
                backend: str | None = None, validate: bool = True) -> torch.Tensor:
    """Cosine of each row pair: float32 ``N`` with ``a_i·b_i / (max(|a_i|, eps)·max(|b_i|, eps))``.

    Args:
        a, b: float ``N×D`` each (e.g. image and caption embeddings of N pairs).
        validate: check for NaN/Inf (a host sync); False skips it (then unspecified results).

    Example:
        >>> import torch
        >>> from fastbd.ops import pair_cosine
        >>> pair_cosine(torch.tensor([[1.0, 0.0], [1.0, 1.0]]),
        ...             torch.tensor([[2.0, 0.0], [0.0, -3.0]]))
        tensor([ 1.0000, -0.7071])
    """
    _check_pair("a", a, "b", b, validate)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"a has {a.shape[0]} rows but b has {b.shape[0]}")
    chosen = choose_backend("pair_cosine", a.device, backend)
    external = external_backend("pair_cosine", chosen)
    if external is not None:
        return external(a=a, b=b, eps=eps)
    out = torch.empty(a.shape[0], dtype=torch.float32, device=a.device)
    if a.shape[0] == 0:
        return out
    if chosen == "triton":
        if a.device.type == "cpu" and torch.bfloat16 in (a.dtype, b.dtype):
            raise TypeError("the Triton interpreter has no bfloat16; use float32/float16 on CPU")
        from fastbd.kernels import cosine as kernel

        kernel.launch(_unit_inner(a), _unit_inner(b), out, eps)
        return out
    if chosen == "cupy":
        import cupy

        ca = cupy.from_dlpack(_cupy_ready(a)).astype(cupy.float32)
        cb = cupy.from_dlpack(_cupy_ready(b)).astype(cupy.float32)
        denom = (cupy.maximum(cupy.linalg.norm(ca, axis=1), eps)
                 * cupy.maximum(cupy.linalg.norm(cb, axis=1), eps))
        return torch.from_dlpack((ca * cb).sum(axis=1) / denom)
    af, bf = a.float(), b.float()
    denom = af.norm(dim=1).clamp_min(eps) * bf.norm(dim=1).clamp_min(eps)
    return torch.mul(af, bf).sum(1).div_(denom)


def _cupy_ready(x: torch.Tensor) -> torch.Tensor:
    """``x`` as CuPy can take it through DLPack: contiguous, bfloat16 upcast to float32 (CuPy
    ≤ 13 cannot import bfloat16 at all, CuPy 14 only with ml_dtypes)."""
    return (x.float() if x.dtype == torch.bfloat16 else x).contiguous()


def _unit_inner(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(1) == 1 else x.contiguous()
