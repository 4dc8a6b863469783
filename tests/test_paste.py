import pytest
import torch
import torch.nn.functional as F

from fastbd.ops import pack_patches, paste

from testutil import CPU_BACKENDS, CUDA_BACKENDS

MEAN = (0.5, 0.4, 0.3)
STD = (0.2, 0.25, 0.3)


def naive_paste(images, patches, sizes_p, jobs, target, alpha, opacity, normalise):
    """Per-pixel definition (tiny inputs): resize by F.interpolate, blend, normalise or round."""
    out = []
    s = images.shape[-1]
    for t, (i, p, y, x) in enumerate(jobs):
        ph, pw = sizes_p[p]
        th, tw = target[t]
        front = patches[p, :, :ph, :pw].double()
        weight = (alpha[p, :ph, :pw].double() if alpha is not None
                  else torch.ones(ph, pw, dtype=torch.float64)) * opacity
        if (th, tw) != (ph, pw):
            front = F.interpolate(front[None], size=(th, tw), mode="bilinear")[0]
            weight = F.interpolate(weight[None, None], size=(th, tw), mode="bilinear")[0, 0]
        img = images[i].double().clone()
        for u in range(th):
            for v in range(tw):
                if 0 <= y + u < s and 0 <= x + v < s:
                    w = weight[u, v]
                    behind = img[:, y + u, x + v].clone()  # differentiable: no in-place read
                    img[:, y + u, x + v] = behind * (1 - w) + front[:, u, v] * w
        if normalise:
            mean = torch.tensor(MEAN, dtype=torch.float64)[:, None, None]
            std = torch.tensor(STD, dtype=torch.float64)[:, None, None]
            out.append((img / 255 - mean) / std)
        else:
            out.append(torch.floor(img + 0.5).clamp(0, 255))
    return torch.stack(out) if out else torch.empty(0, *images.shape[1:], dtype=torch.float64)


def make_jobs(gen, n_jobs=9, size=15):
    images = torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8, generator=gen)
    shapes = [(5, 7), (9, 4), (3, 3), (size, size)]
    patches, patch_sizes = pack_patches(
        [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen) for h, w in shapes])
    jobs = torch.stack([torch.randint(0, 4, (n_jobs,), generator=gen),
                        torch.randint(0, 4, (n_jobs,), generator=gen),
                        torch.randint(-5, size, (n_jobs,), generator=gen),
                        torch.randint(-5, size, (n_jobs,), generator=gen)], 1)
    sizes = torch.randint(1, 13, (n_jobs, 2), generator=gen)
    alpha = torch.rand(4, size, size, generator=gen)
    return images, patches, patch_sizes, jobs, sizes, alpha


@pytest.mark.parametrize("resize", [False, True])
@pytest.mark.parametrize("use_alpha", [False, True])
@pytest.mark.parametrize("normalise", [False, True])
def test_torch_reference_matches_pixel_definition(gen, resize, use_alpha, normalise):
    images, patches, patch_sizes, jobs, sizes, alpha = make_jobs(gen)
    target = sizes if resize else patch_sizes[jobs[:, 1]]
    norm = dict(mean=MEAN, std=STD) if normalise else {}
    got = paste(images, patches, *jobs.T, patch_sizes=patch_sizes,
                sizes=sizes if resize else None, alpha=alpha if use_alpha else None,
                opacity=0.8, backend="torch", **norm)
    want = naive_paste(images, patches, patch_sizes.tolist(), jobs.tolist(), target.tolist(),
                       alpha if use_alpha else None, 0.8, normalise)
    torch.testing.assert_close(got.double(), want, atol=1e-4 if normalise else 1, rtol=0)


@pytest.mark.parametrize("resize", [False, True])
@pytest.mark.parametrize("use_alpha", [False, True])
@pytest.mark.parametrize("normalise", [False, True])
def test_whole_and_clipped_boxes_in_one_call_match_the_pixel_definition(gen, resize, use_alpha,
                                                                        normalise):
    """The reference blends boxes that lie whole in the image in one indexed write per size and
    clipped or resized ones one by one: a call holding both kinds, into a fresh tensor and into
    a reused ``out`` buffer, against the per-pixel definition."""
    images, patches, patch_sizes, jobs, sizes, alpha = make_jobs(gen, n_jobs=60)
    own = patch_sizes[jobs[:, 1]]
    jobs[:30, 2:] = torch.randint(0, 3, (30, 2), generator=gen)  # inside the image …
    sizes[:30] = own[:30]  # … at their own size: whole boxes, resized or not
    target = sizes if resize else own
    whole = ((jobs[:, 2:] >= 0) & (jobs[:, 2:] + target <= 15)).all(1) & (target == own).all(1)
    assert 0 < int(whole.sum()) < 60
    kwargs = dict(patch_sizes=patch_sizes, sizes=sizes if resize else None,
                  alpha=alpha if use_alpha else None, opacity=0.8, backend="torch",
                  **(dict(mean=MEAN, std=STD) if normalise else {}))
    got = paste(images, patches, *jobs.T, **kwargs)
    reused = torch.full_like(got, float("nan") if normalise else 7)
    assert paste(images, patches, *jobs.T, out=reused, **kwargs) is reused
    assert torch.equal(reused, got)
    want = naive_paste(images, patches, patch_sizes.tolist(), jobs.tolist(), target.tolist(),
                       alpha if use_alpha else None, 0.8, normalise)
    torch.testing.assert_close(got.double(), want, atol=1e-4 if normalise else 1, rtol=0)


@pytest.mark.parametrize("device,backend", CPU_BACKENDS + CUDA_BACKENDS)
@pytest.mark.parametrize("resize", [False, True])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float16, torch.bfloat16])
def test_backends_match_reference(gen, device, backend, resize, dtype):
    if device == "cpu" and backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bfloat16")
    images, patches, patch_sizes, jobs, sizes, alpha = make_jobs(gen)
    norm = {} if dtype == torch.uint8 else dict(mean=MEAN, std=STD, dtype=dtype)
    kwargs = dict(patch_sizes=patch_sizes, sizes=sizes if resize else None, alpha=alpha,
                  opacity=0.9, **norm)
    want = paste(images, patches, *jobs.T, backend="torch", **kwargs)
    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    got = paste(images.to(device), patches.to(device), *jobs.to(device).T, backend=backend,
                **moved)
    assert got.dtype == dtype
    # uint8: bilinear weights computed in another order may round the other way, by one level.
    tolerance = 1 if dtype == torch.uint8 else (1e-5 if dtype == torch.float32 else 2e-2)
    torch.testing.assert_close(got.cpu().float(), want.float(), atol=tolerance, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opaque_paste_is_exact_copy(gen, backend):
    images = torch.randint(0, 256, (2, 3, 12, 12), dtype=torch.uint8, generator=gen)
    patch = torch.randint(0, 256, (1, 3, 4, 5), dtype=torch.uint8, generator=gen)
    one = torch.tensor([1])
    out = paste(images, patch, one, torch.tensor([0]), torch.tensor([3]), torch.tensor([6]),
                backend=backend)
    expected = images[1].clone()
    expected[:, 3:7, 6:11] = patch[0]
    assert torch.equal(out[0], expected)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_jobs(backend):
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    none = torch.zeros(0, dtype=torch.long)
    out = paste(images, torch.zeros(1, 3, 2, 2, dtype=torch.uint8), none, none, none, none,
                mean=MEAN, std=STD, backend=backend)
    assert out.shape == (0, 3, 8, 8) and out.dtype == torch.float32


def test_pack_patches_sizes():
    packed, sizes = pack_patches([torch.ones(3, 2, 5, dtype=torch.uint8),
                                  torch.ones(3, 4, 1, dtype=torch.uint8)])
    assert packed.shape == (2, 3, 4, 5)
    assert sizes.tolist() == [[2, 5], [4, 1]]
    assert int(packed[1].sum()) == 3 * 4


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(images=torch.zeros(2, 3, 8, 8, dtype=torch.int32)), TypeError, "images must have dtype"),
    (dict(patches=torch.zeros(1, 1, 2, 2, dtype=torch.uint8)), ValueError, "channels"),
    (dict(ys=torch.zeros(2, dtype=torch.long)), ValueError, "differ in length"),
    (dict(image_index=torch.tensor([5])), ValueError, "image_index out of range"),
    (dict(patch_index=torch.tensor([1])), ValueError, "patch_index out of range"),
    (dict(sizes=torch.zeros(1, 2, dtype=torch.long)), ValueError, "at least 1×1"),
    (dict(sizes=torch.ones(2, 2, dtype=torch.long)), ValueError, "sizes must be 1×2"),
    (dict(patch_sizes=torch.tensor([[3, 2]])), ValueError, "patch_sizes must lie"),
    (dict(opacity=1.5), ValueError, "opacity"),
    (dict(mean=MEAN), ValueError, "both mean and std"),
    (dict(alpha=torch.ones(1, 3, 3)), ValueError, "alpha must be"),
    (dict(dtype=torch.float16), TypeError, "output is uint8"),
    (dict(xs=torch.zeros(1, dtype=torch.long, device="meta")), ValueError, "different devices"),
])
def test_bad_input(kwargs, error, match):
    zero = torch.zeros(1, dtype=torch.long)
    args = dict(images=torch.zeros(2, 3, 8, 8, dtype=torch.uint8),
                patches=torch.zeros(1, 3, 2, 2, dtype=torch.uint8),
                image_index=zero, patch_index=zero, ys=zero, xs=zero)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        paste(**args)


@pytest.mark.parametrize("device,backend", CPU_BACKENDS + CUDA_BACKENDS)
@pytest.mark.parametrize("resize", [False, True])
def test_gradients_are_the_per_pixel_definitions_gradients(gen, device, backend, resize):
    """Float images, patches and alpha with requires_grad: the normalised result and the three
    gradients equal autograd through the per-pixel definition in float64."""
    images, patches, patch_sizes, jobs, sizes, alpha = make_jobs(gen)
    target = sizes if resize else patch_sizes[jobs[:, 1]]
    weights = torch.randn(jobs.shape[0], 3, 15, 15, generator=gen)
    leaves = [t.to(device, torch.float32, copy=True).requires_grad_()
              for t in (images, patches, alpha)]
    out = paste(leaves[0], leaves[1], *jobs.to(device).T, patch_sizes=patch_sizes.to(device),
                sizes=sizes.to(device) if resize else None, alpha=leaves[2], opacity=0.8,
                mean=MEAN, std=STD, backend=backend)
    (out * weights.to(device)).sum().backward()
    oracle_leaves = [t.double().requires_grad_() for t in (images, patches, alpha)]
    oracle = naive_paste(*oracle_leaves[:2], patch_sizes.tolist(), jobs.tolist(),
                         target.tolist(), oracle_leaves[2], 0.8, True)
    (oracle * weights.double()).sum().backward()
    torch.testing.assert_close(out.detach().cpu().double(), oracle.detach(), atol=1e-4, rtol=0)
    for leaf, oracle_leaf in zip(leaves, oracle_leaves, strict=True):
        torch.testing.assert_close(leaf.grad.cpu().double(), oracle_leaf.grad, atol=1e-5,
                                   rtol=1e-4)
    assert all(leaf.grad.abs().sum() > 0 for leaf in leaves)


@pytest.mark.filterwarnings("ignore:Input #. requires gradient and is not a double")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradcheck_trigger_and_mask(gen, backend):
    """A trigger-inversion step's inputs: a float trigger and its opacity mask pasted into
    uint8 images (resized), checked against finite differences of the forward (the paste is
    linear in each, so a wide step loses nothing; the tight atol matters because fast mode
    compares projections on unit vectors, which are small here)."""
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=gen)
    trigger = (torch.rand(1, 3, 3, 3, generator=gen) * 255).requires_grad_()
    mask = torch.rand(1, 3, 3, generator=gen).requires_grad_()
    jobs = [torch.tensor(v) for v in ([0, 1, 1], [0, 0, 0], [1, -1, 5], [2, 3, 4])]
    sizes = torch.tensor([[3, 3], [4, 5], [2, 3]])
    assert torch.autograd.gradcheck(
        lambda p, a: paste(images, p, *jobs, sizes=sizes, alpha=a, mean=MEAN, std=STD,
                           backend=backend),
        (trigger, mask), eps=0.1, atol=1e-5, rtol=1e-2, fast_mode=backend == "triton")


def test_float_inputs_need_normalised_output_and_no_out_with_grad(gen):
    images, patches, patch_sizes, jobs, _, _ = make_jobs(gen)
    as_bytes = paste(images, patches, *jobs.T, patch_sizes=patch_sizes, mean=MEAN, std=STD)
    as_floats = paste(images.float(), patches.float(), *jobs.T, patch_sizes=patch_sizes,
                      mean=MEAN, std=STD)
    torch.testing.assert_close(as_floats, as_bytes)
    with pytest.raises(ValueError, match="give mean and std"):
        paste(images, patches.float(), *jobs.T, patch_sizes=patch_sizes)
    with pytest.raises(ValueError, match="drop out="):
        paste(images, patches.float().requires_grad_(), *jobs.T, patch_sizes=patch_sizes,
              mean=MEAN, std=STD, out=torch.empty_like(as_bytes))


def test_validate_false_skips_the_range_checks(gen):
    images, patches, patch_sizes, jobs, _, _ = make_jobs(gen)
    jobs[0, 0] = 7  # no such image
    with pytest.raises(ValueError, match="image_index out of range"):
        paste(images, patches, *jobs.T, patch_sizes=patch_sizes, backend="torch")
    with pytest.raises(IndexError):  # unchecked: the torch path's own indexing fails instead
        paste(images, patches, *jobs.T, patch_sizes=patch_sizes, backend="torch",
              validate=False)
