"""UBT stage throughput beside plain torch equivalents.

* ``split``: the suspicious split (both towers, ``pair_cosine``, ``topk``) vs a plain loop
  (``encode_image``/``encode_text`` per batch, ``F.cosine_similarity``, full ``argsort``).
* ``overfit`` / ``unlearn``: fastbd's training stages vs the same work written as a plain
  training loop (per step a cosine loss on one batch plus InfoNCE on another; ``model.train()``,
  no BatchNorm freezing).
* ``attribution``: batched Chefer relevance (one explicit-attention pass, one ``autograd.grad``
  for the whole batch) vs one pair at a time.

Rates are pairs per second (a training step of batch B counts B pairs per loss term). CPU sizes
use the tiny CLIP at 32 px; GPU sizes use open_clip's ViT-B-32 at 224 px with random weights.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from fastbd.clipdefense import suspicious_split
from fastbd.models.clip import TinyCLIPConfig, clip_normalise, tiny_clip
from fastbd.training.clip import clip_loss
from fastbd.ubt import Config, token_relevance
from fastbd.ubt.defend import Retain, overfit, unlearn

from benchutil import HAS_CUDA, cuda, record_rates, run

SIZES = {
    "cpu": dict(arch="tiny", size=32, pairs=512, batch=64, steps=2, attribution=8,
                device="cpu"),
    "gpu-vit_b32": dict(arch="ViT-B-32", size=224, pairs=16384, batch=64, steps=20,
                        attribution=64, device="cuda"),
}


def _model(arch, device):
    if arch == "tiny":
        return tiny_clip(TinyCLIPConfig()).to(device).eval()
    import open_clip

    return open_clip.create_model(arch, pretrained=None).to(device).eval()


def _pairs(n, size, context, device):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    tokens = torch.zeros(n, context, dtype=torch.long)
    tokens[:, 0] = 49406
    tokens[:, 1:9] = torch.randint(300, 40000, (n, 8), generator=g)
    tokens[:, 9] = 49407
    return images.to(device), tokens.to(device)


def _plain_split(model, images, tokens, fraction, batch=512):
    with torch.no_grad():
        sims = torch.cat([F.cosine_similarity(
            model.encode_image(clip_normalise(images[s:s + batch], model)),
            model.encode_text(tokens[s:s + batch])) for s in range(0, images.shape[0], batch)])
    return torch.argsort(sims)[:max(1, round(fraction * sims.numel()))]


def _plain_train(model, images, tokens, steps, batch, lr, target_cosine):
    """A plain loop doing the same work per step as fastbd's stage: a cosine loss on one batch
    (pulled to 1 for the overfit stage, pushed down for unlearning) plus, on another batch,
    InfoNCE (overfit) or the drift from the model's embeddings before training (unlearning)."""
    tuned = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(tuned.parameters(), lr=lr)
    n = images.shape[0]
    with torch.no_grad():
        anchors = (F.normalize(model.encode_image(clip_normalise(images, model)), dim=1),
                   F.normalize(model.encode_text(tokens), dim=1))
    for step in range(steps):
        first = torch.arange(step * batch, (step + 1) * batch) % n
        second = (first + n // 2) % n
        cos = F.cosine_similarity(tuned.encode_image(clip_normalise(images[first], tuned)),
                                  tuned.encode_text(tokens[first]))
        loss = (cos - 1).pow(2).mean() if target_cosine else cos.mean()
        image_features = tuned.encode_image(clip_normalise(images[second], tuned))
        text_features = tuned.encode_text(tokens[second])
        loss = loss + (clip_loss(image_features, text_features, tuned.logit_scale)
                       if target_cosine else
                       2 - F.cosine_similarity(image_features, anchors[0][second]).mean()
                       - F.cosine_similarity(text_features, anchors[1][second]).mean())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return tuned


@pytest.mark.parametrize("impl", ["fastbd", "plain"])
@pytest.mark.parametrize("stage", ["split", "overfit", "unlearn", "attribution"])
def test_ubt_stages_cpu(benchmark, stage, impl):
    _bench(benchmark, stage, impl, **SIZES["cpu"])


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["fastbd", "plain"])
@pytest.mark.parametrize("stage", ["split", "overfit", "unlearn", "attribution"])
def test_ubt_stages_gpu(benchmark, stage, impl):
    _bench(benchmark, stage, impl, **SIZES["gpu-vit_b32"])


def _bench(benchmark, stage, impl, arch, size, pairs, batch, steps, attribution, device):
    model = _model(arch, device)
    context = model.positional_embedding.shape[0]
    images, tokens = _pairs(pairs, size, context, device)
    config = Config(batch_size=batch, overfit_min_steps=0, unlearn_min_steps=0,
                    overfit_epochs=1, unlearn_epochs=1,
                    overfit_lr=1e-6, unlearn_lr=1e-5)
    device = torch.device(device)
    if stage == "split":
        counted = pairs
        fn = ((lambda: suspicious_split(model, images, tokens, 0.01, device)) if impl == "fastbd"
              else (lambda: _plain_split(model, images, tokens, 0.01)))
    elif stage == "overfit":
        n_susp = steps * batch
        counted = 2 * n_susp
        rows = torch.arange(n_susp, device=device)
        normal = torch.arange(n_susp, pairs, device=device)
        fn = ((lambda: overfit(model, images, tokens, rows, normal, config, device, False))
              if impl == "fastbd" else
              (lambda: _plain_train(model, images, tokens, steps, batch, 1e-6, True)))
    elif stage == "unlearn":
        k = math.isqrt(steps * batch // 2)
        counted = 2 * k * 2 * k
        top_images, captions = images[:k], tokens[:2 * k]
        normal = torch.arange(k, pairs, device=device)

        def fastbd_unlearn():
            tuned = copy.deepcopy(model)
            unlearn(tuned, top_images, captions, config, device, False,
                    retain=Retain(images, tokens, normal, model))
            return tuned

        fn = (fastbd_unlearn if impl == "fastbd" else
              (lambda: _plain_train(model, images, tokens, math.ceil(k * 2 * k / batch), batch,
                                    1e-5, False)))
    else:
        counted = attribution
        sub_images, sub_tokens = images[:attribution], tokens[:attribution]
        fn = ((lambda: token_relevance(model, sub_images, sub_tokens)) if impl == "fastbd" else
              (lambda: [token_relevance(model, sub_images[i:i + 1], sub_tokens[i:i + 1])
                        for i in range(attribution)]))
    run(benchmark, fn, rounds=3, stage=stage, impl=impl, arch=arch, size=size, batch=batch,
        pairs=counted, gpu=HAS_CUDA)
    record_rates(benchmark, pairs=counted)


def test_plain_split_computes_what_the_suspicious_split_computes():
    """The split baseline picks the same lowest-similarity pairs as fastbd's split."""
    model = _model("tiny", "cpu")
    images, tokens = _pairs(64, 32, model.positional_embedding.shape[0], "cpu")
    _, suspicious, _ = suspicious_split(model, images, tokens, 0.1, "cpu")
    assert torch.equal(suspicious.sort().values,
                       _plain_split(model, images, tokens, 0.1, batch=16).sort().values)
