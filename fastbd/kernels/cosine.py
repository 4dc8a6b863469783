"""Row-wise cosine similarity of paired rows in one pass (see ``fastbd.ops.pair_cosine``)."""

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


def compile_variants() -> list[tuple[str, dict, dict]]:
    """Every launch ``fastbd.ops.pair_cosine`` makes on CUDA, as (name, signature,
    constexprs): float32/float16/bfloat16 rows, the launch's default blocks."""
    return [(f"pair_cosine x={dtype}",
             {"a_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "out_ptr": "*fp32", "N": "i32",
              "D": "i32", "sa": "i32", "sb": "i32", "eps": "fp32", "BLOCK_N": "constexpr",
              "BLOCK_D": "constexpr"}, {"BLOCK_N": 16, "BLOCK_D": 64})
            for dtype in ("fp32", "fp16", "bf16")]
