"""The image side of token-level unlearning (UBT's Table IV "image mask"): occlusion relevance
of image windows and images rebuilt from their relevant windows."""

import pytest
import torch
from torch import nn

from fastbd.clipdefense.occlusion import cell_corners, masked_images, patch_relevance


class CornerCLIP(nn.Module):
    """A stand-in CLIP whose image feature is ``[1, mean of the top-left 4×4 pixels]`` (in the
    normalised space the model receives) and whose every caption is ``[0, 1]``: only that
    corner matters to a pair's cosine."""

    def __init__(self):
        super().__init__()
        self.visual = nn.Module()
        self.visual.preprocess_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}

    def encode_image(self, x):
        return torch.stack([torch.ones(x.shape[0]), x[:, :, :4, :4].mean((1, 2, 3))], 1)

    def encode_text(self, tokens):
        return torch.tensor([[0.0, 1.0]]).expand(tokens.shape[0], 2)


@pytest.mark.parametrize("size,cells", [(32, 7), (224, 7), (16, 4), (9, 9), (5, 1), (33, 8)])
def test_cells_cover_the_image_evenly(size, cells):
    side, corners = cell_corners(size, cells)
    assert len(corners) == cells and corners[0] == 0 and corners[-1] + side == size
    covered = torch.zeros(size, dtype=torch.bool)
    for c in corners:
        covered[c:c + side] = True
    assert covered.all()
    assert all(0 < b - a <= side for a, b in zip(corners, corners[1:], strict=False))


def test_cells_outside_the_image_are_refused():
    with pytest.raises(ValueError, match="cells"):
        cell_corners(8, 9)
    with pytest.raises(ValueError, match="cells"):
        cell_corners(8, 0)


def test_relevance_is_the_cosine_fall_of_each_occluded_window():
    model = CornerCLIP()
    images = torch.full((3, 3, 16, 16), 255, dtype=torch.uint8)
    images[1] = 128  # normalised 0.0078: its corner hardly matters
    images[2, :, :4, :4] = 0  # a dark corner: occluding it raises the cosine
    relevance = patch_relevance(model, images, torch.ones(3, 5, dtype=torch.long), cells=4)
    assert relevance.shape == (3, 4, 4)
    by_hand = torch.zeros(4, 4)
    by_hand[0, 0] = 1.0  # only the top-left window lowers image 0's cosine
    torch.testing.assert_close(relevance[0], by_hand)
    assert relevance[1].sum() == pytest.approx(1.0) and relevance[1, 0, 0] == 1.0
    assert relevance[2].abs().sum() == 0  # no window lowers it: all 0, not NaN


def test_relevance_of_no_pairs():
    empty = patch_relevance(CornerCLIP(), torch.zeros(0, 3, 16, 16, dtype=torch.uint8),
                            torch.zeros(0, 5, dtype=torch.long), cells=4)
    assert empty.shape == (0, 4, 4)


def test_masked_images_keep_only_relevant_windows(gen):
    model = CornerCLIP()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=gen)
    relevance = torch.zeros(2, 7, 7)
    relevance[0, 0, 0] = 1.0
    relevance[1] = 1 / 49  # everything below the threshold
    rebuilt, keep = masked_images(images, relevance, 0.1, model)
    side, corners = cell_corners(32, 7)
    grey = round(0.5 * 255)
    assert torch.equal(keep[0], relevance[0] >= 0.1) and not keep[1].any()
    assert torch.equal(rebuilt[0, :, :side, :side], images[0, :, :side, :side])
    assert (rebuilt[0, :, side:] == grey).all() and (rebuilt[0, :, :, side:] == grey).all()
    assert (rebuilt[1] == grey).all()
    everything, _ = masked_images(images, torch.ones(2, 7, 7), 0.1, model)
    assert torch.equal(everything, images)
