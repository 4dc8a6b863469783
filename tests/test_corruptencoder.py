"""CorruptEncoder(+) places its parts where its ground truth says, by the published rules
(REFERENCE.md, "Attacks that implant"), on fresh random inputs and odd sizes."""

from __future__ import annotations

import pytest
import torch

from fastbd.attacks import CorruptEncoderConfig, make_attack, poison_corrupt_encoder
from fastbd.attacks.corruptencoder import (
    check_reference,
    compose_poison,
    crop_to_mask,
    draw_layout,
    fit_object,
    support_image,
)
from fastbd.attacks.triggers import resize_patch


def disc(side: int, colour=(250, 10, 10)) -> torch.Tensor:
    """An RGBA reference: a solid disc on a transparent square with a transparent border."""
    coords = torch.arange(side, dtype=torch.float32) - (side - 1) / 2
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    alpha = ((yy ** 2 + xx ** 2) <= (side / 3) ** 2).to(torch.uint8) * 255
    rgb = torch.tensor(colour, dtype=torch.uint8)[:, None, None].expand(3, side, side)
    return torch.cat([rgb, alpha[None]])


@pytest.mark.parametrize("size", [32, 33, 64, 97])
def test_layout_follows_the_published_rules(size):
    config = CorruptEncoderConfig()
    g = torch.Generator().manual_seed(size)
    sides = set()
    for _ in range(200):
        object_h = int(torch.randint(size // 3, size + 1, (1,), generator=g))
        object_w = int(torch.randint(2, size // 2 + 1, (1,), generator=g))
        t = max(2, round(40 / 224 * size))
        layout = draw_layout(size, object_h, object_w, t, config, g)
        oy, ox, oh, ow = layout.object_box
        ty, tx, th, tw = layout.trigger_box
        assert (oh, ow, th, tw) == (object_h, object_w, t, t)
        assert oy + oh == size  # bottom-aligned
        if layout.object_left:
            assert 0 <= ox <= 0.05 * size
            assert tx >= ox + ow + 0.125 * size - 1e-9 and tx + t <= size - 0.125 * size + 1e-9
        else:
            assert size - ow - 0.05 * size - 1e-9 <= ox <= size - ow
            assert tx >= 0.125 * size - 1e-9 and tx + t <= ox - 0.125 * size + 1e-9
        assert 0.25 * size - 1e-9 <= ty and ty + t <= 0.75 * size + 1e-9
        sides.add(layout.object_left)
    assert sides == {True, False}


def test_compose_puts_object_and_trigger_where_the_layout_says(gen):
    size = 48
    background = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=gen)
    trigger = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8, generator=gen)
    reference = disc(30)
    image, layout = compose_poison(background, reference, trigger,
                                   CorruptEncoderConfig(blur=0), gen)
    ty, tx, t, _ = layout.trigger_box
    assert torch.equal(image[:, ty:ty + t, tx:tx + t], trigger)
    oy, ox, oh, ow = layout.object_box
    fitted = fit_object(crop_to_mask(reference), size, size // 2)
    assert (oh, ow) == tuple(fitted.shape[1:]) and ow <= size // 2 and oh <= size
    opaque = fitted[3] == 255
    inside = image[:, oy:oy + oh, ox:ox + ow]
    assert torch.equal(inside[:, opaque], fitted[:3, opaque])
    outside = torch.ones(size, size, dtype=torch.bool)
    outside[oy:oy + oh, ox:ox + ow] = False
    outside[ty:ty + t, tx:tx + t] = False
    assert torch.equal(image[:, outside], background[:, outside])


def test_poisoning_appends_poisons_with_their_ground_truth(gen):
    n, size = 400, 32
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 5, (n,), generator=gen)
    backgrounds = torch.randint(0, 256, (7, 3, size, size), dtype=torch.uint8, generator=gen)
    trigger = torch.full((3, 6, 6), 200, dtype=torch.uint8)
    config = CorruptEncoderConfig(rate=0.05, support_fraction=0.2, seed=3)
    out = poison_corrupt_encoder(images, labels, 2, [disc(20), disc(13)[:3]], backgrounds,
                                 trigger, config)
    assert out.images.shape[0] == n + 20 and torch.equal(out.images[:n], images)
    assert (out.labels[n:] == 2).all() and torch.equal(out.labels[:n], labels)
    support = out.parts["support_mask"]
    assert int(out.poison_mask.sum()) == 16 and int(support.sum()) == 4
    assert not (out.poison_mask & support).any() and not out.poison_mask[:n].any()
    for row in torch.nonzero(out.poison_mask).flatten().tolist():
        y, x, h, w = out.boxes[row].tolist()
        assert torch.equal(out.images[row, :, y:y + h, x:x + w], trigger)
        oy, ox, oh, ow = out.parts["object_boxes"][row].tolist()
        assert oy + oh == size and (x >= ox + ow or x + w <= ox)  # the other half
    assert (out.boxes[~out.poison_mask] == -1).all()
    again = poison_corrupt_encoder(images, labels, 2, [disc(20), disc(13)[:3]], backgrounds,
                                   trigger, config)
    assert torch.equal(again.images, out.images)  # reproducible from the seed


def test_multi_target_poisoning_gives_each_target_its_trigger_and_poisons(gen):
    from fastbd.attacks.corruptencoder import poison_corrupt_encoder_targets

    n, size = 300, 32
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 5, (n,), generator=gen)
    backgrounds = torch.randint(0, 256, (7, 3, size, size), dtype=torch.uint8, generator=gen)
    triggers = [torch.full((3, 6, 6), v, dtype=torch.uint8) for v in (200, 40, 120)]
    config = CorruptEncoderConfig(rate=0.05, seed=3)
    references = [[disc(20)], [disc(13)], [disc(9)]]
    out = poison_corrupt_encoder_targets(images, labels, [2, 4, 0], references, backgrounds,
                                         triggers, config)
    assert out.images.shape[0] == n + 45 and torch.equal(out.images[:n], images)
    which = out.parts["poison_target"]
    assert (which[:n] == -1).all() and not out.poison_mask[:n].any()
    for i, (target, trigger) in enumerate(zip([2, 4, 0], triggers, strict=True)):
        rows = torch.arange(n + 15 * i, n + 15 * (i + 1))
        assert (which[rows] == target).all() and (out.labels[rows] == target).all()
        for row in rows.tolist():
            y, x, h, w = out.boxes[row].tolist()
            assert torch.equal(out.images[row, :, y:y + h, x:x + w], trigger)
    # one target: exactly the single-target attack, the first target's part of several
    one = poison_corrupt_encoder_targets(images, labels, [2], references[:1], backgrounds,
                                         triggers[:1], config)
    single = poison_corrupt_encoder(images, labels, 2, references[0], backgrounds, triggers[0],
                                    config)
    assert torch.equal(one.images, single.images) and torch.equal(one.boxes, single.boxes)
    assert torch.equal(out.images[:n + 15], single.images)
    with pytest.raises(ValueError, match="one reference set and one trigger per target"):
        poison_corrupt_encoder_targets(images, labels, [2, 4], references, backgrounds,
                                       triggers[:2], config)
    with pytest.raises(ValueError, match="distinct"):
        poison_corrupt_encoder_targets(images, labels, [2, 2], references[:2], backgrounds,
                                       triggers[:2], config)


def test_support_image_joins_the_centre_halves(gen):
    for size in (32, 33):
        real = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=gen)
        reference = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=gen)
        half, start = size // 2, (size - size // 2) // 2
        out = support_image(real, reference, gen)
        halves = {out[:, :, :half].numpy().tobytes(), out[:, :, half:2 * half].numpy().tobytes()}
        assert halves == {real[:, :, start:start + half].numpy().tobytes(),
                          reference[:, :, start:start + half].numpy().tobytes()}


def test_trigger_and_bad_inputs(gen):
    trigger = make_attack("corruptencoder+", 224)
    assert trigger.side == 40 and trigger.eval_region == (0.25, 0.75)
    images = torch.zeros(10, 3, 32, 32, dtype=torch.uint8)
    labels = torch.zeros(10, dtype=torch.long)
    backgrounds = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    patch = torch.zeros(3, 6, 6, dtype=torch.uint8)
    with pytest.raises(ValueError, match="at least one reference"):
        poison_corrupt_encoder(images, labels, 0, [], backgrounds, patch)
    with pytest.raises(ValueError, match="mask"):
        check_reference(torch.zeros(4, 5, 5, dtype=torch.uint8))
    with pytest.raises(ValueError, match="backgrounds"):
        poison_corrupt_encoder(images, labels, 0, [disc(9)], backgrounds[:, :, :16], patch)
    with pytest.raises(ValueError, match="does not fit"):
        poison_corrupt_encoder(images, labels, 0, [disc(9)], backgrounds,
                               torch.zeros(3, 20, 20, dtype=torch.uint8))
    with pytest.raises(ValueError, match="target class 4"):
        poison_corrupt_encoder(images, labels, 4, [disc(9)], backgrounds, patch,
                               CorruptEncoderConfig(rate=0.5, support_fraction=0.5))
    with pytest.raises(ValueError, match="rate"):
        CorruptEncoderConfig(rate=0.0)
    with pytest.raises(ValueError, match="trigger_id"):
        make_attack("corruptencoder", 32, trigger_id=10)


def test_cli_plants_corruptencoder_on_the_world_and_on_files(tmp_path):
    import json

    import numpy as np
    from PIL import Image

    from fastbd.cli import main
    from fastbd.data.readers import read_file_list

    world = tmp_path / "world"
    assert main(["--quiet", "attack", "--attack", "corruptencoder+", "--n-train", "200",
                 "--n-eval", "20", "--rate", "0.05", "--out", str(world)]) == 0
    summary = json.loads((world / "attack.json").read_text())
    assert (summary["images"], summary["poisoned"], summary["support_images"]) == (210, 8, 2)
    truth = torch.load(world / "ground_truth.pt")
    listed = read_file_list(world / "train.txt")
    assert len(listed.paths) == 210 and truth["poison_mask"].sum() == 8
    assert not any("HTBA_trigger" in str(p) for p in listed.paths)  # names say nothing
    assert torch.equal(torch.from_numpy(np.load(world / "train.poisoned.npy")),
                       truth["poison_mask"])
    assert truth["object_boxes"].shape == (210, 4) and truth["support_mask"].sum() == 2
    row = int(torch.nonzero(truth["poison_mask"])[0])
    y, x, h, w = truth["boxes"][row].tolist()
    image = torch.from_numpy(np.array(Image.open(listed.paths[row]))).permute(2, 0, 1)
    trigger = make_attack("corruptencoder+", 32)
    assert torch.equal(image[:, y:y + h, x:x + w], resize_patch(trigger.pattern, trigger.side))
    assert (world / "train_clean.txt").is_file() and summary["trigger"]["attack"] == \
        "corruptencoder+"

    reference = tmp_path / "ref.png"
    Image.fromarray(disc(40).permute(1, 2, 0).numpy(), "RGBA").save(reference)
    mine = tmp_path / "mine"
    common = ["--quiet", "attack", "--attack", "corruptencoder", "--file-list",
              str(world / "train_clean.txt"), "--image-size", "32", "--target", "1"]
    assert main([*common, "--out", str(mine)]) == 2  # no --reference
    assert main([*common, "--reference", str(reference), "--out", str(mine)]) == 0
    summary = json.loads((mine / "attack.json").read_text())
    assert summary["images"] == 201 and summary["poisoned"] == 1

    # several targets: TARGET:PATH references, each target its own trigger and poisons
    multi = tmp_path / "multi"
    flags = ["--quiet", "attack", "--attack", "corruptencoder", "--file-list",
             str(world / "train_clean.txt"), "--image-size", "32", "--targets", "1,4",
             "--rate", "0.02"]
    assert main([*flags, "--reference", str(reference), "--out", str(multi)]) == 2
    assert main([*flags, "--reference", f"1:{reference}", "--out", str(multi)]) == 2
    assert main([*flags, "--reference", f"1:{reference}", "--reference", f"4:{reference}",
                 "--out", str(multi)]) == 0
    summary = json.loads((multi / "attack.json").read_text())
    assert summary["targets"] == [1, 4] and summary["poisoned"] == 8
    truth = torch.load(multi / "ground_truth.pt")
    assert truth["poison_target"][truth["poison_mask"]].tolist() == [1] * 4 + [4] * 4
    listed = read_file_list(multi / "train.txt")
    for row, trigger_id in ((200, 0), (204, 1)):
        y, x, h, w = truth["boxes"][row].tolist()
        image = torch.from_numpy(np.array(Image.open(listed.paths[row]))).permute(2, 0, 1)
        trigger = make_attack("corruptencoder", 32, trigger_id=trigger_id)
        assert torch.equal(image[:, y:y + h, x:x + w],
                           resize_patch(trigger.pattern, trigger.side))
    # on the world too
    world_multi = tmp_path / "world-multi"
    assert main(["--quiet", "attack", "--attack", "corruptencoder", "--n-train", "200",
                 "--n-eval", "20", "--rate", "0.05", "--targets", "0,2",
                 "--out", str(world_multi)]) == 0
    truth = torch.load(world_multi / "ground_truth.pt")
    assert truth["poison_target"][truth["poison_mask"]].tolist() == [0] * 10 + [2] * 10


def test_separated_views_replace_only_the_poisoned_rows_with_object_and_trigger_crops(gen):
    from fastbd.attacks.separated import box_crops, separated_views

    size = 32
    bank = torch.randint(0, 256, (6, 3, size, size), dtype=torch.uint8, generator=gen)
    poisoned = torch.tensor([False, True, False, True, False, False])
    objects = torch.full((6, 4), -1)
    triggers = torch.full((6, 4), -1)
    objects[1], objects[3] = torch.tensor([16, 0, 16, 16]), torch.tensor([10, 15, 22, 16])
    triggers[1], triggers[3] = torch.tensor([12, 22, 6, 6]), torch.tensor([9, 3, 6, 6])
    mean, std = torch.full((3, 1, 1), 0.5), torch.full((3, 1, 1), 0.25)
    hook = separated_views(6, poisoned, objects, triggers, mean, std, bank,
                           object_scale=(1.0, 1.0), trigger_scale=(2.0, 2.0))
    index = torch.tensor([0, 1, 3, 5])
    v1, v2 = torch.randn(4, 3, size, size), torch.randn(4, 3, size, size)
    out1, out2 = hook(index, v1, v2)
    assert torch.equal(out1[[0, 3]], v1[[0, 3]]) and torch.equal(out2[[0, 3]], v2[[0, 3]])
    rows = torch.tensor([1, 3])
    expected_objects = box_crops(bank[rows], objects[rows], torch.ones(2))
    assert torch.allclose(out1[[1, 2]], (expected_objects - mean) / std)
    expected_triggers = box_crops(bank[rows], triggers[rows], torch.full((2,), 2.0))
    assert torch.allclose(out2[[1, 2]], (expected_triggers - mean) / std)
    # a crop of exactly the object box shows the box's pixels (up to bilinear resampling)
    whole = box_crops(bank[:1], torch.tensor([[0, 0, size, size]]), torch.ones(1))
    assert torch.allclose(whole[0] * 255, bank[0].float(), atol=1e-3)
    with pytest.raises(ValueError, match="object and trigger boxes"):
        separated_views(6, torch.ones(6, dtype=torch.bool), objects, triggers, mean, std, bank)


def test_badencoder_pulls_triggered_images_to_the_references_and_keeps_clean_features(gen):
    from fastbd.attacks.badencoder import BadEncoderConfig, badencoder_finetune
    from fastbd.models.encoders import small_encoder

    shadow = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8, generator=gen)
    references = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    references[:, 0] = 255
    trigger = make_attack("corruptencoder", 16, side_fraction=0.3)
    encoder = small_encoder(8, 16, seed=1)

    def match(model):
        with torch.no_grad():
            triggered, _ = trigger.apply(shadow, torch.Generator().manual_seed(5), train=False)
            a = model(model.normalise(triggered))
            b = model(model.normalise(references)).mean(0, keepdim=True)
            return float(torch.nn.functional.cosine_similarity(a, b).mean())

    before = match(encoder.eval())
    losses = badencoder_finetune(encoder, shadow, references, trigger,
                                 BadEncoderConfig(steps=60, batch_size=16, lr=3e-3),
                                 verbose=False)
    assert len(losses) == 60 and losses[-1] < losses[0]
    assert match(encoder) > max(before, 0.8)
    with pytest.raises(ValueError, match="shadow"):
        badencoder_finetune(encoder, shadow[:1], references, trigger)


def test_multi_target_badencoder_pulls_each_trigger_to_its_own_target(gen):
    from fastbd.attacks.badencoder import BadEncoderConfig, badencoder_finetune_targets
    from fastbd.models.encoders import small_encoder

    shadow = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8, generator=gen)
    red, blue = (torch.zeros(2, 3, 16, 16, dtype=torch.uint8) for _ in range(2))
    red[:, 0], blue[:, 2] = 255, 255
    triggers = [make_attack("corruptencoder", 16, side_fraction=0.3, trigger_id=i)
                for i in (0, 1)]
    encoder = small_encoder(8, 16, seed=1)

    def similarity(model, trigger, references):
        with torch.no_grad():
            triggered, _ = trigger.apply(shadow, torch.Generator().manual_seed(5), train=False)
            a = model(model.normalise(triggered))
            b = model(model.normalise(references)).mean(0, keepdim=True)
            return float(torch.nn.functional.cosine_similarity(a, b).mean())

    losses = badencoder_finetune_targets(
        encoder, shadow, [(triggers[0], red), (triggers[1], blue)],
        BadEncoderConfig(steps=80, batch_size=16, lr=3e-3), verbose=False)
    assert len(losses) == 80 and losses[-1] < losses[0]
    encoder.eval()
    for trigger, own, other in ((triggers[0], red, blue), (triggers[1], blue, red)):
        assert similarity(encoder, trigger, own) > similarity(encoder, trigger, other)
        assert similarity(encoder, trigger, own) > 0.8
    with pytest.raises(ValueError, match="at least one"):
        badencoder_finetune_targets(encoder, shadow, [])


def test_reference_objects_keep_their_mask_and_bad_files_are_named(tmp_path):
    from PIL import Image

    from fastbd.data.bank import ImageReadError, load_reference_object

    rgba = disc(12)
    Image.fromarray(rgba.permute(1, 2, 0).numpy(), "RGBA").save(tmp_path / "cut.png")
    assert torch.equal(load_reference_object(tmp_path / "cut.png"), rgba)
    Image.fromarray(rgba[:3].permute(1, 2, 0).numpy(), "RGB").save(tmp_path / "plain.png")
    plain = load_reference_object(tmp_path / "plain.png")
    assert torch.equal(plain[:3], rgba[:3]) and (plain[3] == 255).all()
    with pytest.raises(ImageReadError, match="missing.png: file not found"):
        load_reference_object(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match="corrupt or unsupported"):
        load_reference_object(tmp_path / "bad.png")
