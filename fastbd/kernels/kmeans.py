"""Fused k-means assignment: distance + argmin per row without writing the N×K matrix."""

import triton
import triton.language as tl

TUNING_CONFIGS = {
    "16-bit": [{"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_D": 32, "num_warps": 4},
               {"BLOCK_N": 128, "BLOCK_K": 64, "BLOCK_D": 32, "num_warps": 8},
               {"BLOCK_N": 128, "BLOCK_K": 128, "BLOCK_D": 32, "num_warps": 8}],
    "fp32": [{"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_D": 16, "num_warps": 4},
             {"BLOCK_N": 32, "BLOCK_K": 64, "BLOCK_D": 16, "num_warps": 4}],
}
"""The tiles (rows, centroids, feature chunk, warps) Triton's autotuner times on CUDA, once per
(K, D, dtype) and cached on disk: every one compiles without spills for sm_80 and sm_90, aligned
or not (``bench/kernel_compile.py``). Larger row tiles re-read the centroids fewer times (the
key traffic is N / BLOCK_N passes over them); float32 is an IEEE float32 product on the FMA
units (as torch's matmul, not TF32), whose operands need more registers, so its tiles are
smaller. 128 × 256, 256 × 128 and 64-wide feature chunks spill. tl.dot needs every side ≥ 16."""
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
            if x_ptr.dtype.element_ty == tl.float32:
                acc = tl.dot(xt, ct, acc, input_precision="ieee")  # float32, as torch's matmul
            else:
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


_TUNED: dict = {}


def _tuned_kernels() -> dict:
    """One autotuner per dtype family, built on first use (CUDA only)."""
    if not _TUNED:
        for family, configs in TUNING_CONFIGS.items():
            _TUNED[family] = triton.autotune(
                [triton.Config({k: v for k, v in c.items() if k.startswith("BLOCK")},
                               num_warps=c["num_warps"]) for c in configs],
                key=["K", "D"], cache_results=True)(kmeans_assign_kernel)
    return _TUNED


def launch(x, centroids, centroid_sq_norms, labels, scores, l2, config=None):
    """Grid ``cdiv(N, BLOCK_N)``; ``x``/``centroids`` need unit stride along D. ``config``: one
    tile (the interpreter's); None: the autotuned tile for this (K, D, dtype)."""
    n, d = x.shape
    k = centroids.shape[0]
    args = (x, centroids, centroid_sq_norms, labels, scores, n, k, d, x.stride(0),
            centroids.stride(0))
    if config is None:
        family = "fp32" if x.element_size() == 4 else "16-bit"
        _tuned_kernels()[family][lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](*args, L2=l2)
        return
    kmeans_assign_kernel[(triton.cdiv(n, config["BLOCK_N"]),)](
        *args, L2=l2, BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
        BLOCK_D=config["BLOCK_D"], num_warps=config["num_warps"],
    )


def compile_variants() -> list[tuple[str, dict, dict]]:
    """Every launch ``fastbd.ops.kmeans_assign`` can make on CUDA, as (name, signature,
    constexprs): L2 and cosine × float32/float16/bfloat16 features × every tile the autotuner
    may choose for that dtype (``num_warps`` in the constexprs dict, for the compiler options)."""
    variants = []
    for l2 in (False, True):
        for dtype in ("fp32", "fp16", "bf16"):
            signature = {"x_ptr": f"*{dtype}", "c_ptr": f"*{dtype}", "cnorm_ptr": "*fp32",
                         "label_ptr": "*i64", "score_ptr": "*fp32", "N": "i32", "K": "i32",
                         "D": "i32", "sx": "i32", "sc": "i32", "L2": "constexpr",
                         "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
                         "BLOCK_D": "constexpr"}
            for c in TUNING_CONFIGS["fp32" if dtype == "fp32" else "16-bit"]:
                tile = f"{c['BLOCK_N']}x{c['BLOCK_K']}x{c['BLOCK_D']}w{c['num_warps']}"
                variants.append((f"kmeans_assign l2={int(l2)} x={dtype} {tile}", signature,
                                 {"L2": l2, **c}))
    return variants
