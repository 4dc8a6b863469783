"""Batched trigger pasting (optional bilinear resize, alpha) into encoder input or uint8."""

import triton
import triton.language as tl


@triton.jit
def _patch_sample(base_ptr, u, v, ph, pw, th, tw, stride_h, inside, RESIZE: tl.constexpr):
    """Patch value at target pixel (u, v) of a th×tw paste; bilinear when RESIZE (align_corners
    False, like torch's interpolate)."""
    if RESIZE:
        sy = tl.maximum((u.to(tl.float32) + 0.5) * (ph.to(tl.float32) / th) - 0.5, 0.0)
        sx = tl.maximum((v.to(tl.float32) + 0.5) * (pw.to(tl.float32) / tw) - 0.5, 0.0)
        y0 = sy.to(tl.int32)
        x0 = sx.to(tl.int32)
        wy = sy - y0
        wx = sx - x0
        y1 = tl.minimum(y0 + 1, ph - 1)
        x1 = tl.minimum(x0 + 1, pw - 1)
        p00 = tl.load(base_ptr + y0 * stride_h + x0, mask=inside, other=0).to(tl.float32)
        p01 = tl.load(base_ptr + y0 * stride_h + x1, mask=inside, other=0).to(tl.float32)
        p10 = tl.load(base_ptr + y1 * stride_h + x0, mask=inside, other=0).to(tl.float32)
        p11 = tl.load(base_ptr + y1 * stride_h + x1, mask=inside, other=0).to(tl.float32)
        top = p00 * (1.0 - wx) + p01 * wx
        bottom = p10 * (1.0 - wx) + p11 * wx
        return top * (1.0 - wy) + bottom * wy
    else:
        return tl.load(base_ptr + u * stride_h + v, mask=inside, other=0).to(tl.float32)


@triton.jit
def paste_kernel(
    image_ptr,       # uint8 or float32 (0–255 units) [N, C, S, S] contiguous: backgrounds
    patch_ptr,       # uint8 or float32 [P, C, HP, WP] contiguous: padded patches
    alpha_ptr,       # float32 [P, HP, WP] contiguous: per-pixel opacity (HAS_ALPHA only)
    patch_size_ptr,  # int32 [P, 2]: true (h, w) of each patch inside its padding
    job_ptr,         # int64 [J, 6]: (image, patch, y, x, target h, target w) per output
    scale_ptr,       # float32 [C]: 1 / (255 std)  (NORMALISE only)
    bias_ptr,        # float32 [C]: -mean / std   (NORMALISE only)
    out_ptr,         # [J, C, S, S] with strides (so_n, so_c, so_h, so_w): float or uint8
    C, S, HP, WP, opacity,
    so_n, so_c, so_h, so_w,
    RESIZE: tl.constexpr,
    HAS_ALPHA: tl.constexpr,
    NORMALISE: tl.constexpr,
    ROWS: tl.constexpr,     # image rows per program
    WIDTH: tl.constexpr,    # a power of two ≥ S: the columns of a row tile
):
    # One program writes ROWS full rows of one channel of one job: rows and columns come from
    # the 2-D tile (no per-pixel division by S), per-pixel offsets are 32-bit.
    job = tl.program_id(0).to(tl.int64)
    chan = tl.program_id(1)
    row = tl.program_id(2) * ROWS + tl.arange(0, ROWS)[:, None]
    col = tl.arange(0, WIDTH)[None, :]
    in_image = (row < S) & (col < S)

    image = tl.load(job_ptr + job * 6)
    patch = tl.load(job_ptr + job * 6 + 1)
    y = tl.load(job_ptr + job * 6 + 2).to(tl.int32)
    x = tl.load(job_ptr + job * 6 + 3).to(tl.int32)
    th = tl.load(job_ptr + job * 6 + 4).to(tl.int32)
    tw = tl.load(job_ptr + job * 6 + 5).to(tl.int32)
    ph = tl.load(patch_size_ptr + patch * 2)
    pw = tl.load(patch_size_ptr + patch * 2 + 1)

    background = tl.load(image_ptr + (image * C + chan) * S * S + row * S + col,
                         mask=in_image, other=0).to(tl.float32)
    u = row - y
    v = col - x
    inside = in_image & (u >= 0) & (u < th) & (v >= 0) & (v < tw)
    u = tl.where(inside, u, 0)
    v = tl.where(inside, v, 0)
    patch_base = patch_ptr + (patch * C + chan) * HP * WP
    front = _patch_sample(patch_base, u, v, ph, pw, th, tw, WP, inside, RESIZE)
    weight = tl.where(inside, opacity, 0.0)
    if HAS_ALPHA:
        weight = weight * _patch_sample(alpha_ptr + patch * HP * WP, u, v, ph, pw, th, tw, WP,
                                        inside, RESIZE)
    value = background * (1.0 - weight) + front * weight

    dst = out_ptr + job * so_n + chan * so_c + row * so_h + col * so_w
    if NORMALISE:
        value = value * tl.load(scale_ptr + chan) + tl.load(bias_ptr + chan)
        tl.store(dst, value.to(out_ptr.dtype.element_ty), mask=in_image)
    else:
        value = tl.minimum(tl.maximum(tl.floor(value + 0.5), 0.0), 255.0)
        tl.store(dst, value.to(tl.uint8), mask=in_image)


def tile_shape(size: int, pixels: int = 1024) -> tuple[int, int]:
    """(rows per program, row width) for ``size``-px images: the width a power of two ≥ size,
    rows filling about ``pixels`` lanes (at least one)."""
    width = triton.next_power_of_2(size)
    return max(1, pixels // width), width


def launch(images, patches, alpha, patch_sizes, jobs, scale, bias, out, opacity, resize,
           normalise):
    """Launch over grid ``(J, C, cdiv(S, rows))``; tensors as in the kernel."""
    n_jobs, channels, size = out.shape[0], images.shape[1], images.shape[-1]
    rows, width = tile_shape(size)
    grid = (n_jobs, channels, triton.cdiv(size, rows))
    paste_kernel[grid](
        images, patches, alpha if alpha is not None else scale, patch_sizes, jobs, scale, bias,
        out, channels, size, patches.shape[2], patches.shape[3], opacity,
        *out.stride(),
        RESIZE=resize, HAS_ALPHA=alpha is not None, NORMALISE=normalise, ROWS=rows,
        WIDTH=width,
    )


def compile_variants() -> list[tuple[str, dict, dict]]:
    """Every launch ``fastbd.ops.paste`` makes on CUDA, as (name, signature, constexprs): resize
    on/off × alpha on/off × uint8 images and patches into float32/float16/bfloat16
    (normalised) or uint8, and float32 (differentiable) images and/or patches into the
    normalised outputs."""
    inputs = [("u8", "u8"), ("u8", "fp32"), ("fp32", "u8"), ("fp32", "fp32")]
    variants = []
    for resize in (False, True):
        for alpha in (False, True):
            for image, patch in inputs:
                outs = [("fp32", True), ("fp16", True), ("bf16", True)]
                if (image, patch) == ("u8", "u8"):
                    outs.append(("u8", False))
                for out, normalise in outs:
                    signature = {
                        "image_ptr": f"*{image}", "patch_ptr": f"*{patch}",
                        "alpha_ptr": "*fp32", "patch_size_ptr": "*i32", "job_ptr": "*i64",
                        "scale_ptr": "*fp32", "bias_ptr": "*fp32", "out_ptr": f"*{out}",
                        "C": "i32", "S": "i32", "HP": "i32", "WP": "i32", "opacity": "fp32",
                        "so_n": "i32", "so_c": "i32", "so_h": "i32", "so_w": "i32",
                        "RESIZE": "constexpr", "HAS_ALPHA": "constexpr",
                        "NORMALISE": "constexpr", "ROWS": "constexpr", "WIDTH": "constexpr"}
                    rows, width = tile_shape(224)
                    name = f"paste resize={int(resize)} alpha={int(alpha)} out={out}"
                    if (image, patch) != ("u8", "u8"):
                        name += f" in={image}/{patch}"
                    variants.append((name, signature,
                                     {"RESIZE": resize, "HAS_ALPHA": alpha,
                                      "NORMALISE": normalise, "ROWS": rows, "WIDTH": width}))
    return variants
