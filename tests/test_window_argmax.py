import pytest
import torch

from fastbd.ops import window_argmax


def brute_force(m, wh, ww):
    h, w = m.shape
    best, where = None, None
    for y in range(h - wh + 1):
        for x in range(w - ww + 1):
            total = float(m[y:y + wh, x:x + ww].double().sum())
            if best is None or total > best:
                best, where = total, (y, x)
    return where, best


@pytest.mark.parametrize("shape,window", [((3, 20, 17), 5), ((2, 9, 9), 9), ((1, 7, 12), (2, 5)),
                                          ((4, 6, 6), 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_matches_brute_force(gen, shape, window, dtype):
    maps = torch.rand(*shape, generator=gen).to(dtype)
    wh, ww = (window, window) if isinstance(window, int) else window
    positions, sums = window_argmax(maps, window)
    for b in range(shape[0]):
        where, best = brute_force(maps[b], wh, ww)
        assert tuple(positions[b].tolist()) == where
        assert float(sums[b]) == pytest.approx(best, rel=1e-9)


def test_single_map_and_ties():
    maps = torch.zeros(6, 6)
    maps[1, 1] = maps[4, 4] = 1.0  # two equal windows: the first in row-major order wins
    position, best = window_argmax(maps, 2)
    assert position.tolist() == [0, 0] and float(best) == 1.0


def test_finds_planted_square(gen):
    maps = torch.rand(5, 40, 40, generator=gen) * 0.1
    corners = torch.randint(0, 30, (5, 2), generator=gen)
    for b, (y, x) in enumerate(corners.tolist()):
        maps[b, y:y + 10, x:x + 10] += 1.0
    positions, _ = window_argmax(maps, 10)
    assert torch.equal(positions, corners)


def test_empty_batch():
    positions, sums = window_argmax(torch.zeros(0, 5, 5), 3)
    assert positions.shape == (0, 2) and sums.shape == (0,)


@pytest.mark.parametrize("maps,window,error,match", [
    (torch.zeros(2, 5, 5), 6, ValueError, "larger than the map"),
    (torch.zeros(2, 5, 5), (2, 6), ValueError, "larger than the map"),
    (torch.zeros(2, 5, 5), 0, ValueError, "positive"),
    (torch.zeros(5), 2, ValueError, "rank"),
    (torch.zeros(2, 5, 5, dtype=torch.long), 2, TypeError, "dtype"),
    (torch.full((1, 5, 5), float("nan")), 2, ValueError, "NaN"),
])
def test_bad_input(maps, window, error, match):
    with pytest.raises(error, match=match):
        window_argmax(maps, window)
