"""Fused window masking + normalisation into encoder input (see ``fastbd.ops.mask_fill``)."""

import triton
import triton.language as tl

FULL = 0
INTERVAL = 1
RANDOM = 2


@triton.jit
def mask_fill_kernel(
    image_ptr,    # uint8 [N, C, S, S], contiguous: the image bank
    index_ptr,    # int64 [n]: bank row of each masked image
    pos_ptr,      # int64 [n*m, 2]: window top-left (y, x), already reduced mod S
    pattern_ptr,  # uint8 [n*m, NB*NB]: 1 = block masked (RANDOM only; any pointer otherwise)
    scale_ptr,    # float32 [C]: 1 / (255 std)
    bias_ptr,     # float32 [C]: -mean / std
    out_ptr,      # float32/float16/bfloat16 [n*m, C, S, S] with strides (so_n, so_c, so_h, so_w)
    m, C, S, window, block, NB, fill,
    so_n, so_c, so_h, so_w,
    STRATEGY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    view = tl.program_id(0).to(tl.int64)   # masked image n*m index
    chan = tl.program_id(1)
    pix = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    inside_image = pix < S * S
    row = pix // S
    col = pix % S

    bank_row = tl.load(index_ptr + view // m)
    src = image_ptr + (bank_row * C + chan) * S * S + pix
    value = tl.load(src, mask=inside_image, other=0).to(tl.float32)
    value = value * tl.load(scale_ptr + chan) + tl.load(bias_ptr + chan)

    y0 = tl.load(pos_ptr + view * 2)
    x0 = tl.load(pos_ptr + view * 2 + 1)
    dy = (row - y0 + S) % S
    dx = (col - x0 + S) % S
    masked = (dy < window) & (dx < window)
    if STRATEGY == 1:
        masked = masked & ((dy // block + dx // block) % 2 == 0)
    if STRATEGY == 2:
        block_id = (dy // block) * NB + dx // block
        hit = tl.load(pattern_ptr + view * NB * NB + block_id, mask=masked & inside_image, other=0)
        masked = masked & (hit != 0)
    value = tl.where(masked, fill, value)

    dst = out_ptr + view * so_n + chan * so_c + row * so_h + col * so_w
    tl.store(dst, value.to(out_ptr.dtype.element_ty), mask=inside_image)


def launch(images, index, positions, pattern, scale, bias, out, m, window, block, n_blocks,
           fill, strategy, block_size=1024):
    """Launch over grid ``(n*m, C, cdiv(S*S, block_size))``; tensors as in the kernel."""
    views, channels, size = out.shape[0], images.shape[1], images.shape[-1]
    grid = (views, channels, triton.cdiv(size * size, block_size))
    mask_fill_kernel[grid](
        images, index, positions, pattern, scale, bias, out,
        m, channels, size, window, block, n_blocks, fill,
        *out.stride(),
        STRATEGY=strategy, BLOCK=block_size,
    )
