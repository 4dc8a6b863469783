import math

import pytest
import torch
import torch.nn.functional as F

from fastbd.data.augment import AugmentConfig, augment, crop_windows, random_resized_crop
from fastbd.eval import retrieval_recall, zero_shot_predict, zero_shot_weights
from fastbd.models import (
    Encoder,
    embed_images,
    open_clip_image_encoder,
    small_encoder,
    timm_encoder,
    torchvision_encoder,
)
from fastbd.models.clip import TinyCLIPConfig, clip_tokenizer, tiny_clip, tokenize
from fastbd.training.clip import clip_loss
from fastbd.training.ssl import (
    SSLConfig,
    byol_loss,
    cutmix_views,
    moco_loss,
    nt_xent,
    train_ssl,
)


def test_small_encoder_and_embedding(gen):
    encoder = small_encoder(4)
    images = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8, generator=gen)
    features = embed_images(encoder, images, batch_size=3)
    assert features.shape == (7, 32)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(7))
    assert embed_images(encoder, images[:0]).shape == (0, 32)


@pytest.mark.parametrize("build", [
    lambda seed: small_encoder(4, seed=seed),
    lambda seed: timm_encoder("test_vit", image_size=32, seed=seed),
    lambda seed: torchvision_encoder("resnet18", image_size=32, seed=seed),
], ids=["small", "timm", "torchvision"])
def test_random_encoder_weights_follow_from_the_seed_alone(build):
    def weights(seed: int) -> torch.Tensor:
        torch.rand(17)  # whatever ran before must not matter (torch seeds each process anew)
        return torch.cat([p.flatten() for p in build(seed).backbone.parameters()])

    state = torch.random.get_rng_state()
    first = weights(3)
    assert torch.equal(torch.random.get_rng_state(), _after_draw(state, 17))
    assert torch.equal(first, weights(3))
    assert not torch.equal(first, weights(4))


def _after_draw(state: torch.Tensor, n: int) -> torch.Tensor:
    """The global RNG state after ``n`` uniform draws from ``state``."""
    saved = torch.random.get_rng_state()
    torch.random.set_rng_state(state)
    torch.rand(n)
    after = torch.random.get_rng_state()
    torch.random.set_rng_state(saved)
    return after


def test_embed_rejects_nan_encoder():
    encoder = small_encoder(4)
    torch.nn.init.constant_(encoder.backbone.features[0].weight, float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        embed_images(encoder, torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_timm_encoder_loads_moco_v3_checkpoint(tmp_path):
    source = timm_encoder("resnet18", image_size=64)
    state = {"state_dict": {f"module.base_encoder.{k}": v for k, v in
                            source.backbone.state_dict().items()}}
    state["state_dict"]["module.base_encoder.fc.0.weight"] = torch.zeros(4, 4)  # MoCo head
    state["state_dict"]["module.momentum_encoder.conv1.weight"] = torch.zeros(1)
    state["state_dict"]["module.predictor.0.weight"] = torch.zeros(1)
    path = tmp_path / "moco.pth.tar"
    torch.save(state, path)
    loaded = timm_encoder("resnet18", checkpoint=path, image_size=64)
    x = torch.randn(2, 3, 64, 64)
    source.eval()
    loaded.eval()
    torch.testing.assert_close(loaded(x), source(x))
    assert loaded.feature_dim == 512


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        timm_encoder("resnet18", checkpoint=tmp_path / "none.pt")
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="lacks"):
        torchvision_encoder("resnet18", checkpoint=tmp_path / "partial.pt")


def test_torchvision_and_open_clip_towers():
    encoder = torchvision_encoder("resnet18", image_size=64).eval()
    assert encoder(torch.randn(1, 3, 64, 64)).shape == (1, 512)
    tower = open_clip_image_encoder(tiny_clip(TinyCLIPConfig(vision_layers=1, text_layers=1)))
    assert tower.image_size == 32 and tower.feature_dim == 64
    assert tower(torch.randn(2, 3, 32, 32)).shape == (2, 64)


def test_augment_shapes_ranges_and_identity(gen):
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=gen)
    mean = torch.zeros(3, 1, 1)
    std = torch.ones(3, 1, 1)
    out = augment(images, AugmentConfig(), mean, std, gen)
    assert out.shape == (6, 3, 16, 16) and float(out.min()) >= 0 and float(out.max()) <= 1
    identity = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0,
                             jitter_p=0.0, grayscale_p=0.0)
    torch.testing.assert_close(augment(images, identity, mean, std, gen), images.float() / 255,
                               atol=1e-5, rtol=0)


def test_crop_windows_are_the_crops_random_resized_crop_takes():
    # A coordinate image: after the crop, corner pixels read where the window lies.
    size, n = 64, 50
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    coords = torch.stack([ys, xs])[None].expand(n, -1, -1, -1).contiguous() / size * 2 - 1
    scale, ratio = (0.1, 0.6), (3 / 4, 4 / 3)
    theta = crop_windows(n, scale, ratio, 0.5, torch.Generator().manual_seed(3))
    cropped = random_resized_crop(coords, scale, ratio, 0.5, torch.Generator().manual_seed(3))
    width, height = theta[:, 0, 0].abs(), theta[:, 1, 1]
    area = width * height  # half-extents in [−1, 1] units = side fractions
    assert bool((area >= scale[0] - 1e-6).all()) and bool((area <= scale[1] + 1e-6).all())
    assert bool((theta[:, 0, 2].abs() + width <= 1 + 1e-6).all())
    assert bool((theta[:, 1, 2].abs() + height <= 1 + 1e-6).all())
    flipped = theta[:, 0, 0] < 0
    assert 0 < int(flipped.sum()) < n
    step = 1 / size  # pixel centres sit half a pixel in from the window's edges
    top = theta[:, 1, 2] - height * (1 - step)
    left = torch.where(flipped, theta[:, 0, 2] + width * (1 - step),
                       theta[:, 0, 2] - width * (1 - step))
    # Within a pixel: reflection padding bends the reading where a window touches the border.
    torch.testing.assert_close(cropped[:, 0, 0, 0], top, atol=step, rtol=0)
    torch.testing.assert_close(cropped[:, 1, 0, 0], left, atol=step, rtol=0)
    assert crop_windows(0, scale, ratio, 0.5, torch.Generator()).shape == (0, 2, 3)


def test_ssl_view_hook_sees_every_image_and_sets_the_views(gen):
    images = torch.randint(0, 256, (48, 3, 16, 16), dtype=torch.uint8, generator=gen)
    seen = []

    def same_view(index, v1, v2):
        assert v1.shape == v2.shape == (index.numel(), 3, 16, 16)
        seen.append(index.clone())
        return v1, v1.clone()

    history = train_ssl(small_encoder(4, 16), images, SSLConfig(epochs=2, batch_size=16,
                        warmup_epochs=1), verbose=False, view_hook=same_view)
    assert len(seen) == 6 and sorted(torch.cat(seen[:3]).tolist()) == list(range(48))
    plain = train_ssl(small_encoder(4, 16), images, SSLConfig(epochs=2, batch_size=16,
                      warmup_epochs=1), verbose=False)
    # Identical views are the easiest positive pairs: the hook's views were trained on.
    assert history.losses[-1] < plain.losses[-1]


def test_losses():
    z = torch.randn(8, 5)
    assert float(byol_loss(z, z)) == pytest.approx(0.0, abs=1e-6)
    assert float(byol_loss(z, -z)) == pytest.approx(4.0, abs=1e-5)
    # Perfectly aligned, well separated views give a lower NT-Xent than random ones.
    basis = torch.eye(8) * 10
    assert float(nt_xent(basis, basis, 0.2)) < float(nt_xent(basis, torch.randn(8, 8), 0.2))
    # MoCo v3: keys matching their own predictions give a lower loss than shuffled ones; the
    # 2·temperature scale makes uniform logits cost 2τ·log B.
    assert float(moco_loss(basis, basis, 0.2)) < float(moco_loss(basis, basis.roll(1, 0), 0.2))
    assert float(moco_loss(torch.ones(4, 3), torch.ones(4, 3), 0.5)) == pytest.approx(
        math.log(4), abs=1e-5)
    logits_uniform = clip_loss(torch.ones(4, 3), torch.ones(4, 3), torch.tensor(0.0))
    assert float(logits_uniform) == pytest.approx(math.log(4), abs=1e-5)


@pytest.mark.parametrize("method", ["simclr", "byol", "mocov3"])
def test_ssl_training_reduces_loss(gen, method):
    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8, generator=gen)
    encoder = small_encoder(4, 16)
    history = train_ssl(encoder, images, SSLConfig(method=method, epochs=20, batch_size=32,
                                                   warmup_epochs=1), verbose=False)
    assert len(history.losses) == 40 and history.images_per_second > 0
    assert sum(history.losses[-5:]) < sum(history.losses[:5])
    with pytest.raises(ValueError, match="method"):
        train_ssl(encoder, images, SSLConfig(method="moco"), verbose=False)
    with pytest.raises(ValueError, match="uint8"):
        train_ssl(encoder, images.float(), verbose=False)


def test_per_epoch_evaluation_leaves_training_as_it_is_and_survives_a_resume(gen, tmp_path):
    images = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8, generator=gen)
    config = SSLConfig(epochs=3, batch_size=16, warmup_epochs=1, seed=5)

    def weights(encoder):
        return torch.cat([p.detach().flatten() for p in encoder.parameters()])

    def evaluate(encoder):  # draws from the global RNG and runs a forward in eval mode
        assert not encoder.training
        torch.rand(7)
        with torch.no_grad():
            return {"mean_feature": float(encoder(encoder.normalise(images[:4])).mean())}

    plain = small_encoder(4, 16, seed=2)
    train_ssl(plain, images, config, verbose=False)
    watched = small_encoder(4, 16, seed=2)
    history = train_ssl(watched, images, config, verbose=False, evaluate=evaluate,
                        evaluate_every=2)
    assert torch.equal(weights(watched), weights(plain))  # the evaluation changed nothing
    assert [e["epoch"] for e in history.evaluations] == [2, 3]  # every 2nd and the last
    # interrupted after epoch 2, resumed: the evaluations of both runs together
    calls = []

    def interrupt_in_epoch_three(index, v1, v2):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return v1, v2

    checkpoint = tmp_path / "ssl.ckpt"
    with pytest.raises(KeyboardInterrupt):
        train_ssl(small_encoder(4, 16, seed=2), images, config, verbose=False,
                  checkpoint=checkpoint, view_hook=interrupt_in_epoch_three, evaluate=evaluate,
                  evaluate_every=2)
    resumed = train_ssl(small_encoder(4, 16, seed=2), images, config, verbose=False,
                        checkpoint=checkpoint, evaluate=evaluate, evaluate_every=2)
    assert resumed.evaluations == history.evaluations
    with pytest.raises(ValueError, match="evaluate_every"):
        train_ssl(plain, images, config, verbose=False, evaluate=evaluate, evaluate_every=0)


def test_icutmix_views_and_loss_as_patchsearchs_recipe(gen):
    views = torch.rand(6, 3, 16, 16, generator=gen)
    mixed, partner, kept = cutmix_views(views, 1.0, torch.Generator().manual_seed(3))
    assert sorted(partner.tolist()) == list(range(6)) and 0.5 - 1 / 16 <= kept <= 1.0
    # one box, the same for every row, holds the partner's pixels; the rest is unchanged
    box = (mixed != views).any(0).any(0)
    rows, cols = torch.nonzero(box, as_tuple=True)
    assert rows.numel() > 0  # this seed's box is not empty
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[top:bottom, left:right] = True
    assert torch.equal(mixed[..., inside], views[partner][..., inside])
    assert kept == pytest.approx(1 - float(inside.sum()) / 256)
    assert torch.equal(mixed[..., ~box], views[..., ~box])
    again = cutmix_views(views, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(again[0], mixed) and again[2] == kept  # all draws from the generator
    # the loss: kept × own positive + (1 − kept) × the partner's, at MoCo v3's 2τ scale
    prediction, key = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    logits = F.normalize(prediction, dim=1) @ F.normalize(key, dim=1).T / 0.2
    by_hand = 2 * 0.2 * (0.7 * F.cross_entropy(logits, torch.arange(6))
                         + 0.3 * F.cross_entropy(logits, partner))
    torch.testing.assert_close(moco_loss(prediction, key, 0.2, partner, 0.7), by_hand)
    torch.testing.assert_close(moco_loss(prediction, key, 0.2, partner, 1.0),
                               moco_loss(prediction, key, 0.2))
    with pytest.raises(ValueError, match="icutmix follows PatchSearch's MoCo v3 recipe"):
        SSLConfig(method="simclr", icutmix=True)


def _small_encoder_with_dropout(seed: int) -> Encoder:
    """A small encoder whose forward draws from the global RNG (dropout)."""
    small = small_encoder(4, 16, seed=seed)
    return Encoder(torch.nn.Sequential(small.backbone, torch.nn.Dropout(0.3)),
                   small.feature_dim, 16)


@pytest.mark.parametrize("method, build, extra", [
    ("simclr", lambda seed: small_encoder(4, 16, seed=seed), {}),
    ("byol", lambda seed: small_encoder(4, 16, seed=seed), {}),
    ("mocov3", lambda seed: small_encoder(4, 16, seed=seed), {}),
    ("mocov3", lambda seed: small_encoder(4, 16, seed=seed), {"icutmix": True}),
    ("simclr", _small_encoder_with_dropout, {}),
], ids=["simclr", "byol", "mocov3", "mocov3-icutmix", "simclr-dropout"])
def test_interrupted_ssl_training_resumes_to_the_uninterrupted_weights(gen, tmp_path, method,
                                                                      build, extra):
    images = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8, generator=gen)
    config = SSLConfig(method=method, epochs=3, batch_size=16, warmup_epochs=1, seed=5, **extra)

    def weights(encoder):
        return torch.cat([p.detach().flatten() for p in encoder.parameters()])

    uninterrupted = build(2)
    reference = train_ssl(uninterrupted, images, config, verbose=False)
    checkpoint = tmp_path / "ssl.ckpt"
    calls = []

    def interrupt_in_epoch_three(index, v1, v2):
        calls.append(1)
        if len(calls) == 5:  # the first step of the third epoch (two steps per epoch)
            raise KeyboardInterrupt
        return v1, v2

    global_rng = torch.random.get_rng_state()
    interrupted = build(2)
    with pytest.raises(KeyboardInterrupt):
        train_ssl(interrupted, images, config, verbose=False, checkpoint=checkpoint,
                  view_hook=interrupt_in_epoch_three)
    assert checkpoint.is_file() and not checkpoint.with_name("ssl.ckpt.tmp").exists()
    assert torch.load(checkpoint, weights_only=True)["units_done"] == 2
    assert torch.equal(torch.random.get_rng_state(), global_rng)  # the caller's RNG untouched
    for other_images, other_config, differ in [
            (images.flip(0), config, "data"),
            (images, SSLConfig(method=method, epochs=4, batch_size=16, warmup_epochs=1, seed=5,
                               **extra), "config")]:
        with pytest.raises(ValueError, match=f"belongs to another run \\(its {differ} differ"):
            train_ssl(build(2), other_images, other_config, verbose=False,
                      checkpoint=checkpoint)
    resumed_encoder = build(7)  # the checkpoint's weights replace these
    resumed = train_ssl(resumed_encoder, images, config, verbose=False, checkpoint=checkpoint)
    assert torch.equal(weights(resumed_encoder), weights(uninterrupted))
    assert resumed.losses == reference.losses and not checkpoint.exists()


def test_interrupted_clip_training_resumes_to_the_uninterrupted_weights(gen, tmp_path,
                                                                       monkeypatch):
    import fastbd.training.clip as clip_module
    from fastbd.training.clip import CLIPTrainConfig, train_clip

    config = TinyCLIPConfig(vision_layers=1, text_layers=1, resnet_layers=(1, 1, 1, 1))
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8, generator=gen)
    tokens = tokenize(clip_tokenizer(), [f"a photo of thing {i}." for i in range(20)],
                      config.context_length)
    train = CLIPTrainConfig(epochs=3, batch_size=8, warmup_steps=1, seed=3)

    def weights(model):
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    uninterrupted = tiny_clip(config, seed=1)
    reference = train_clip(uninterrupted, images, tokens, train, verbose=False)
    checkpoint = tmp_path / "clip.ckpt"
    calls, loss = [], clip_module.clip_loss

    def interrupt_in_epoch_three(*args):
        calls.append(1)
        if len(calls) == 5:  # the first step of the third epoch (two steps per epoch)
            raise KeyboardInterrupt
        return loss(*args)

    global_rng = torch.random.get_rng_state()
    monkeypatch.setattr(clip_module, "clip_loss", interrupt_in_epoch_three)
    with pytest.raises(KeyboardInterrupt):
        train_clip(tiny_clip(config, seed=1), images, tokens, train, verbose=False,
                   checkpoint=checkpoint)
    monkeypatch.setattr(clip_module, "clip_loss", loss)
    assert torch.equal(torch.random.get_rng_state(), global_rng)
    assert torch.load(checkpoint, weights_only=True)["units_done"] == 2
    resumed_model = tiny_clip(config, seed=9)
    resumed = train_clip(resumed_model, images, tokens, train, verbose=False,
                         checkpoint=checkpoint)
    assert torch.equal(weights(resumed_model), weights(uninterrupted))
    assert resumed.losses == reference.losses and not checkpoint.exists()


def test_tokenize_rejects_overlong_captions():
    tokenizer = clip_tokenizer()
    tokens = tokenize(tokenizer, ["a red circle."], 32)
    assert tokens.shape == (1, 32) and int(tokens[0].argmax()) == int((tokens[0] != 0).sum()) - 1
    with pytest.raises(ValueError, match="longer than the context"):
        tokenize(tokenizer, ["word " * 40], 32)


def test_zero_shot_and_retrieval():
    model = tiny_clip(TinyCLIPConfig(vision_layers=1, text_layers=1))
    weights = zero_shot_weights(model, clip_tokenizer(), ["red circle", "blue square"],
                                ("a photo of a {}.", "a {}."))
    assert weights.shape == (2, 64)
    torch.testing.assert_close(weights.norm(dim=1), torch.ones(2))
    predictions = zero_shot_predict(model, torch.zeros(3, 3, 32, 32, dtype=torch.uint8), weights)
    assert predictions.shape == (3,) and set(predictions.tolist()) <= {0, 1}
    emb = F.normalize(torch.eye(4) + 0.01, dim=1)
    recall = retrieval_recall(emb, emb, ks=(1, 2))
    assert recall["image_to_text_R@1"] == 1.0 and recall["text_to_image_R@2"] == 1.0
    with pytest.raises(ValueError, match="at least one"):
        zero_shot_weights(model, clip_tokenizer(), [], ("{}",))


def test_retrieval_asr_and_the_kl_to_a_retrained_model(gen):
    from fastbd.eval import retrieval_attack_rate, zero_shot_kl, zero_shot_probabilities

    # captions of classes 0, 1, 2 along the axes; triggered images of classes 1, 2 and 0
    captions = torch.eye(3)
    triggered = F.normalize(torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.0, 0.9],
                                          [1.0, 0.0, 0.0]]), dim=1)
    # target 0: the class-0 image does not count; of the other two, one retrieves class 0
    assert retrieval_attack_rate(triggered, torch.tensor([1, 2, 0]), captions,
                                 torch.tensor([0, 1, 2]), 0) == 0.5
    with pytest.raises(ValueError, match="outside the target class"):
        retrieval_attack_rate(triggered[2:], torch.tensor([0]), captions,
                              torch.tensor([0, 1, 2]), 0)
    model = tiny_clip(TinyCLIPConfig(vision_layers=1, text_layers=1), seed=1).eval()
    other = tiny_clip(TinyCLIPConfig(vision_layers=1, text_layers=1), seed=2).eval()
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=gen)
    names, templates = ["red circle", "blue square", "green star"], ("a photo of a {}.",)
    assert zero_shot_kl(model, model, clip_tokenizer(), images, names, templates) == \
        pytest.approx(0.0, abs=1e-12)
    # by hand: mean over images of Σ_c p_other · log(p_other / p_model)
    p = [zero_shot_probabilities(m, images, zero_shot_weights(m, clip_tokenizer(), names,
                                                              templates))
         for m in (other, model)]
    torch.testing.assert_close(p[0].sum(1), torch.ones(5, dtype=torch.float64))
    by_hand = float((p[0] * (p[0] / p[1]).log()).sum(1).mean())
    assert zero_shot_kl(model, other, clip_tokenizer(), images, names, templates) == \
        pytest.approx(by_hand) and by_hand > 0


def test_class_name_and_template_presets_are_open_clips(tmp_path):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    from fastbd.cli.common import class_names_arg, templates_arg

    names = class_names_arg("imagenet")
    assert len(names) == 1000 and names == list(IMAGENET_CLASSNAMES)
    templates = templates_arg("openai")
    assert len(templates) == 80 and all("{}" in t for t in templates)
    assert [t.format("dog") for t in templates] == [t("dog") for t in OPENAI_IMAGENET_TEMPLATES]
    assert class_names_arg("cat, dog") == ["cat", "dog"]
    bad = tmp_path / "templates.txt"
    bad.write_text("a photo of a {}.\nno slot here\n")
    with pytest.raises(ValueError, match="no slot here"):
        templates_arg(str(bad))


def test_state_dict_mismatch_counts_and_names_examples():
    from torch import nn

    from fastbd.storage import state_dict_mismatch

    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    state = model.state_dict()
    assert state_dict_mismatch(model, state) == ""
    state = {**state, "0.weight": torch.zeros(5, 3), "extra": torch.zeros(1)}
    del state["1.bias"]
    assert state_dict_mismatch(model, state) == (
        "1 missing keys, e.g. 1.bias; 1 unexpected keys, e.g. extra; "
        "1 keys of another shape (checkpoint vs model), e.g. 0.weight (5, 3) vs (4, 3)")


def test_cpu_forwards_in_eval_mode_run_in_chunks_under_the_activation_budget(monkeypatch):
    """An eval-mode CPU forward splits a batch into chunks whose largest activation fits
    ``CPU_CHUNK_BYTES`` (found by one probing forward per input shape), with the features of
    the whole batch; training mode keeps the batch whole (BatchNorm's batch statistics)."""
    import fastbd.models.encoders as encoders
    from fastbd.models.encoders import largest_activation_bytes

    encoder = encoders.small_encoder(8, 16).eval()
    x = torch.randn(50, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    per_image = largest_activation_bytes(encoder.backbone, x[:1])
    first_conv = next(m for m in encoder.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    stride = first_conv.stride[0]
    assert per_image >= first_conv.out_channels * (16 // stride) ** 2 * 4  # its output at least
    monkeypatch.setattr(encoders, "CPU_CHUNK_BYTES", per_image * 7)
    calls = []
    hook = encoder.backbone.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    with torch.no_grad():
        chunked = encoder(x)
        assert calls[1:] == [7] * 7 + [1]  # after the one-image probe
        whole = encoder.backbone(x)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)
    calls.clear()
    encoder(x)  # eval mode, but building a graph: whole (a forward hook must see every row)
    assert calls == [50]
    calls.clear()
    encoder.train()
    encoder(x)
    hook.remove()
    assert calls == [50]


def test_gradcam_of_a_batch_larger_than_a_cpu_chunk_equals_each_images_own(monkeypatch):
    """Grad-CAM hooks the activation of one forward: a chunked CPU forward would leave it the
    last chunk's rows only (the check's 150 test images once crashed on this)."""
    import fastbd.models.encoders as encoders
    from fastbd.detection.clustering import ClusteringModel
    from fastbd.models.encoders import embed_images
    from fastbd.patchsearch.gradcam import gradcam_maps

    encoder = encoders.small_encoder(8, 16).eval()
    images = torch.randint(0, 256, (9, 3, 16, 16), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(encoders, "CPU_CHUNK_BYTES", 1)  # one row per chunk
    clustering = ClusteringModel.fit(embed_images(encoder, images), 3, 5, 0)[0]
    maps = gradcam_maps(encoder, images, clustering)
    assert maps.shape == (9, 16, 16)
    alone = torch.cat([gradcam_maps(encoder, images[i:i + 1], clustering) for i in range(9)])
    torch.testing.assert_close(maps, alone, rtol=1e-4, atol=1e-5)
