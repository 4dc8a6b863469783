"""Fused window masking + normalisation into encoder input (see ``fastbd.ops.mask_fill``)."""

import triton
import triton.language as tl

FULL = 0
INTERVAL = 1
RANDOM = 2


@triton.jit
def mask_fill_kernel(
    image_ptr,    # uint8 or float32 (0–255 units) [N, C, S, S], contiguous: the image bank
    index_ptr,    # int64 [n]: bank row of each masked image
    pos_ptr,      # int64 [n*m, 2]: window top-left (y, x), already reduced mod S
    pattern_ptr,  # uint8 [n*m, NB*NB]: 1 = block masked (RANDOM only; any pointer otherwise)
    scale_ptr,    # float32 [C]: 1 / (255 std)
    bias_ptr,     # float32 [C]: -mean / std
    out_ptr,      # float32/float16/bfloat16 [n*m, C, S, S] with strides (so_n, so_c, so_h, so_w)
    m, C, S, window, NB, fill,
    so_n, so_c, so_h, so_w,
    STRATEGY: tl.constexpr,
    BLOCK_SIDE: tl.constexpr,  # the checkerboard/random block side (1 for FULL): a constant,
                               # so dividing by it compiles to a multiply and a shift
    ROWS: tl.constexpr,     # image rows per program
    WIDTH: tl.constexpr,    # a power of two ≥ S: the columns of a row tile
):
    # One program writes ROWS full rows of one channel of one masked view. Rows and columns
    # come from the 2-D tile directly, so no pixel pays a division by S; window offsets wrap
    # with a compare-and-add instead of a modulo; all per-pixel arithmetic is 32-bit.
    view = tl.program_id(0)
    chan = tl.program_id(1)
    row = tl.program_id(2) * ROWS + tl.arange(0, ROWS)[:, None]
    col = tl.arange(0, WIDTH)[None, :]
    inside_image = (row < S) & (col < S)

    bank_row = tl.load(index_ptr + view // m)
    src = image_ptr + (bank_row * C + chan) * S * S + row * S + col
    value = tl.load(src, mask=inside_image, other=0).to(tl.float32)
    value = value * tl.load(scale_ptr + chan) + tl.load(bias_ptr + chan)

    y0 = tl.load(pos_ptr + view.to(tl.int64) * 2).to(tl.int32)
    x0 = tl.load(pos_ptr + view.to(tl.int64) * 2 + 1).to(tl.int32)
    dy = row - y0
    dy = tl.where(dy < 0, dy + S, dy)
    dx = col - x0
    dx = tl.where(dx < 0, dx + S, dx)
    masked = (dy < window) & (dx < window)
    if STRATEGY == 1:
        masked = masked & ((dy // BLOCK_SIDE + dx // BLOCK_SIDE) % 2 == 0)
    if STRATEGY == 2:
        pattern_row = pattern_ptr + view.to(tl.int64) * NB * NB  # one base per program
        block_id = (dy // BLOCK_SIDE) * NB + dx // BLOCK_SIDE
        hit = tl.load(pattern_row + block_id, mask=masked & inside_image, other=0)
        masked = masked & (hit != 0)
    value = tl.where(masked, fill, value)

    dst = out_ptr + view.to(tl.int64) * so_n + chan * so_c + row * so_h + col * so_w
    tl.store(dst, value.to(out_ptr.dtype.element_ty), mask=inside_image)


def tile_shape(size: int, pixels: int = 1024) -> tuple[int, int]:
    """(rows per program, row width) for ``size``-px images: the width a power of two ≥ size,
    rows filling about ``pixels`` lanes (at least one)."""
    width = triton.next_power_of_2(size)
    return max(1, pixels // width), width


def launch(images, index, positions, pattern, scale, bias, out, m, window, block, n_blocks,
           fill, strategy):
    """Launch over grid ``(n*m, C, cdiv(S, rows))``; tensors as in the kernel."""
    views, channels, size = out.shape[0], images.shape[1], images.shape[-1]
    rows, width = tile_shape(size)
    grid = (views, channels, triton.cdiv(size, rows))
    mask_fill_kernel[grid](
        images, index, positions, pattern, scale, bias, out,
        m, channels, size, window, n_blocks, fill,
        *out.stride(),
        STRATEGY=strategy, BLOCK_SIDE=block, ROWS=rows, WIDTH=width,
    )

OUT_DTYPES = ("fp32", "fp16", "bf16")


def compile_variants() -> list[tuple[str, dict, dict]]:
    """Every launch ``fastbd.ops.mask_fill`` makes on CUDA, as (name, signature, constexprs)
    for compiling without a GPU: uint8 or float32 (differentiable) images × the three
    strategies × the three output dtypes at 224 px with the paper's 10-px blocks (the pattern
    pointer is the positions' int64 one unless the strategy is RANDOM; Python ints below 2³¹
    arrive as i32)."""
    variants = []
    for image in ("u8", "fp32"):
        for strategy in (FULL, INTERVAL, RANDOM):
            for dtype in OUT_DTYPES:
                signature = {
                    "image_ptr": f"*{image}", "index_ptr": "*i64", "pos_ptr": "*i64",
                    "pattern_ptr": "*u8" if strategy == RANDOM else "*i64",
                    "scale_ptr": "*fp32", "bias_ptr": "*fp32", "out_ptr": f"*{dtype}",
                    "m": "i32", "C": "i32", "S": "i32", "window": "i32", "NB": "i32",
                    "fill": "fp32", "so_n": "i32", "so_c": "i32", "so_h": "i32", "so_w": "i32",
                    "STRATEGY": "constexpr", "BLOCK_SIDE": "constexpr", "ROWS": "constexpr",
                    "WIDTH": "constexpr"}
                rows, width = tile_shape(224)
                name = f"mask_fill strategy={strategy} out={dtype}"
                variants.append((name if image == "u8" else f"{name} in=fp32", signature,
                                 {"STRATEGY": strategy,
                                  "BLOCK_SIDE": 1 if strategy == FULL else 10,
                                  "ROWS": rows, "WIDTH": width}))
    return variants
