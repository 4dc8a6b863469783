import math

import pytest
import torch
import torch.nn.functional as F

from fastbd.clipdefense import similarities, stage_epochs
from fastbd.models.clip import TinyCLIPConfig, clip_normalise, clip_tokenizer, tiny_clip, tokenize
from fastbd.training.clip import (
    embedding_drift,
    finetune_mode,
    indexed_pair_cosines,
    trained_pair_cosines,
)
from fastbd.ubt import Config, defend
from fastbd.ubt.defend import retain_pool, unit_embeddings


@pytest.fixture(scope="module")
def pairs():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (120, 3, 32, 32), dtype=torch.uint8, generator=g)
    names = ["red circle", "blue square", "green bar", "cf red circle"]
    captions = [f"a photo of a {names[i % 4]}." for i in range(120)]
    return images, tokenize(clip_tokenizer(), captions, 32)


@pytest.fixture(scope="module")
def models():
    small = TinyCLIPConfig(text_layers=1)
    return tiny_clip(small, seed=1).eval(), tiny_clip(small, seed=2).eval()


@pytest.fixture(scope="module")
def learnable():
    """120 pairs of 4 classes whose images are a class colour plus noise, and a tiny CLIP
    trained on them until matched pairs score above unmatched ones."""
    from fastbd.training.clip import CLIPTrainConfig, train_clip

    g = torch.Generator().manual_seed(3)
    labels = torch.arange(120) % 4
    colours = torch.tensor([[230, 20, 20], [20, 20, 230], [20, 230, 20], [230, 230, 20]])
    noise = torch.randint(-20, 21, (120, 3, 32, 32), generator=g)
    images = (colours[labels][:, :, None, None] + noise).clamp(0, 255).to(torch.uint8)
    names = ["red circle", "blue square", "green bar", "yellow star"]
    tokens = tokenize(clip_tokenizer(), [f"a photo of a {names[i]}." for i in labels], 32)
    model = tiny_clip(TinyCLIPConfig(text_layers=1), seed=4)
    train_clip(model, images, tokens, CLIPTrainConfig(epochs=15, batch_size=40, warmup_steps=5),
               verbose=False)
    return images, tokens, labels, model.eval()


def brute_cosine(model, images, tokens):
    with torch.no_grad():
        out = []
        for i in range(images.shape[0]):
            a = model.encode_image(clip_normalise(images[i:i + 1], model))
            b = model.encode_text(tokens[i:i + 1])
            out.append(F.cosine_similarity(a, b).item())
    return torch.tensor(out)


def config(**overrides):
    base = dict(susp_fraction=0.1, overfit_epochs=1, unlearn_epochs=1, overfit_lr=1e-4,
                unlearn_lr=1e-3, batch_size=16, overfit_min_steps=0, unlearn_min_steps=0,
                skip_check=True)
    base.update(overrides)
    return Config(**base)


def test_suspicious_split_and_topk_against_brute_force(pairs, models):
    images, tokens = pairs
    model, reference = models
    result = defend(model, images, tokens, reference=reference, config=config(), verbose=False)
    brute = brute_cosine(reference, images, tokens)
    torch.testing.assert_close(result.reference_similarity, brute, atol=1e-5, rtol=0)
    assert set(result.suspicious.tolist()) == set(torch.argsort(brute)[:12].tolist())
    k = math.ceil(math.sqrt(120 * 0.1))
    assert result.topk.numel() == k
    order = torch.argsort(result.overfit_similarity, descending=True)
    assert result.topk.tolist() == result.suspicious[order[:k]].tolist()
    assert result.relevance.shape == (k, 32) and result.token_keep.dtype == torch.bool


def test_result_files(pairs, models, tmp_path):
    import json

    images, tokens = pairs
    model, reference = models
    result = defend(model, images, tokens, reference=reference, config=config(), verbose=False)
    truth = torch.zeros(120, dtype=torch.bool)
    truth[result.suspicious[:3]] = True
    result.save(tmp_path, truth=truth, tokens=tokens, tokenizer=clip_tokenizer())
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["suspicious_poisoned"] == 3 and saved["topk"] == result.topk.tolist()
    reloaded = tiny_clip(TinyCLIPConfig(text_layers=1))
    reloaded.load_state_dict(torch.load(tmp_path / "model.pt"))
    for a, b in zip(reloaded.state_dict().values(), result.model.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    for png in ("similarity.png", "overfit_similarity.png", "token_relevance.png"):
        assert (tmp_path / png).stat().st_size > 0


def test_unlearning_lowers_the_top_pairs_similarity(pairs, models):
    images, tokens = pairs
    model, reference = models
    result = defend(model, images, tokens, reference=reference,
                    config=config(unlearn_epochs=3), verbose=False)
    before = similarities(model, images[result.topk], tokens[result.topk], "cpu")
    after = similarities(result.model, images[result.topk], tokens[result.topk], "cpu")
    assert float(after.mean()) < float(before.mean())


def test_embedding_drift_is_zero_at_the_anchors_and_the_mean_cosine_distance(pairs, models, gen):
    images, tokens = pairs
    model = models[0]
    rows = torch.arange(10)
    image_anchors, text_anchors = unit_embeddings(model, images, tokens, rows, "cpu")
    with torch.no_grad():
        at_anchors = embedding_drift(model, images[rows], tokens[rows], image_anchors,
                                     text_anchors, "cpu")
        assert abs(float(at_anchors)) < 1e-5
        other_images = F.normalize(torch.randn(10, image_anchors.shape[1], generator=gen), dim=1)
        other_texts = F.normalize(torch.randn(10, text_anchors.shape[1], generator=gen), dim=1)
        drift = embedding_drift(model, images[rows], tokens[rows], other_images, other_texts,
                                "cpu")
    expected = (1 - (image_anchors * other_images).sum(1)).mean() + (
        1 - (text_anchors * other_texts).sum(1)).mean()
    assert float(drift) == pytest.approx(float(expected), abs=1e-5)


def test_unlearning_keeps_the_clean_pairs_where_the_model_had_them(learnable):
    """The retain term anchors D_normal's embeddings to the defended model's own: unlearning
    moves them far less with it than without (InfoNCE in its place, fastbd's first version,
    kept them no closer than 0.6)."""
    images, tokens, _, model = learnable

    def kept(retain_weight):
        result = defend(model, images, tokens, reference=model,
                        config=config(unlearn_epochs=3, retain_weight=retain_weight),
                        verbose=False)
        normal = torch.tensor([i for i in range(images.shape[0])
                               if i not in set(result.suspicious.tolist())])
        before = unit_embeddings(model, images, tokens, normal, "cpu")
        after = unit_embeddings(result.model, images, tokens, normal, "cpu")
        return [float((a * b).sum(1).mean()) for a, b in zip(before, after, strict=True)]

    without, with_retain = kept(0.0), kept(10.0)
    assert with_retain[0] >= 0.8 and with_retain[1] >= 0.85, with_retain
    assert with_retain[0] >= without[0] + 0.2, (without, with_retain)


def test_declined_check_leaves_the_model_unchanged(learnable):
    images, tokens, _, model = learnable
    result = defend(model, images, tokens, reference=model,
                    config=config(skip_check=False, check_threshold=1e9), verbose=False)
    assert not result.poisoned and result.relevance is None
    for a, b in zip(model.state_dict().values(), result.model.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    assert math.isfinite(result.check_statistic)


def test_bad_inputs(pairs, models):
    images, tokens = pairs
    model, reference = models
    with pytest.raises(ValueError, match="context"):
        defend(model, images, tokens[:, :16], reference=reference, verbose=False)
    with pytest.raises(ValueError, match="empty"):
        defend(model, images[:0], tokens[:0], reference=reference, verbose=False)
    with pytest.raises(ValueError, match="uint8"):
        defend(model, images.float(), tokens, reference=reference, verbose=False)
    with pytest.raises(ValueError, match="longer than the context"):
        tokenize(clip_tokenizer(), ["word " * 40], 32)


def test_stage_epochs_scaling():
    assert stage_epochs(50, 64, 5, 60) == 60  # one step per epoch: raised to 60 steps
    assert stage_epochs(128, 64, 5, 60) == 30
    assert stage_epochs(10_000, 64, 5, 60) == 5  # paper scale: unchanged
    assert stage_epochs(50, 64, 0, 60) == 0  # a stage switched off stays off
    assert stage_epochs(0, 64, 5, 0) == 5


@pytest.mark.parametrize("overrides", [dict(), dict(masked_captions=False),
                                       dict(retain_weight=0.0), dict(masked_images=True),
                                       dict(masked_images=True, masked_captions=False)])
def test_unlearning_variants_keep_batchnorm_statistics(pairs, models, overrides):
    images, tokens = pairs
    model, reference = models
    result = defend(model, images, tokens, reference=reference,
                    config=config(unlearn_epochs=2, **overrides), verbose=False)
    for key, value in model.state_dict().items():
        if "running_" in key:
            assert torch.equal(result.model.state_dict()[key], value), key
    before = similarities(model, images[result.topk], tokens[result.topk], "cpu")
    after = similarities(result.model, images[result.topk], tokens[result.topk], "cpu")
    assert float(after.mean()) < float(before.mean())


@pytest.mark.parametrize("masked_captions", [True, False])
@pytest.mark.parametrize("masked_images", [True, False])
def test_table_iv_variants_unlearn_the_masked_images_and_captions(pairs, models, monkeypatch,
                                                                  masked_images,
                                                                  masked_captions):
    import importlib

    from fastbd.clipdefense import masked_tokens
    from fastbd.clipdefense.occlusion import masked_images as rebuild

    ubt_defend = importlib.import_module("fastbd.ubt.defend")
    seen = {}

    def record(model, images, captions, *args, **kwargs):
        seen.update(images=images.clone(), captions=captions.clone())

    monkeypatch.setattr(ubt_defend, "unlearn", record)
    images, tokens = pairs
    model, reference = models
    result = defend(model, images, tokens, reference=reference, verbose=False,
                    config=config(masked_images=masked_images, masked_captions=masked_captions,
                                  image_cells=4))
    top_images, top_tokens = images[result.topk], tokens[result.topk]
    k = result.topk.numel()
    expected_captions = (torch.cat([top_tokens, masked_tokens(top_tokens, result.relevance,
                                                              0.1)[0]])
                         if masked_captions else top_tokens)
    assert torch.equal(seen["captions"], expected_captions)
    if not masked_images:
        assert torch.equal(seen["images"], top_images) and result.image_relevance is None
        return
    assert result.image_relevance.shape == (k, 4, 4) and result.image_keep.shape == (k, 4, 4)
    sums = result.image_relevance.sum((1, 2))
    assert torch.all(((sums - 1).abs() < 1e-5) | (sums == 0))
    rebuilt, keep = rebuild(top_images, result.image_relevance, 0.1, model)
    assert torch.equal(keep, result.image_keep)
    assert torch.equal(seen["images"], torch.cat([top_images, rebuilt]))


@pytest.mark.parametrize("with_normal", [True, False])
def test_the_overfit_ablation_drops_the_d_normal_term(pairs, models, monkeypatch, with_normal):
    import importlib

    ubt_defend = importlib.import_module("fastbd.ubt.defend")
    calls = []
    real = ubt_defend.batch_clip_loss

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ubt_defend, "batch_clip_loss", counted)
    images, tokens = pairs
    model, reference = models
    cfg = config(overfit_normal=with_normal, retain_weight=0.0)
    normal = torch.arange(20, 60)
    ubt_defend.overfit(model, images, tokens, torch.arange(20), normal, cfg, torch.device("cpu"),
                       verbose=False)
    # one D_normal InfoNCE term per D_susp batch (20 pairs in batches of 16: 2) or none
    assert len(calls) == (2 if with_normal else 0)


def test_config_validation():
    with pytest.raises(ValueError, match="susp_fraction"):
        Config(susp_fraction=0.0)
    with pytest.raises(ValueError, match="batch_size"):
        Config(batch_size=1)
    with pytest.raises(ValueError, match="retain_weight"):
        Config(retain_weight=-1.0)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="retain_fraction"):
            Config(retain_fraction=bad)


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.3, 1e-6])
def test_retain_pool_keeps_the_most_similar_normal_pairs(gen, fraction):
    sim = torch.rand(200, generator=gen)
    normal = torch.randperm(200, generator=gen)[:97]
    pool = retain_pool(sim, normal, fraction)
    expected = max(2, math.ceil(fraction * 97))
    assert pool.numel() == expected and set(pool.tolist()) <= set(normal.tolist())
    rest = sorted(set(normal.tolist()) - set(pool.tolist()))
    if rest:
        assert float(sim[pool].min()) >= float(sim[rest].max())


def unit(x):
    return F.normalize(x, dim=1)


def calibrated_pairs(images, captions, matched=0.8, unmatched=0.1, others=None):
    from fastbd.ubt.defend import Calibrated

    others = torch.randn(40, images.shape[1]) if others is None else others
    return Calibrated(unit(images), unit(captions), matched, unmatched, unit(others))


def brute_disagreement(model, reference):
    """The r×r matrix z_model(cos(image_i, caption_j)) − z_reference(…), entry by entry."""
    r = model.images.shape[0]
    out = torch.empty(r, r, dtype=torch.float64)
    for i in range(r):
        for j in range(r):
            out[i, j] = sum(sign * (float(c.images[i] @ c.captions[j]) - c.unmatched)
                            / (c.matched - c.unmatched)
                            for c, sign in ((model, 1), (reference, -1)))
    return out


@pytest.mark.parametrize("members", ["all", "some", "one", "none"])
def test_cross_match_equals_the_brute_force_mean_over_the_other_members(gen, members):
    from fastbd.ubt.defend import cross_match

    r = 13
    model = calibrated_pairs(torch.randn(r, 8, generator=gen), torch.randn(r, 8, generator=gen))
    reference = calibrated_pairs(torch.randn(r, 8, generator=gen),
                                 torch.randn(r, 8, generator=gen), 0.6, -0.05)
    mask = {"all": torch.ones(r, dtype=torch.bool), "some": torch.rand(r, generator=gen) < 0.5,
            "one": torch.arange(r) == 4, "none": torch.zeros(r, dtype=torch.bool)}[members]
    d = brute_disagreement(model, reference)
    expected = torch.zeros(r, dtype=torch.float64)
    for i in range(r):
        others = [j for j in range(r) if mask[j] and j != i]
        if others:
            expected[i] = (d[i, others].sum() + d[others, i].sum()) / (2 * len(others))
    torch.testing.assert_close(cross_match(model, reference, mask), expected)


def planted_block(gen, r=60, block=8, classes=4):
    """Pairs of ``classes`` natural classes (image and caption near the class direction under
    both models; the reference, trained on other data, matches them less well), and ``block``
    pairs (rows 40…) whose images the model — not the reference — matches with a shared
    "target" direction, as a backdoor does: their captions point there under both models,
    their images under the model only."""
    dims = 16
    labels = torch.arange(r) % classes
    basis = torch.eye(dims)
    noise = lambda: 0.1 * torch.randn(r, dims, generator=gen)  # noqa: E731
    images, captions = basis[labels] + noise(), basis[labels] + noise()
    ref_images, ref_captions = basis[labels] + 2.5 * noise(), basis[labels] + 2.5 * noise()
    poison = torch.arange(40, 40 + block)
    target = basis[classes]
    images[poison] = target + noise()[poison]
    captions[poison] = target + noise()[poison]
    ref_captions[poison] = target + noise()[poison]
    random_labels = torch.randint(0, classes, (80,), generator=gen)
    others = [basis[random_labels] + scale * 0.1 * torch.randn(80, dims, generator=gen)
              for scale in (1, 2.5)]  # D_normal captions, each model's own
    model = calibrated_pairs(images, captions, 0.9, 0.0, others[0])
    reference = calibrated_pairs(ref_images, ref_captions, 0.7, 0.0, others[1])
    return model, reference, poison


def test_backdoor_block_finds_the_pairs_only_the_model_matches(gen):
    """The planted block is found among natural class blocks that both models see, and the
    check statistic of the block is ≥ ½ while a class block scores below it."""
    from fastbd.ubt.defend import backdoor_block, check_statistic

    model, reference, poison = planted_block(gen)
    top = backdoor_block(model, reference, poison.numel())
    assert set(top.tolist()) == set(poison.tolist())
    assert check_statistic(model, reference, top) >= Config().check_threshold
    one_class = torch.arange(0, 40, 4)[:poison.numel()]
    assert check_statistic(model, reference, one_class) < Config().check_threshold


def brute_block_match(c, top):
    """2·(share of random captions below caption b for image a, ties half) − 1, over a ≠ b."""
    shares = []
    for a in top.tolist():
        for b in top.tolist():
            if a == b:
                continue
            block = float(c.images[a] @ c.captions[b])
            randoms = (c.others @ c.images[a]).tolist()
            shares.append(sum(1.0 if r < block else 0.5 if r == block else 0.0
                              for r in randoms) / len(randoms))
    return 2 * sum(shares) / len(shares) - 1


def test_check_statistic_combines_the_two_models_rank_matches(gen):
    """min(m, ½ − r): ≥ ½ exactly when the model matches the block halfway to true pairs or
    more and the reference no better than random captions."""
    from fastbd.ubt.defend import check_statistic

    model, reference, poison = planted_block(gen)
    top = torch.tensor([3, 17, 41, 42, 55])
    expected = min(brute_block_match(model, top), 0.5 - brute_block_match(reference, top))
    assert math.isclose(check_statistic(model, reference, top), expected, rel_tol=1e-6,
                        abs_tol=1e-9)
    assert brute_block_match(model, poison) >= 0.5 and brute_block_match(reference, poison) <= 0
    assert check_statistic(model, model, poison) < 0.5  # a model agreeing with itself
    assert check_statistic(model, reference, top[:1]) == math.inf
    assert check_statistic(None, reference, top) == math.inf
    assert check_statistic(model, None, top) == math.inf


def test_a_weak_reference_does_not_make_a_class_block_a_backdoor(gen):
    """A reference that separates the classes far less sharply than the model — its cosines
    much noisier — still ranks an image's own class captions above random ones: a class block
    stays near 0 while the planted block stays near 1."""
    from fastbd.ubt.defend import backdoor_block, check_statistic

    model, reference, poison = planted_block(gen)
    weak = calibrated_pairs(reference.images + 0.2 * torch.randn(reference.images.shape,
                                                                   generator=gen),
                            reference.captions, 0.7, 0.0, reference.others)
    one_class = torch.arange(0, 40, 4)[:poison.numel()]
    assert check_statistic(model, weak, one_class) < Config().check_threshold
    top = backdoor_block(model, weak, poison.numel())
    assert set(top.tolist()) == set(poison.tolist())
    assert check_statistic(model, weak, top) >= Config().check_threshold


def test_calibrated_measures_each_models_scale_on_normal_pairs(learnable):
    """μ_m and μ_u from ``similarities`` pair by pair over the sampled D_normal pairs (each
    image with its own caption and with the next sampled pair's); unmeasurable → None."""
    from fastbd.ubt.defend import calibrated

    images, tokens, _, model = learnable
    normal, rows, cfg = torch.arange(20, 120), torch.tensor([3, 6, 8, 13]), Config()
    sample = normal[torch.randperm(normal.numel(),
                                   generator=torch.Generator().manual_seed(cfg.seed + 2))]
    matched = float(similarities(model, images[sample], tokens[sample], "cpu").mean())
    unmatched = float(similarities(model, images[sample], tokens[sample.roll(1)], "cpu").mean())
    got = calibrated(model, images, tokens, rows, normal, cfg, "cpu")
    assert math.isclose(got.matched, matched, rel_tol=1e-4)
    assert math.isclose(got.unmatched, unmatched, rel_tol=1e-4)
    assert got.images.shape == got.captions.shape == (4, model.text_projection.shape[1])
    assert got.others.shape == (100, model.text_projection.shape[1])
    assert calibrated(model, images, tokens, rows, normal[:1], cfg, "cpu") is None


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_indexed_pair_cosines_equal_the_gathered_pairs(pairs, models, gen, batch):
    """Values and gradients of the deduplicated encoding equal encoding every pair."""
    images, tokens = pairs
    model = finetune_mode(tiny_clip(TinyCLIPConfig(text_layers=1), seed=3))
    none = torch.empty(0, dtype=torch.long)
    assert indexed_pair_cosines(model, images, tokens, none, none, "cpu").shape == (0,)
    image_ids = torch.randint(0, 5, (batch,), generator=gen)
    token_ids = torch.randint(0, 9, (batch,), generator=gen)
    grads = []
    for fast in (True, False):
        model.zero_grad()
        if fast:
            cos = indexed_pair_cosines(model, images, tokens, image_ids, token_ids, "cpu")
        else:
            cos = trained_pair_cosines(model, images[image_ids], tokens[token_ids], "cpu")
        cos.mean().backward()
        grads.append((cos.detach(), [p.grad.clone() for p in model.parameters()
                                     if p.grad is not None]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
    assert len(grads[0][1]) == len(grads[1][1]) > 0
    for fast_grad, plain_grad in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(fast_grad, plain_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("stage, calls", [("trained_pair_cosines", 2),
                                          ("indexed_pair_cosines", 4)])
def test_interrupted_defense_resumes_to_the_uninterrupted_model(pairs, models, tmp_path,
                                                                monkeypatch, stage, calls):
    import importlib

    defend_module = importlib.import_module("fastbd.ubt.defend")
    images, tokens = pairs
    model, reference = models
    settings = config(overfit_epochs=3, unlearn_epochs=3)  # 1 and 2 steps per epoch
    full = defend(model, images, tokens, reference=reference, config=settings, verbose=False)
    real, drawn = getattr(defend_module, stage), []

    def interrupt(*args):
        drawn.append(1)
        if len(drawn) == calls:  # in the second epoch of the stage
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(defend_module, stage, interrupt)
    with pytest.raises(KeyboardInterrupt):
        defend(model, images, tokens, reference=reference, config=settings, verbose=False,
               checkpoint_dir=tmp_path, save_every_s=0.0)
    monkeypatch.setattr(defend_module, stage, real)
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert saved == (["ubt-overfit.pt", "ubt-split.pt"] if stage == "trained_pair_cosines"
                     else ["ubt-overfit.pt", "ubt-split.pt", "ubt-unlearn.pt"])
    pairs_module = importlib.import_module("fastbd.clipdefense.pairs")
    split_calls, real_split = [], pairs_module.suspicious_split
    monkeypatch.setattr(pairs_module, "suspicious_split",
                        lambda *a: split_calls.append(1) or real_split(*a))
    resumed = defend(model, images, tokens, reference=reference, config=settings,
                     verbose=False, checkpoint_dir=tmp_path)
    assert not split_calls  # the split was loaded
    assert torch.equal(resumed.suspicious, full.suspicious)
    assert torch.equal(resumed.overfit_similarity, full.overfit_similarity)
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    assert len(resumed.checkpoint_files) == 3  # kept until the result is saved
    assert resumed.timings["overfit"] > 0 and resumed.timings["suspicious_split"] > 0
    resumed.save(tmp_path, weights=False)
    assert not list(tmp_path.glob("ubt-*.pt"))  # deleted once the result is saved


def test_defense_ignores_the_stages_of_another_run(pairs, models, tmp_path, monkeypatch):
    import importlib

    defend_module = importlib.import_module("fastbd.ubt.defend")
    images, tokens = pairs
    model, reference = models
    real = defend_module.indexed_pair_cosines

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(defend_module, "indexed_pair_cosines", interrupt)
    with pytest.raises(KeyboardInterrupt):
        defend(model, images, tokens, reference=reference, config=config(), verbose=False,
               checkpoint_dir=tmp_path)
    monkeypatch.setattr(defend_module, "indexed_pair_cosines", real)
    other = config(overfit_lr=2e-4)
    fresh = defend(model, images, tokens, reference=reference, config=other, verbose=False)
    rerun = defend(model, images, tokens, reference=reference, config=other, verbose=False,
                   checkpoint_dir=tmp_path)
    assert torch.equal(fresh.overfit_similarity, rerun.overfit_similarity)
    for a, b in zip(fresh.model.state_dict().values(), rerun.model.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)


def test_far_low_share_follows_the_poison_rate_not_a_constant():
    from fastbd.clipdefense.pairs import far_low_share

    g = torch.Generator().manual_seed(0)
    clean = 0.85 + 0.03 * torch.randn(10000, generator=g)
    assert far_low_share(clean) < 0.001  # a Gaussian keeps ~2e-6 beyond Tukey's outer fence
    for rate in (0.005, 0.02, 0.05, 0.1):
        n = round(rate * 10000)
        poisoned = torch.cat([clean[n:], 0.1 + 0.1 * torch.randn(n, generator=g)])
        assert abs(far_low_share(poisoned) - rate) < 0.002
    assert far_low_share(torch.ones(3)) == 0.0


def test_adaptive_split_takes_at_least_the_floor_and_grows_with_the_far_tail(monkeypatch):
    import fastbd.clipdefense.pairs as pairs

    g = torch.Generator().manual_seed(1)
    similarity = torch.cat([0.85 + 0.03 * torch.randn(950, generator=g),
                            0.1 + 0.05 * torch.randn(50, generator=g)])
    monkeypatch.setattr(pairs, "similarities", lambda *args: similarity)
    monkeypatch.setattr(pairs, "working_copy", lambda model, device: model)
    images = torch.zeros(1000, 3, 4, 4, dtype=torch.uint8)
    _, fixed, _ = pairs.suspicious_split(None, images, None, 0.01, "cpu")
    _, adaptive, normal = pairs.suspicious_split(None, images, None, 0.01, "cpu", adaptive=True)
    assert fixed.numel() == 10 and adaptive.numel() == 50
    assert set(adaptive.tolist()) == set(range(950, 1000))
    assert adaptive.numel() + normal.numel() == 1000
    clean = similarity[:950]
    monkeypatch.setattr(pairs, "similarities", lambda *args: clean)
    _, floor, _ = pairs.suspicious_split(None, images[:950], None, 0.01, "cpu", adaptive=True)
    assert floor.numel() == round(0.01 * 950)  # no far tail: the floor
    with pytest.raises(ValueError, match="split"):
        Config(split="auto")


def test_adaptive_split_takes_in_a_poison_rate_it_is_not_told():
    """End to end on the world: 5 % poisoned pairs, a clean reference trained on the clean
    world — the adaptive split holds nearly all of them, the paper's 1 % a fifth."""
    from dataclasses import replace

    from fastbd.clipdefense import suspicious_split
    from fastbd.training.clip import CLIPTrainConfig
    from fastbd.world import CLIPThreatConfig, build_clip_threat
    from fastbd.world.synthetic import WorldConfig

    config = CLIPThreatConfig(world=replace(WorldConfig(), n_train=1500, n_eval=10),
                              attack="badnet", rate=0.05, train=CLIPTrainConfig(epochs=6))
    poisoned = build_clip_threat(config, cache_dir=None, verbose=False)
    clean = build_clip_threat(replace(config, attack="none"), cache_dir=None, verbose=False)
    tokens = tokenize(poisoned.tokenizer, poisoned.poisoned.captions, 32)
    truth = poisoned.poisoned.poison_mask
    caught = {}
    for adaptive in (False, True):
        _, suspicious, _ = suspicious_split(clean.model, poisoned.poisoned.images, tokens, 0.01,
                                            "cpu", adaptive=adaptive)
        caught[adaptive] = (int(truth[suspicious].sum()), suspicious.numel())
    assert caught[False] == (15, 15)  # the fixed 1 %: all poisoned, 60 of 75 left out
    found, size = caught[True]  # measured: 71 of the 75
    assert found >= 0.9 * int(truth.sum()) and size <= 2 * int(truth.sum())
