"""The public API's promises: pipelines leave the caller's models as they were (weights, device,
dtype, train/eval mode) and run where the model is unless told otherwise."""

import copy

import torch
from torch import nn

from fastbd.baselines import ABLConfig, CleanCLIPConfig, abl, cleanclip
from fastbd.devices import device_of
from fastbd.models import small_encoder
from fastbd.models.clip import TinyCLIPConfig, clip_tokenizer, tiny_clip, tokenize
from fastbd.models.encoders import working_copy
from fastbd.poisoncam import ClassifierConfig, Config, detect
from fastbd.ubt import Config as UBTConfig
from fastbd.ubt import defend


def snapshot(model: nn.Module) -> tuple[dict, list[bool]]:
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [m.training for m in model.modules()])


def unchanged(model: nn.Module, before: tuple[dict, list[bool]]) -> bool:
    state, modes = before
    return (all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
            and [m.training for m in model.modules()] == modes)


def test_detect_leaves_the_encoder_as_it_was(gen):
    encoder = small_encoder(4, 16, seed=1).train()
    before = snapshot(encoder)
    images = torch.randint(0, 256, (60, 3, 16, 16), dtype=torch.uint8, generator=gen)
    config = Config(n_clusters=3, n_masks=4, test_set_size=10, topk_poisons=5,
                    classifier=ClassifierConfig(n_models=1, iterations=4, width=4,
                                                batch_size=8, val_every=2, patience=2))
    result = detect(encoder, images, config, verbose=False)
    assert result.scores.numel() == 60
    assert unchanged(encoder, before) and encoder.training


def test_clip_defenses_leave_the_models_as_they_were(gen):
    small = TinyCLIPConfig(vision_layers=1, text_layers=1)
    model, reference = tiny_clip(small, seed=1).train(), tiny_clip(small, seed=2)
    images = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8, generator=gen)
    tokens = tokenize(clip_tokenizer(), [f"a photo of item {i}." for i in range(24)],
                      small.context_length)
    before, reference_before = snapshot(model), snapshot(reference)
    ubt = defend(model, images, tokens, reference=reference, verbose=False,
                 config=UBTConfig(susp_fraction=0.25, overfit_epochs=1, unlearn_epochs=1,
                                  overfit_min_steps=0, unlearn_min_steps=0, batch_size=8,
                                  skip_check=True))
    ablated = abl(model, images, tokens, reference=reference, verbose=False,
                  config=ABLConfig(susp_fraction=0.25, epochs=1, min_steps=0, batch_size=8))
    cleaned = cleanclip(model, images, tokens, verbose=False,
                        config=CleanCLIPConfig(epochs=1, batch_size=8))
    for result in (ubt, ablated, cleaned):
        assert result.model is not model
    assert unchanged(model, before) and unchanged(reference, reference_before)


def test_pipelines_run_where_the_model_is():
    model = nn.Linear(2, 2)
    assert device_of(model) == torch.device("cpu")
    assert device_of(model, "meta") == torch.device("meta")
    assert device_of(nn.ReLU()) == torch.device("cpu")


def test_working_copy_copies_only_when_it_must():
    encoder = small_encoder(4, 16).eval()
    assert working_copy(encoder, "cpu") is encoder
    training = copy.deepcopy(encoder).train()
    copied = working_copy(training, "cpu")
    assert copied is not training and not copied.training and training.training
    half = working_copy(encoder, "cpu", torch.float16)
    assert half is not encoder and half.dtype == torch.float16
    assert encoder.dtype == torch.float32
