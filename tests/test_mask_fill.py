import pytest
import torch

from fastbd.ops import mask_fill, random_block_pattern, window_masks

from testutil import CPU_BACKENDS, CUDA_BACKENDS

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def naive_mask_fill(images, index, positions, window, strategy, block, pattern, fill):
    """Per-pixel definition (tiny inputs only): the oracle for the torch reference."""
    n, m = positions.shape[:2]
    _, c, s, _ = images.shape
    mean = torch.tensor(MEAN, dtype=torch.float64)
    std = torch.tensor(STD, dtype=torch.float64)
    out = torch.empty(n * m, c, s, s, dtype=torch.float64)
    for i in range(n):
        base = (images[index[i]].double() / 255 - mean[:, None, None]) / std[:, None, None]
        for j in range(m):
            view = base.clone()
            y0, x0 = positions[i, j].tolist()
            for dy in range(window):
                for dx in range(window):
                    by, bx = dy // block if block else 0, dx // block if block else 0
                    if strategy == "interval" and (by + bx) % 2:
                        continue
                    if strategy == "random" and not pattern[i, j, by, bx]:
                        continue
                    view[:, (y0 + dy) % s, (x0 + dx) % s] = fill
            out[i * m + j] = view
    return out


def make_inputs(gen, n_bank=4, n=3, m=5, size=13, window=7, block=3, strategy="full"):
    images = torch.randint(0, 256, (n_bank, 3, size, size), dtype=torch.uint8, generator=gen)
    positions = torch.randint(-2 * size, 3 * size, (n, m, 2), generator=gen)
    index = torch.randint(0, n_bank, (n,), generator=gen)
    pattern = (random_block_pattern(n, m, window, block, generator=gen)
               if strategy == "random" else None)
    return images, positions, index, pattern


@pytest.mark.parametrize("strategy", ["full", "interval", "random"])
def test_torch_reference_matches_pixel_definition(gen, strategy):
    images, positions, index, pattern = make_inputs(gen, strategy=strategy)
    got = mask_fill(images, positions, 7, MEAN, STD, image_index=index, strategy=strategy,
                    block=3, pattern=pattern, fill=-0.5, backend="torch")
    want = naive_mask_fill(images, index, positions, 7, strategy, 3, pattern, -0.5)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device,backend", CPU_BACKENDS + CUDA_BACKENDS)
@pytest.mark.parametrize("strategy", ["full", "interval", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_backends_match_reference(gen, device, backend, strategy, dtype):
    if device == "cpu" and backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bfloat16")
    images, positions, index, pattern = make_inputs(gen, size=11, window=6, block=2,
                                                    strategy=strategy)
    want = mask_fill(images, positions, 6, MEAN, STD, image_index=index, strategy=strategy,
                     block=2, pattern=pattern, dtype=dtype, backend="torch")
    to = lambda t: None if t is None else t.to(device)
    got = mask_fill(to(images), to(positions), 6, MEAN, STD, image_index=to(index),
                    strategy=strategy, block=2, pattern=to(pattern), dtype=dtype,
                    backend=backend)
    assert got.dtype == dtype and got.device.type == device
    torch.testing.assert_close(got.cpu().float(), want.float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_channels_last_output_and_full_bank(gen, backend):
    images = torch.randint(0, 256, (2, 3, 9, 9), dtype=torch.uint8, generator=gen)
    positions = torch.randint(0, 9, (2, 3, 2), generator=gen)
    out = torch.empty(6, 3, 9, 9).to(memory_format=torch.channels_last)
    got = mask_fill(images, positions, 4, MEAN, STD, out=out, backend=backend)
    assert got.data_ptr() == out.data_ptr()
    want = mask_fill(images, positions, 4, MEAN, STD, backend="torch")
    torch.testing.assert_close(got.contiguous(), want)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("n,m", [(0, 4), (3, 0), (0, 0)])
def test_empty(gen, backend, n, m):
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8, generator=gen)
    positions = torch.zeros(n, m, 2, dtype=torch.int64)
    got = mask_fill(images, positions, 3, MEAN, STD, image_index=torch.zeros(n, dtype=torch.long),
                    backend=backend)
    assert got.shape == (0, 3, 8, 8)


def test_random_pattern_masks_exactly_half(gen):
    pattern = random_block_pattern(4, 6, 10, 3, generator=gen)  # 4×4 blocks
    assert pattern.shape == (4, 6, 4, 4)
    assert bool((pattern.flatten(2).sum(-1) == 8).all())


def test_window_masks_wrap_cyclically():
    masks = window_masks(torch.tensor([[8, 9]]), 3, 10)
    rows, cols = torch.nonzero(masks[0], as_tuple=True)
    assert set(rows.tolist()) == {8, 9, 0} and set(cols.tolist()) == {9, 0, 1}


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(images=torch.zeros(2, 3, 8, 8).half()), TypeError, "images must have dtype"),
    (dict(images=torch.zeros(3, 8, 8, dtype=torch.uint8)), ValueError, "images must have rank"),
    (dict(images=torch.zeros(2, 3, 8, 7, dtype=torch.uint8)), ValueError, "square"),
    (dict(window=9), ValueError, "larger than the image"),
    (dict(window=0), ValueError, "window must be a positive int"),
    (dict(positions=torch.zeros(2, 3, 3, dtype=torch.long)), ValueError, "n×m×2"),
    (dict(positions=torch.zeros(2, 3, 2)), TypeError, "positions must have dtype"),
    (dict(positions=torch.zeros(5, 3, 2, dtype=torch.long)), ValueError, "image_index"),
    (dict(strategy="diagonal"), ValueError, "strategy must be one of"),
    (dict(strategy="interval"), ValueError, "needs block"),
    (dict(strategy="random", block=2), ValueError, "needs pattern"),
    (dict(mean=(0.5, 0.5)), ValueError, "one per channel"),
    (dict(std=(0.5, 0.0, 0.5)), ValueError, "std must be positive"),
    (dict(out=torch.empty(5, 3, 8, 8)), ValueError, "out must have shape"),
    (dict(out=torch.empty(6, 3, 8, 8, dtype=torch.float64)), TypeError, "out must have dtype"),
    (dict(image_index=torch.tensor([0, 2])), ValueError, "out of range"),
    (dict(positions=torch.zeros(2, 3, 2, dtype=torch.long, device="meta")), ValueError,
     "different devices"),
])
def test_bad_input(kwargs, error, match):
    args = dict(images=torch.zeros(2, 3, 8, 8, dtype=torch.uint8),
                positions=torch.zeros(2, 3, 2, dtype=torch.long), window=4, mean=MEAN, std=STD)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        mask_fill(**args)


def test_bfloat16_triton_on_cpu_is_refused():
    with pytest.raises(TypeError, match="bfloat16"):
        mask_fill(torch.zeros(1, 3, 8, 8, dtype=torch.uint8),
                  torch.zeros(1, 1, 2, dtype=torch.long), 4, MEAN, STD, dtype=torch.bfloat16,
                  backend="triton")


@pytest.mark.parametrize("device,backend", CPU_BACKENDS + CUDA_BACKENDS)
@pytest.mark.parametrize("strategy", ["full", "interval", "random"])
def test_gradient_is_the_per_pixel_definitions_gradient(gen, device, backend, strategy):
    """Float images with requires_grad: the gradient equals autograd through the per-pixel
    definition in float64, with a bank row masked twice (the gradients add)."""
    images, positions, _, pattern = make_inputs(gen, strategy=strategy)
    index = torch.tensor([2, 0, 2])
    weights = torch.randn(15, 3, 13, 13, generator=gen)
    bank = images.float().to(device).requires_grad_()
    out = mask_fill(bank, positions.to(device), 7, MEAN, STD, image_index=index.to(device),
                    strategy=strategy, block=3,
                    pattern=None if pattern is None else pattern.to(device), fill=-0.5,
                    backend=backend)
    (out * weights.to(device)).sum().backward()
    oracle_bank = images.double().requires_grad_()
    oracle = naive_mask_fill(oracle_bank, index, positions, 7, strategy, 3, pattern, -0.5)
    (oracle * weights.double()).sum().backward()
    torch.testing.assert_close(out.detach().cpu().double(), oracle.detach(), atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(bank.grad.cpu().double(), oracle_bank.grad, atol=1e-5, rtol=1e-5)
    assert bank.grad[2].abs().sum() > 0  # masked twice: both views' gradients
    assert bank.grad[1].abs().sum() == 0 and bank.grad[3].abs().sum() == 0  # never masked


@pytest.mark.filterwarnings("ignore:Input #0 requires gradient and is not a double")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradcheck(gen, backend):
    images, positions, index, pattern = make_inputs(gen, n_bank=2, n=2, m=3, size=6, window=3,
                                                    block=2, strategy="random")
    bank = images.float().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: mask_fill(x, positions, 3, MEAN, STD, image_index=index % 2,
                            strategy="random", block=2, pattern=pattern, backend=backend),
        (bank,), eps=1.0, atol=1e-5, rtol=1e-2,
        fast_mode=backend == "triton")  # the interpreter: random projections, few launches


def test_float_images_give_the_uint8_result_and_refuse_out_with_grad(gen):
    images, positions, index, _ = make_inputs(gen)
    as_bytes = mask_fill(images, positions, 7, MEAN, STD, image_index=index)
    as_floats = mask_fill(images.float(), positions, 7, MEAN, STD, image_index=index)
    assert torch.equal(as_bytes, as_floats)
    with pytest.raises(ValueError, match="drop out="):
        mask_fill(images.float().requires_grad_(), positions, 7, MEAN, STD, image_index=index,
                  out=torch.empty_like(as_bytes))
    with torch.no_grad():  # no graph wanted: out= is fine
        mask_fill(images.float().requires_grad_(), positions, 7, MEAN, STD, image_index=index,
                  out=torch.empty_like(as_bytes))


def test_validate_false_skips_the_index_range_check(gen):
    images, positions, _, _ = make_inputs(gen)
    with pytest.raises(ValueError, match="out of range"):
        mask_fill(images, positions, 7, MEAN, STD, image_index=torch.tensor([0, 1, 9]),
                  backend="torch")
    with pytest.raises(IndexError):  # unchecked: the torch path's own indexing fails instead
        mask_fill(images, positions, 7, MEAN, STD, image_index=torch.tensor([0, 1, 9]),
                  backend="torch", validate=False)
