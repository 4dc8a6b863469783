"""UBT end to end on a small SIG-poisoned world with ground truth, judged by the reference a
defender has — a clean model trained on a disjoint world of the same look
(``independent_reference``), never on the training pairs: the backdoor is real before (ASR
asserted), the top pairs are the poisoned ones, unlearning removes the backdoor at a CA cost of
at most 1 point, and the same defense declines on clean models (check statistic below
threshold): the clean model of the same world and one trained with another seed.
The full-size figures for every attack are in the README (``fastbd demo ubt``)."""

from dataclasses import replace

import pytest
import torch

from fastbd.models.clip import tokenize
from fastbd.training.clip import CLIPTrainConfig
from fastbd.ubt import Config, defend
from fastbd.world import (
    CLIPThreatConfig,
    build_clip_threat,
    evaluate_clip,
    independent_reference,
)
from fastbd.world.synthetic import WorldConfig

WORLD = WorldConfig(n_train=2000, n_eval=400, seed=11)
TRAIN = CLIPTrainConfig(epochs=12, batch_size=100, warmup_steps=20)


@pytest.fixture(scope="module")
def threats(tmp_path_factory):
    cache = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    threats = {attack: build_clip_threat(CLIPThreatConfig(world=WORLD, attack=attack, rate=0.02,
                                                          train=TRAIN),
                                         cache_dir=cache, verbose=False)
               for attack in ("none", "sig")}
    threats["reference"] = build_clip_threat(
        independent_reference(CLIPThreatConfig(world=WORLD, train=TRAIN)), cache_dir=cache,
        verbose=False)
    threats["other clean"] = build_clip_threat(
        CLIPThreatConfig(world=WORLD, attack="none", seed=1, train=replace(TRAIN, seed=1)),
        cache_dir=cache, verbose=False)
    return threats


@pytest.mark.slow
@pytest.mark.timeout(900)  # trains its threat models: minutes on a busy laptop
def test_ubt_removes_a_real_backdoor_and_spares_a_clean_model(threats):
    clean, poisoned, reference = threats["none"], threats["sig"], threats["reference"].model
    assert poisoned.evaluation.asr >= 0.5, poisoned.evaluation
    assert clean.evaluation.asr <= 0.1
    tokens = tokenize(poisoned.tokenizer, poisoned.poisoned.captions, 32)
    truth = poisoned.poisoned.poison_mask
    result = defend(poisoned.model, poisoned.poisoned.images, tokens, reference=reference,
                    config=Config(), verbose=False)
    assert result.poisoned
    assert float(truth[result.topk].float().mean()) >= 0.9
    after = evaluate_clip(result.model, poisoned.tokenizer, poisoned.world, "sig", 0)
    assert after.asr <= 0.05, after
    # the target: at most 1 point of CA (InfoNCE as the retain term cost 1.25 here)
    assert after.clean_accuracy >= poisoned.evaluation.clean_accuracy - 0.01, after

    clean_tokens = tokenize(clean.tokenizer, clean.poisoned.captions, 32)
    for model in (clean.model, threats["other clean"].model):
        declined = defend(model, clean.poisoned.images, clean_tokens, reference=reference,
                          config=Config(), verbose=False)
        assert not declined.poisoned, declined.check_statistic
        assert declined.check_statistic < result.check_statistic - 0.3
        for a, b in zip(model.state_dict().values(), declined.model.state_dict().values(),
                        strict=True):
            assert torch.equal(a, b)
