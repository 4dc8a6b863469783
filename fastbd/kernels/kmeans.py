"""Fused k-means assignment: distance + argmin per row without writing the N×K matrix."""

import triton
import triton.language as tl

# Tile shapes (rows, centroids, feature chunk); tl.dot needs every side ≥ 16.
DEFAULT_CONFIG = {"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_D": 32, "num_warps": 4}
INTERPRETER_CONFIG = {"BLOCK_N": 16, "BLOCK_K": 16, "BLOCK_D": 16, "num_warps": 1}


@triton.jit
def kmeans_assign_kernel(
    x_ptr,       # [N, D] features (float32/float16/bfloat16), row stride sx
    c_ptr,       # [K, D] centroids, same dtype, row stride sc
    cnorm_ptr,   # float32 [K]: ||c||² (L2) — ignored for cosine
    label_ptr,   # int64 [N]: out, index of the nearest centroid
    score_ptr,   # float32 [N]: out, best score (L2: ||c||² − 2x·c; cosine: −x·c)
    N, K, D, sx, sc,
    L2: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    dims = tl.arange(0, BLOCK_D)
    best = tl.full((BLOCK_N,), float("inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_N,), tl.int64)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d_ok = (d0 + dims) < D
            xt = tl.load(x_ptr + rows[:, None].to(tl.int64) * sx + d0 + dims[None, :],
                         mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            ct = tl.load(c_ptr + cols[None, :].to(tl.int64) * sc + d0 + dims[:, None],
                         mask=col_ok[None, :] & d_ok[:, None], other=0.0)
            acc = tl.dot(xt, ct, acc)
        if L2:
            score = tl.load(cnorm_ptr + cols, mask=col_ok, other=0.0)[None, :] - 2.0 * acc
        else:
            score = -acc
        score = tl.where(col_ok[None, :], score, float("inf"))
        tile_best = tl.min(score, 1)
        tile_idx = tl.argmin(score, 1).to(tl.int64) + k0
        better = tile_best < best
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, tile_idx, best_idx)
    tl.store(label_ptr + rows, best_idx, mask=row_ok)
    tl.store(score_ptr + rows, best, mask=row_ok)


def launch(x, centroids, centroid_sq_norms, labels, scores, l2, config):
    """Grid ``cdiv(N, BLOCK_N)``; ``x``/``centroids`` need unit stride along D."""
    n, d = x.shape
    k = centroids.shape[0]
    grid = (triton.cdiv(n, config["BLOCK_N"]),)
    kmeans_assign_kernel[grid](
        x, centroids, centroid_sq_norms, labels, scores, n, k, d, x.stride(0),
        centroids.stride(0), L2=l2, BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
        BLOCK_D=config["BLOCK_D"], num_warps=config["num_warps"],
    )


def compile_variants() -> list[tuple[str, dict, dict]]:
    """Every launch ``fastbd.ops.kmeans_assign`` makes on CUDA, as (name, signature,
    constexprs): L2 and cosine × float32/float16/bfloat16 features, ``DEFAULT_CONFIG`` tiles
    (``num_warps`` in the constexprs dict under that key, for the compiler options)."""
    variants = []
    for l2 in (False, True):
        for dtype in ("fp32", "fp16", "bf16"):
            signature = {"x_ptr": f"*{dtype}", "c_ptr": f"*{dtype}", "cnorm_ptr": "*fp32",
                         "label_ptr": "*i64", "score_ptr": "*fp32", "N": "i32", "K": "i32",
                         "D": "i32", "sx": "i32", "sc": "i32", "L2": "constexpr",
                         "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
                         "BLOCK_D": "constexpr"}
            constexprs = {"L2": l2, **{k: v for k, v in DEFAULT_CONFIG.items()
                                      if k.startswith("BLOCK")}}
            variants.append((f"kmeans_assign l2={int(l2)} x={dtype}", signature,
                             {**constexprs, "num_warps": DEFAULT_CONFIG["num_warps"]}))
    return variants
