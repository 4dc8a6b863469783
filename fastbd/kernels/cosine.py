"""Cosine kernels: row-wise cosine of paired rows in one pass (``fastbd.ops.pair_cosine``) and a
fused top-k search (``fastbd.ops.cosine_topk``) that never writes the similarity matrix."""

import triton
import triton.language as tl


@triton.jit
def pair_cosine_kernel(
    a_ptr,    # [N, D] float, row stride sa, unit stride along D
    b_ptr,    # [N, D] float, row stride sb, unit stride along D
    out_ptr,  # float32 [N]: cos(a_i, b_i)
    N, D, sa, sb, eps,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    dims = tl.arange(0, BLOCK_D)
    dot = tl.zeros((BLOCK_N,), tl.float32)
    norm_a = tl.zeros((BLOCK_N,), tl.float32)
    norm_b = tl.zeros((BLOCK_N,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ok = row_ok[:, None] & ((d0 + dims) < D)[None, :]
        a = tl.load(a_ptr + rows[:, None].to(tl.int64) * sa + d0 + dims[None, :], mask=ok,
                    other=0.0).to(tl.float32)
        b = tl.load(b_ptr + rows[:, None].to(tl.int64) * sb + d0 + dims[None, :], mask=ok,
                    other=0.0).to(tl.float32)
        dot += tl.sum(a * b, 1)
        norm_a += tl.sum(a * a, 1)
        norm_b += tl.sum(b * b, 1)
    denom = tl.maximum(tl.sqrt(norm_a), eps) * tl.maximum(tl.sqrt(norm_b), eps)
    tl.store(out_ptr + rows, dot / denom, mask=row_ok)


def launch(a, b, out, eps, block_n=16, block_d=64):
    """Grid ``cdiv(N, block_n)``."""
    n, d = a.shape
    grid = (triton.cdiv(n, block_n),)
    pair_cosine_kernel[grid](a, b, out, n, d, a.stride(0), b.stride(0), eps, BLOCK_N=block_n,
                             BLOCK_D=block_d)


_TOPK_16_BIT = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 32, "num_warps": 8, "maxnreg": 255}
TOPK_CONFIGS = {"fp32": {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_D": 16, "num_warps": 8,
                         "maxnreg": 255},
                "fp16": _TOPK_16_BIT, "bf16": _TOPK_16_BIT}
"""Top-k tiles on CUDA by input dtype (query rows, key rows, feature chunk; warps and the
register cap as launch options). Every program streams all keys, so the key traffic is
NQ / BLOCK_M passes over them: BLOCK_M is the largest that compiles without spills for sm_80 and
sm_90 at every K_PAD and alignment (``bench/kernel_compile.py``): 16-bit inputs take 64 rows
(128 spills at K_PAD 64); float32 takes 32 because its product is IEEE float32 on the FMA units
(as torch's matmul, not TF32), whose operands need more registers. Without the explicit cap of
255 registers ptxas holds some sm_80 variants to 80 or 128 registers for occupancy and spills.
tl.dot needs every side ≥ 16, and BLOCK_N bounds K_PAD."""
TOPK_INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 16, "num_warps": 1}
MAX_K = 64
"""The largest k the fused kernel takes (larger k: the torch backend)."""


@triton.jit
def _order_key(values, cols, LARGEST: tl.constexpr):
    """int64 keys whose order is the search order: the similarity (negated for the smallest)
    mapped monotonically to int32 in the high word, 2³¹ − 1 − column in the low word, so equal
    similarities prefer the lower column."""
    v = values if LARGEST else -values
    bits = v.to(tl.int32, bitcast=True)
    monotone = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (monotone.to(tl.int64) << 32) | (2147483647 - cols).to(tl.int64)


@triton.jit
def cosine_topk_kernel(
    q_ptr,      # [NQ, D] unit rows (float32/float16/bfloat16), row stride sq, unit stride in D
    k_ptr,      # [NK, D] unit rows, same dtype, row stride sk
    val_ptr,    # float32 [NQ, TOPK]: out, the top similarities (sorted)
    idx_ptr,    # int64 [NQ, TOPK]: out, their key rows
    NQ, NK, D, sq, sk, TOPK,
    LARGEST: tl.constexpr,
    K_PAD: tl.constexpr,     # a power of two ≥ TOPK (and ≤ BLOCK_N)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program keeps a running top-K_PAD of BLOCK_M query rows while it walks every key
    # tile: a tensor-core tile product, the tile's own top-K_PAD, merged with the running one.
    # Only NQ × TOPK results are written; the NQ × NK similarities never leave the registers.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < NQ
    dims = tl.arange(0, BLOCK_D)
    best = tl.full((BLOCK_M, K_PAD), -9223372036854775807 - 1, tl.int64)
    for n0 in range(0, NK, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < NK
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d_ok = (d0 + dims) < D
            qt = tl.load(q_ptr + rows[:, None].to(tl.int64) * sq + d0 + dims[None, :],
                         mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            kt = tl.load(k_ptr + cols[None, :].to(tl.int64) * sk + d0 + dims[:, None],
                         mask=col_ok[None, :] & d_ok[:, None], other=0.0)
            if q_ptr.dtype.element_ty == tl.float32:
                acc = tl.dot(qt, kt, acc, input_precision="ieee")  # float32, as torch's matmul
            else:
                acc = tl.dot(qt, kt, acc)
        keys = _order_key(acc, cols, LARGEST)
        keys = tl.where(col_ok[None, :], keys, -9223372036854775807 - 1)
        tile_best = tl.topk(keys, K_PAD, dim=1)
        both = tl.reshape(tl.join(best, tile_best), (BLOCK_M, 2 * K_PAD))
        best = tl.topk(both, K_PAD, dim=1)
    high = (best >> 32).to(tl.int32)
    bits = high ^ ((high >> 31) & 0x7FFFFFFF)
    values = bits.to(tl.float32, bitcast=True)
    if not LARGEST:
        values = -values
    index = 2147483647 - (best & 0xFFFFFFFF)
    slots = tl.arange(0, K_PAD)
    out = rows[:, None].to(tl.int64) * TOPK + slots[None, :]
    keep = row_ok[:, None] & (slots[None, :] < TOPK)
    tl.store(val_ptr + out, values, mask=keep)
    tl.store(idx_ptr + out, index, mask=keep)


def launch_topk(query, keys, values, indices, k, largest, config):
    """Grid ``cdiv(NQ, BLOCK_M)``; ``query``/``keys`` unit rows with unit stride along D."""
    nq, d = query.shape
    k_pad = max(1, triton.next_power_of_2(k))
    options = {name: config[name] for name in ("num_warps", "maxnreg") if name in config}
    grid = (triton.cdiv(nq, config["BLOCK_M"]),)
    cosine_topk_kernel[grid](
        query, keys, values, indices, nq, keys.shape[0], d, query.stride(0), keys.stride(0), k,
        LARGEST=largest, K_PAD=k_pad, BLOCK_M=config["BLOCK_M"],
        BLOCK_N=max(config["BLOCK_N"], k_pad), BLOCK_D=config["BLOCK_D"], **options,
    )


def compile_variants() -> list[tuple[str, dict, dict]]:
    """Every launch ``fastbd.ops.pair_cosine`` makes on CUDA, as (name, signature,
    constexprs): float32/float16/bfloat16 rows, the launch's default blocks."""
    return [(f"pair_cosine x={dtype}",
             {"a_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "out_ptr": "*fp32", "N": "i32",
              "D": "i32", "sa": "i32", "sb": "i32", "eps": "fp32", "BLOCK_N": "constexpr",
              "BLOCK_D": "constexpr"}, {"BLOCK_N": 16, "BLOCK_D": 64})
            for dtype in ("fp32", "fp16", "bf16")]


def compile_topk_variants() -> list[tuple[str, dict, dict]]:
    """Every launch ``fastbd.ops.cosine_topk(backend="triton")`` makes on CUDA: largest and
    smallest × float32/float16/bfloat16 × every K_PAD (the powers of two up to MAX_K)."""
    k_pads = [2 ** p for p in range(MAX_K.bit_length())]
    return [(f"cosine_topk largest={int(largest)} x={dtype} k_pad={k_pad}",
             {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "val_ptr": "*fp32",
              "idx_ptr": "*i64", "NQ": "i32", "NK": "i32", "D": "i32", "sq": "i32",
              "sk": "i32", "TOPK": "i32", "LARGEST": "constexpr", "K_PAD": "constexpr",
              "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"},
             {"LARGEST": largest, "K_PAD": k_pad, **TOPK_CONFIGS[dtype]})
            for largest in (True, False) for dtype in TOPK_CONFIGS for k_pad in k_pads]
