"""RoCLIP (fastbd.baselines.roclip): the caption pool on constructed features, the step loss
against a hand computation, the pool in an interrupted and resumed run, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from fastbd.baselines import CaptionPool, RoCLIPConfig, RoCLIPObjective, train_roclip
from fastbd.models.clip import TinyCLIPConfig, clip_tokenizer, tiny_clip, tokenize
from fastbd.training.clip import CLIPTrainConfig, batch_clip_loss, clip_loss, pair_features

TINY = TinyCLIPConfig(vision_layers=1, text_layers=1, resnet_layers=(1, 1, 1, 1))


def unit(*rows: list[float]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def test_the_pool_swaps_each_image_for_its_nearest_other_caption():
    pool = CaptionPool(4)
    captions = unit([1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0])
    pool.add(captions, torch.tensor([10, 11, 12, 13]))
    images = unit([1, 0.1, 0], [0, 0, 1], [0.9, 1, 0])
    matched = pool.nearest(images, torch.tensor([20, 21, 13]))
    # image 0 is nearest caption 10, image 1 caption 12; image 2 is nearest its own row 13,
    # which the pool never offers: the next nearest, caption 11 (cos 0.74 against 10's 0.67)
    assert torch.equal(matched, captions[[0, 2, 1]])


def test_the_pool_is_first_in_first_out_and_keeps_the_newest_of_an_oversized_batch():
    pool = CaptionPool(3)
    pool.add(unit([1, 0], [0, 1]), torch.tensor([0, 1]))
    pool.add(unit([1, 1], [-1, 0]), torch.tensor([2, 3]))  # row 0 leaves
    assert pool.count == 3 and sorted(pool.rows.tolist()) == [1, 2, 3]
    assert torch.equal(pool.nearest(unit([1, 0.1]), torch.tensor([9])), unit([1, 1])[0][None])
    pool.add(unit([0, -1], [1, -1], [-1, -1], [2, 1]), torch.tensor([4, 5, 6, 7]))
    assert sorted(pool.rows.tolist()) == [5, 6, 7]
    assert pool.nearest(unit([1, 0]), torch.tensor([7])).tolist() == unit([1, -1]).tolist()
    with pytest.raises(ValueError, match="empty"):
        CaptionPool(2).nearest(unit([1, 0]), torch.tensor([0]))


def test_roclip_config_refuses_a_pool_that_cannot_hold_two_captions():
    with pytest.raises(ValueError, match="pool_size"):
        RoCLIPConfig(pool_size=1)


def small_pairs(gen: torch.Generator, n: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
    tokens = tokenize(clip_tokenizer(), [f"a photo of thing {i}." for i in range(n)],
                      TINY.context_length)
    return images, tokens


def test_roclip_loss_is_infonce_in_plain_epochs_and_against_the_pool_in_refreshing_ones(gen):
    images, tokens = small_pairs(gen)
    model = tiny_clip(TINY, seed=1).eval()
    objective = RoCLIPObjective(RoCLIPConfig(augment=False, refresh_every=2))
    first, second = torch.arange(0, 8), torch.arange(8, 16)
    with torch.no_grad():
        plain = objective.loss(model, images[first], tokens[first], first, 0, torch.device("cpu"))
        assert torch.allclose(plain, batch_clip_loss(model, images[first], tokens[first], "cpu"))
        assert objective.pool.count == 0  # plain epochs leave the pool alone
        # the first refreshing batch enters the pool, then each image takes its nearest other
        objective.loss(model, images[first], tokens[first], first, 1, torch.device("cpu"))
        assert objective.pool.count == 8 and objective.pool.rows[:8].tolist() == first.tolist()
        loss = objective.loss(model, images[second], tokens[second], second, 1,
                              torch.device("cpu"))
        image_features, text_features = pair_features(model, images[second], tokens[second],
                                                      "cpu")
        _, pooled = pair_features(model, images[first], tokens[first], "cpu")
        pooled = F.normalize(pooled, dim=1)
        nearest = (F.normalize(image_features, dim=1) @ pooled.T).argmax(1)
        expected = clip_loss(image_features, pooled[nearest], model.logit_scale)
    assert torch.allclose(loss, expected, atol=1e-6)
    # the batch's captions entered after the lookup
    assert objective.pool.count == 16 and objective.pool.rows[8:16].tolist() == second.tolist()
    assert torch.allclose(objective.pool.features[8:16], F.normalize(text_features, dim=1),
                          atol=1e-6)


def test_the_caption_pool_carries_no_gradient_to_the_text_tower(gen):
    images, tokens = small_pairs(gen)
    model = tiny_clip(TINY, seed=1)
    objective = RoCLIPObjective(RoCLIPConfig(augment=False, refresh_every=1))
    rows = torch.arange(8)
    objective.loss(model, images[rows], tokens[rows], rows, 0, torch.device("cpu")).backward()
    text = [p.grad for name, p in model.named_parameters() if name.startswith("transformer")]
    visual = [p.grad for name, p in model.named_parameters() if name.startswith("visual")]
    assert text and all(g is None or not g.any() for g in text)
    assert any(g is not None and g.any() for g in visual)


def test_interrupted_roclip_training_resumes_to_the_uninterrupted_weights(gen, tmp_path,
                                                                         monkeypatch):
    import fastbd.baselines.roclip as roclip_module

    images, tokens = small_pairs(gen)
    train = CLIPTrainConfig(epochs=4, batch_size=8, warmup_steps=1, seed=3)
    config = RoCLIPConfig(pool_size=12, seed=5)

    def weights(model):
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    uninterrupted = tiny_clip(TINY, seed=1)
    reference = train_roclip(uninterrupted, images, tokens, train, config, verbose=False)
    checkpoint = tmp_path / "roclip.ckpt"
    calls, loss = [], roclip_module.clip_loss

    def interrupt_in_epoch_four(*args):
        calls.append(1)
        if len(calls) == 7:  # the first step of the fourth epoch, a refreshing one
            raise KeyboardInterrupt
        return loss(*args)

    monkeypatch.setattr(roclip_module, "clip_loss", interrupt_in_epoch_four)
    with pytest.raises(KeyboardInterrupt):
        train_roclip(tiny_clip(TINY, seed=1), images, tokens, train, config, verbose=False,
                     checkpoint=checkpoint)
    monkeypatch.setattr(roclip_module, "clip_loss", loss)
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["units_done"] == 3 and saved["extra"]["objective"]["count"] == 12
    resumed_model = tiny_clip(TINY, seed=9)
    resumed = train_roclip(resumed_model, images, tokens, train, config, verbose=False,
                           checkpoint=checkpoint)
    assert torch.equal(weights(resumed_model), weights(uninterrupted))
    assert resumed.losses == reference.losses and not checkpoint.exists()
    assert resumed.config["objective"]["method"] == "roclip"
    # a plain run's state is another run's: refused, not mixed with RoCLIP's
    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(roclip_module, "clip_loss", interrupt_in_epoch_four)
        calls.clear()
        train_roclip(tiny_clip(TINY, seed=1), images, tokens, train, config, verbose=False,
                     checkpoint=checkpoint)
    from fastbd.training.clip import train_clip
    with pytest.raises(ValueError, match="another run"):
        train_clip(tiny_clip(TINY, seed=1), images, tokens, train, verbose=False,
                   checkpoint=checkpoint)


def test_train_clip_cli_trains_with_roclip_and_records_it(tmp_path):
    from fastbd.cli import main

    out, cache = tmp_path / "roclip", tmp_path / "cache"
    assert main(["--quiet", "train-clip", "--attack", "badnet", "--defense", "roclip",
                 "--pool-size", "64", "--epochs", "2", "--n-train", "200", "--n-eval", "50",
                 "--cache", str(cache), "--out", str(out)]) == 0
    record = json.loads((out / "train_clip.json").read_text())
    assert record["defense"]["method"] == "roclip" and record["defense"]["pool_size"] == 64
    assert (out / "clip.pt").is_file()
    assert len(list(cache.glob("clip-*-*.pt"))) == 1  # named apart from a plain threat model


def test_train_clip_cli_refuses_roclip_flags_without_roclip(tmp_path, capsys):
    from fastbd.cli import main

    assert main(["--quiet", "train-clip", "--n-train", "20", "--n-eval", "4", "--pool-size",
                 "64", "--out", str(tmp_path / "x")]) == 2
    assert "--defense roclip" in capsys.readouterr().err


def test_roclip_is_offered_by_the_registry_and_names_cannot_be_taken_twice():
    from fastbd import registry

    entry = registry.training_defense("roclip")
    assert isinstance(entry.objective(entry.config(pool_size=8)), RoCLIPObjective)
    for taken in ("roclip", "none"):
        with pytest.raises(ValueError, match="already registered"):
            registry.register_training_defense(taken, entry)
    with pytest.raises(ValueError, match="known: roclip"):
        registry.training_defense("nope")
