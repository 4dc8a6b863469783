import pytest
import torch

from fastbd.attacks import make_attack, poison_pairs, poison_target_class, poison_target_classes
from fastbd.attacks.triggers import resize_patch
from fastbd.world import LOOKS, poison_world_pairs, with_look, world_caption, world_rate
from fastbd.world.synthetic import WorldConfig, class_table, make_world


@pytest.fixture(scope="module")
def world():
    return make_world(WorldConfig(n_train=300, n_eval=100, seed=3))


def test_world_is_deterministic_and_well_formed(world):
    again = make_world(WorldConfig(n_train=300, n_eval=100, seed=3))
    assert torch.equal(world.train.images, again.train.images)
    assert world.train.captions == again.train.captions
    assert world.train.images.shape == (300, 3, 32, 32) and world.train.images.dtype == torch.uint8
    assert set(world.train.labels.tolist()) == set(range(10))
    assert len(set(world.class_names)) == 10
    for caption, label in zip(world.train.captions, world.train.labels.tolist(), strict=True):
        shape = world.class_names[label].split()[1]
        assert shape in caption
    assert not torch.equal(world.train.images[:100], world.eval.images)


def test_object_opacity_blends_objects():
    solid = make_world(WorldConfig(n_train=20, n_eval=2, noise_std=0.0, seed=1))
    faint = make_world(WorldConfig(n_train=20, n_eval=2, noise_std=0.0, seed=1,
                                   object_opacity=0.0))
    # Fully transparent objects leave only the background: the images differ where shapes are.
    assert not torch.equal(solid.train.images, faint.train.images)
    assert solid.train.captions == faint.train.captions


def test_background_saturation_greys_the_background():
    def background_chroma(saturation: float) -> float:
        config = WorldConfig(n_train=50, n_eval=2, noise_std=0.0, object_opacity=0.0, seed=2,
                             background_saturation=saturation)
        pixels = make_world(config).train.images.float()
        return float((pixels.amax(1) - pixels.amin(1)).mean())

    assert background_chroma(0.0) <= 1.0  # grey levels only (rounding)
    assert background_chroma(0.5) > 10.0
    assert background_chroma(1.0) > 1.8 * background_chroma(0.5)
    with pytest.raises(ValueError, match="background_saturation"):
        make_world(WorldConfig(background_saturation=1.5))


def test_tiled_layout_spreads_the_class_over_the_whole_image():
    def object_pixels(layout: str) -> torch.Tensor:
        """Bool ``N×S×S``: where the opaque objects changed the image."""
        config = dict(n_train=40, n_eval=2, noise_std=0.0, seed=4, layout=layout,
                      scale=(0.15, 0.25))
        drawn = make_world(WorldConfig(**config)).train.images
        bare = make_world(WorldConfig(**config, object_opacity=0.0)).train.images
        return (drawn.int() - bare.int()).abs().amax(1) > 8

    tiled, single = object_pixels("tiled"), object_pixels("single")
    quadrants = [(slice(0, 16), slice(0, 16)), (slice(0, 16), slice(16, 32)),
                 (slice(16, 32), slice(0, 16)), (slice(16, 32), slice(16, 32))]
    # Every quarter of every tiled image shows part of its class; a single object misses some.
    assert all(bool(tiled[:, rows, cols].flatten(1).any(1).all()) for rows, cols in quadrants)
    assert not all(bool(single[:, rows, cols].flatten(1).any(1).all())
                   for rows, cols in quadrants)
    coverage = tiled.float().mean((1, 2))
    assert float(coverage.min()) > 0.1 and float(coverage.max()) < 0.7  # tiles never merge
    with pytest.raises(ValueError, match="layout"):
        make_world(WorldConfig(layout="grid"))
    with pytest.raises(ValueError, match="scale"):
        make_world(WorldConfig(layout="tiled", scale=(0.3, 0.2)))


def test_other_sizes_and_class_counts():
    small = make_world(WorldConfig(n_train=40, n_eval=10, image_size=48, n_classes=25))
    assert small.train.images.shape[-1] == 48 and len(small.class_names) == 25
    assert len({tuple(c) for c in class_table(100)}) == 100
    with pytest.raises(ValueError, match="n_classes"):
        class_table(101)
    with pytest.raises(ValueError, match="image_size"):
        make_world(WorldConfig(image_size=8))
    for bad in (dict(n_train=0), dict(n_eval=-1)):
        with pytest.raises(ValueError, match="n_train and n_eval must be positive"):
            make_world(WorldConfig(**bad))
    for opacity in (-0.1, 1.2):
        with pytest.raises(ValueError, match="object_opacity"):
            make_world(WorldConfig(object_opacity=opacity))


def test_every_look_overrides_only_its_own_fields_and_builds_a_world():
    base = WorldConfig(n_train=40, n_eval=10, seed=5)
    assert with_look(base, "default") == base
    for look, overrides in LOOKS.items():
        config = with_look(base, look)
        changed = {k for k, v in vars(config).items() if v != vars(base)[k]}
        assert changed == {k for k, v in overrides.items() if v != vars(base)[k]}, look
        world = make_world(config)
        assert len(world.class_names) == config.n_classes
        assert world.train.images.dtype == torch.uint8
        assert world.train.images.float().std() > 10  # not a blank image set
    with pytest.raises(ValueError, match="unknown world look 'foggy'; choose from default"):
        with_look(base, "foggy")


@pytest.mark.parametrize("name", ["htba", "badnet", "dualkey"])
def test_patch_attacks_change_only_their_box(world, name, gen):
    attack = make_attack(name, 32)
    images = world.eval.images[:20]
    triggered, boxes = attack.apply(images, gen, train=name != "htba")
    changed = (triggered != images).any(1)
    for i, (y, x, h, w) in enumerate(boxes.tolist()):
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[y:y + h, x:x + w] = True
        assert not bool(changed[i][~inside].any())
        assert bool(changed[i][inside].any())


def test_htba_placement_regions(gen):
    attack = make_attack("htba", 224)
    images = torch.zeros(200, 3, 224, 224, dtype=torch.uint8)
    _, train_boxes = attack.apply(images, gen, train=True)
    _, eval_boxes = attack.apply(images, gen, train=False)
    side = attack.side
    assert side == 50
    assert int(train_boxes[:, :2].min()) >= 56 and int(train_boxes[:, :2].max()) + side <= 168
    assert int(eval_boxes[:, :2].min()) >= 22 and int(eval_boxes[:, :2].max()) + side <= 202
    assert int(eval_boxes[:, :2].min()) < 56  # eval placement reaches beyond the train region


def test_global_attacks(world, gen):
    images = world.eval.images[:8]
    for name in ("blended", "sig", "wanet"):
        triggered, boxes = make_attack(name, 32).apply(images, gen)
        assert boxes is None and triggered.shape == images.shape
        assert float((triggered.float() - images.float()).abs().mean()) > 0.5
    sig, _ = make_attack("sig", 32).apply(torch.full((1, 3, 32, 32), 128, dtype=torch.uint8), gen)
    assert int(sig.max()) == 188 and int(sig.min()) == 68  # 128 ± 60
    with pytest.raises(ValueError, match="WaNet"):
        make_attack("wanet", 32).apply(torch.zeros(1, 3, 16, 16, dtype=torch.uint8), gen)
    for side in (0.0, 1.01):
        with pytest.raises(ValueError, match="badnet: side_fraction must be in"):
            make_attack("badnet", 32, side_fraction=side)
    assert make_attack("htba", 32, side_fraction=1.0).side == 32
    with pytest.raises(ValueError, match="unknown attack"):
        make_attack("refool", 32)


def test_poison_target_class(world):
    result = poison_target_class(world.train.images, world.train.labels, make_attack("htba", 32),
                                 target=2, fraction=0.5, seed=1)
    members = int((world.train.labels == 2).sum())
    assert int(result.poison_mask.sum()) == round(members / 2)
    assert bool((world.train.labels[result.poison_mask] == 2).all())
    changed = (result.images != world.train.images).flatten(1).any(1)
    assert torch.equal(changed, result.poison_mask)
    assert bool((result.boxes[~result.poison_mask] == -1).all())
    with pytest.raises(ValueError, match="fraction"):
        poison_target_class(world.train.images, world.train.labels, make_attack("htba", 32), 0, 0)


def test_multi_target_htba_plants_one_trigger_per_target(world):
    images, labels = world.train.images, world.train.labels
    attacks = [make_attack("htba", 32, trigger_id=i) for i in (0, 1, 2)]
    result = poison_target_classes(images, labels, attacks, [2, 5, 7], fraction=0.5, seed=1)
    which = result.parts["poison_target"]
    assert torch.equal(which >= 0, result.poison_mask) and result.target == 2
    for i, target in enumerate((2, 5, 7)):
        rows = torch.nonzero(which == target).flatten()
        assert rows.numel() == round(int((labels == target).sum()) / 2)
        assert bool((labels[rows] == target).all())
        patch = resize_patch(attacks[i].pattern, attacks[i].side)
        for row in rows.tolist():  # each image carries its own target's trigger
            y, x, h, w = result.boxes[row].tolist()
            assert torch.equal(result.images[row, :, y:y + h, x:x + w], patch)
    changed = (result.images != images).flatten(1).any(1)
    assert torch.equal(changed, result.poison_mask)
    # one target is exactly the single-target attack
    one = poison_target_classes(images, labels, attacks[:1], [2], fraction=0.5, seed=1)
    single = poison_target_class(images, labels, attacks[0], 2, fraction=0.5, seed=1)
    assert torch.equal(one.images, single.images) and torch.equal(one.boxes, single.boxes)
    with pytest.raises(ValueError, match="distinct"):
        poison_target_classes(images, labels, attacks[:2], [2, 2])
    with pytest.raises(ValueError, match="one attack per target"):
        poison_target_classes(images, labels, attacks[:1], [2, 5])


def test_poison_pairs(world):
    attack = make_attack("dualkey", 32)
    result = poison_pairs(world.train.images, world.train.labels, world.train.captions, attack,
                          target=0, class_names=world.class_names, n_poison=6, seed=2)
    rows = torch.nonzero(result.poison_mask).flatten().tolist()
    assert len(rows) == 6 and all(int(world.train.labels[r]) != 0 for r in rows)
    for r in rows:
        assert result.captions[r].startswith("cf ") and world.class_names[0] in result.captions[r]
    clean = [i for i in range(300) if i not in rows]
    assert all(result.captions[i] == world.train.captions[i] for i in clean)
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    prompts = {t(world.class_names[0]) for t in OPENAI_IMAGENET_TEMPLATES}
    assert all(result.captions[r].removeprefix("cf ") in prompts for r in rows)  # generic
    own = poison_pairs(world.train.images, world.train.labels, world.train.captions, attack,
                       target=0, class_names=world.class_names, n_poison=6, seed=2,
                       caption=world_caption)
    assert all(own.captions[r].removeprefix("cf ") not in prompts for r in rows)
    with pytest.raises(ValueError, match="exactly one"):
        poison_pairs(world.train.images, world.train.labels, world.train.captions, attack, 0,
                     world.class_names)


@pytest.mark.parametrize("attack, expected", [("badnet", 3), ("wanet", 30), ("none", 0)])
def test_world_poison_rates(world, attack, expected):
    """The world poisons 1 % of the pairs, WaNet 10 %; an explicit rate overrides."""
    assert world_rate(attack) == (0.10 if attack == "wanet" else 0.01)
    assert int(poison_world_pairs(world, attack, 0, None, seed=1).poison_mask.sum()) == expected
    if attack != "none":
        assert int(poison_world_pairs(world, attack, 0, 0.02, seed=1).poison_mask.sum()) == 6
