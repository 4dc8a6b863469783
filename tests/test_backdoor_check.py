"""The SSL detectors' backdoor check (``fastbd.detection.pipeline.backdoor_check``): the duel
of each top candidate against the test images' own content, on a constructed encoder whose
clusters are known — a trigger that overrides content passes, content against content does
not; the two shares against a brute-force count; the check's place in a result."""

import torch

from fastbd.detection.config import Config
from fastbd.detection.flip import capture_shares, crop_windows, pasted_clusters, pulled_into
from fastbd.detection.method import DetectorMethod, SearchContext
from fastbd.detection.pipeline import backdoor_check
from fastbd.detection.result import DetectionResult
from fastbd.patchsearch.published import published_config

SIZE, WINDOW = 12, 6
MAGENTA = (255, 0, 255)


def colour_images(colours) -> torch.Tensor:
    return torch.tensor(colours, dtype=torch.uint8)[:, :, None, None].expand(
        -1, 3, SIZE, SIZE).contiguous()


def assign(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A known "encoder + clustering": cluster 3 when a 2×2 magenta block is anywhere in the
    image (a learned trigger), else the dominant colour channel (0 red, 1 green, 2 blue)."""
    magenta = (x[:, 0] > 0.99) & (x[:, 1] < 0.01) & (x[:, 2] > 0.99)
    block = magenta[:, :-1, :-1] & magenta[:, 1:, :-1] & magenta[:, :-1, 1:] & magenta[:, 1:, 1:]
    labels = x.mean((2, 3)).argmax(1)
    labels[block.flatten(1).any(1)] = 3
    return labels, torch.zeros(labels.shape)


class Fixed(DetectorMethod):
    """Candidates at the top-left corner of every image."""

    name = "fixed"

    def candidates(self, context, rows, generator):
        return torch.zeros(rows.numel(), 2, dtype=torch.long), None


def world(trigger: bool):
    """Bank rows 0–8: red, green and blue test images; rows 9–10: green images whose top-left
    window is the candidate — with a magenta trigger in it, or plain green content."""
    bank = colour_images([(230, 10, 10), (10, 230, 10), (10, 10, 230)] * 3 + [(10, 230, 10)] * 2)
    if trigger:
        bank[9:, :, 1:3, 1:3] = torch.tensor(MAGENTA, dtype=torch.uint8)[:, None, None]
    labels, _ = assign(bank.float() / 255)
    return bank, labels


def assign_patched(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A weakly trained "encoder" of the kind a clean world can give: any image that is not one
    uniform colour — any pasted patch — goes to cluster 3, whatever the patch shows."""
    uniform = (x - x[:, :, :1, :1]).abs().flatten(1).amax(1) < 1e-6
    labels = x.mean((2, 3)).argmax(1)
    labels[~uniform] = 3
    return labels, torch.zeros(labels.shape)


def context_for(bank, labels, encode_assign=assign):
    config = Config(window=WINDOW, candidates_per_batch=3, topk_poisons=2, n_clusters=4)
    encoder = type("E", (), {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)})()
    return SearchContext(encoder, encode_assign, None, bank, labels, config,
                         torch.device("cpu"), torch.float32)


def run_check(trigger: bool) -> dict:
    bank, labels = world(trigger)
    context = context_for(bank, labels)
    test_index, topk = torch.arange(9), torch.tensor([9, 10])
    triggers = crop_windows(bank, topk, torch.zeros(2, 2, dtype=torch.long), WINDOW)
    return backdoor_check(context, Fixed(), test_index, labels[test_index], topk, triggers)


def test_a_trigger_that_overrides_content_passes_the_check():
    check = run_check(trigger=True)
    assert check["capture"] == [1.0, 1.0]  # every test image pulled into cluster 3
    assert check["destinations"] == [3, 3]
    assert max(check["escape"]) < 0.5  # only a window covering the trigger frees its image
    assert check["statistic"] >= Config().check_threshold and check["backdoor"]


def test_content_against_content_fails_the_check():
    check = run_check(trigger=False)
    assert check["statistic"] < Config().check_threshold and not check["backdoor"]


def test_what_any_pasted_patch_does_is_not_taken_for_a_trigger():
    """An encoder that sends every patched image to one cluster: a plain window captures most
    test images and nothing displaces its (already patched) image — capture − escape alone
    would call it a backdoor; what pasting the test images' own windows does is subtracted."""
    bank, _ = world(trigger=False)
    bank[9:, :, 8:, 8:] = torch.tensor((200, 30, 30), dtype=torch.uint8)[:, None, None]
    labels, _ = assign_patched(bank.float() / 255)
    context = context_for(bank, labels, assign_patched)
    test_index, topk = torch.arange(9), torch.tensor([9, 10])
    triggers = crop_windows(bank, topk, torch.zeros(2, 2, dtype=torch.long), WINDOW)
    check = backdoor_check(context, Fixed(), test_index, labels[test_index], topk, triggers)
    assert min(check["capture"]) >= 0.5 and max(check["escape"]) == 0.0
    assert check["pasting"] >= 0.5 and len(check["ordinary"]) == 4  # 2 windows per candidate
    assert check["statistic"] < Config().check_threshold and not check["backdoor"]


PALETTE = torch.tensor([(230, 10, 10), (10, 230, 10), (10, 10, 230), (10, 230, 230)]) / 255


def assign_minority(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A weakly trained "encoder" led by whatever stands out: each pixel takes its nearest
    palette colour (red, green, blue, cyan) and an image goes to the cluster of its rarest
    colour (ties to the later colour) — any pasted content pulls an image into *its own*
    colour's cluster, the cyan windows of the candidates no more than the others."""
    nearest = ((x[:, :, None] - PALETTE.T[None, :, :, None, None]) ** 2).sum(1).argmin(1)
    counts = torch.stack([(nearest == c).flatten(1).sum(1) for c in range(4)], 1)
    rarity = torch.where(counts > 0, counts.float(), torch.inf) - torch.arange(4) * 1e-3
    return rarity.argmin(1), torch.zeros(x.shape[0])


def test_content_that_pulls_into_its_own_cluster_is_not_taken_for_a_trigger():
    """Candidates whose cyan windows pull every test image into the cyan cluster and whose
    images no ordinary window frees: beside the test images' own windows — each of which pulls
    every other colour's images into its own colour's cluster — they do nothing special (what
    ordinary content pulls into the candidate's cluster, 0 here, would not show it)."""
    bank = colour_images([(230, 10, 10), (10, 230, 10), (10, 10, 230)] * 3 + [(230, 10, 10)] * 2)
    bank[9:, :, :WINDOW, :WINDOW] = torch.tensor((10, 230, 230), dtype=torch.uint8)[:, None,
                                                                                    None]
    labels, _ = assign_minority(bank.float() / 255)
    assert labels[9:].tolist() == [3, 3]
    context = context_for(bank, labels, assign_minority)
    test_index, topk = torch.arange(9), torch.tensor([9, 10])
    triggers = crop_windows(bank, topk, torch.zeros(2, 2, dtype=torch.long), WINDOW)
    check = backdoor_check(context, Fixed(), test_index, labels[test_index], topk, triggers)
    assert check["capture"] == [1.0, 1.0] and check["destinations"] == [3, 3]
    assert max(check["escape"]) < 0.5
    assert check["pasting"] == 1.0 and min(check["ordinary"]) == 1.0
    assert check["statistic"] < Config().check_threshold and not check["backdoor"]


def test_pasted_clusters_and_capture_equal_a_count_by_hand(gen):
    """With the corner fixed at the origin, the clusters after pasting and the capture shares
    are a direct count of who moved where; no patch or no row gives empty results."""
    bank = torch.randint(0, 256, (14, 3, SIZE, SIZE), dtype=torch.uint8, generator=gen)
    labels, _ = assign(bank.float() / 255)
    patches = torch.randint(0, 256, (5, 3, WINDOW, WINDOW), dtype=torch.uint8, generator=gen)
    patches[1, :, :2, :2] = torch.tensor(MAGENTA, dtype=torch.uint8)[:, None, None]
    rows = torch.arange(3, 14)

    def pasted(images, patch):
        out = images.clone()
        out[:, :, :WINDOW, :WINDOW] = patch
        return assign(out.float() / 255)[0]

    after = pasted_clusters(assign, bank, rows, patches, (0, 0, 0), (1, 1, 1),
                            candidates_per_batch=2, generator=torch.Generator(),
                            corner_positions=1)
    assert torch.equal(after, torch.stack([pasted(bank[rows], p) for p in patches]))
    capture, destinations = capture_shares(after, labels[rows])
    for c in range(len(patches)):
        moved = after[c][after[c] != labels[rows]]
        if moved.numel() == 0:
            assert capture[c] == 0 and destinations[c] == -1
            continue
        d = int(torch.bincount(moved).argmax())
        assert destinations[c] == d
        expected = float((moved == d).sum()) / int((labels[rows] != d).sum())
        assert abs(float(capture[c]) - expected) < 1e-6
        assert abs(pulled_into(after[c:c + 1], labels[rows], d) - expected) < 1e-6
    assert capture[1] == 1.0 and destinations[1] == 3
    none = pasted_clusters(assign, bank, rows, patches[:0], (0, 0, 0), (1, 1, 1),
                           candidates_per_batch=2, generator=torch.Generator())
    assert none.shape == (0, rows.numel()) and capture_shares(none, labels[rows])[0].numel() == 0
    assert pulled_into(none, labels[rows], 0) == 0.0
    assert pasted_clusters(assign, bank, rows[:0], patches, (0, 0, 0), (1, 1, 1),
                           candidates_per_batch=2, generator=torch.Generator()).shape == (5, 0)


def test_no_backdoor_is_said_in_the_decision_and_the_summary():
    n = 10
    result = DetectionResult(
        method="poisoncam", scores=torch.zeros(n, dtype=torch.float64),
        removed=torch.zeros(n, dtype=torch.bool), ranking=torch.arange(n),
        topk=torch.arange(2), windows=torch.zeros(2, 2, dtype=torch.long),
        maps=torch.zeros(2, 4, 4), triggers=torch.zeros(2, 3, 2, 2, dtype=torch.uint8),
        cluster_labels=torch.zeros(n, dtype=torch.long), timings={}, throughput={}, config={},
        check={"statistic": 0.21, "threshold": 0.5, "backdoor": False})
    assert result.backdoor is False
    assert result.decision().startswith("poisoncam: no backdoor found (check 0.21 < 0.50")
    assert "removed 0 of 10" in result.decision()
    assert result.summary()["backdoor"] is False and result.summary()["check"]["statistic"] == 0.21
    assert published_config().check is False and Config().check is True
