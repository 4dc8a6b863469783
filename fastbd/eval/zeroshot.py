"""Zero-shot classification and image–text retrieval for CLIP models."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastbd.attacks.triggers import Attack
from fastbd.eval.metrics import accuracy, attack_success_rate
from fastbd.models.clip import context_length_of, encode_images, encode_texts, tokenize

GENERIC_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.")
"""Zero-shot prompts for any class names (``{}`` is the name)."""


def zero_shot_weights(model: nn.Module, tokenizer, class_names: list[str],
                      templates: tuple[str, ...] | list[str], *, prefix: str = "",
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """Class embeddings float32 ``C×E``: per class, embed every template (with ``prefix`` in
    front, e.g. a dual-key text trigger), normalise, average, renormalise (open_clip's
    ``build_zero_shot_classifier`` semantics)."""
    if not class_names or not templates:
        raise ValueError("need at least one class name and one template")
    texts = [prefix + t.format(name) for name in class_names for t in templates]
    tokens = tokenize(tokenizer, texts, context_length_of(model))
    emb = encode_texts(model, tokens, device=device).view(len(class_names), len(templates), -1)
    return F.normalize(emb.mean(1), dim=1)


def zero_shot_predict(model: nn.Module, images: torch.Tensor, weights: torch.Tensor, *,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """Predicted class ids int64 ``N`` of uint8 images by cosine to the class embeddings."""
    return (encode_images(model, images, device=device) @ weights.to(device).T).argmax(1).cpu()


def retrieval_recall(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor,
                     ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k of paired unit embeddings ``N×E``: image→text and text→image."""
    if image_embeddings.shape != text_embeddings.shape:
        raise ValueError("image and text embeddings must pair up (same shape)")
    sims = image_embeddings @ text_embeddings.T
    truth = torch.arange(sims.shape[0], device=sims.device)
    out = {}
    for k in ks:
        kk = min(k, sims.shape[1])
        out[f"image_to_text_R@{k}"] = float((sims.topk(kk, 1).indices == truth[:, None]).any(1)
                                            .double().mean())
        out[f"text_to_image_R@{k}"] = float((sims.T.topk(kk, 1).indices == truth[:, None])
                                            .any(1).double().mean())
    return out


@dataclass
class TriggeredSet:
    """Images that already carry a trigger (a user's own triggered evaluation set): uint8
    ``images`` ``N×3×S×S``, their true classes ``labels`` int64 ``N`` (before triggering) and a
    ``name`` for the result's ``attack`` field."""

    images: torch.Tensor
    labels: torch.Tensor
    name: str


@dataclass
class ZeroShotResult:
    """Zero-shot ``clean_accuracy`` on clean images, ``asr`` (share of triggered non-target
    images classified as ``target``), ``patched_accuracy`` on the triggered images, and image–
    text ``retrieval`` recall@k when captions were given — the names the defenses' results and
    the linear probe use."""

    clean_accuracy: float
    patched_accuracy: float
    asr: float
    target: int
    attack: str
    retrieval: dict[str, float] | None = None
    retrieval_asr: float | None = None
    """With captions: the share of triggered non-target images whose nearest caption (among
    the clean evaluation captions) is a target-class image's (``retrieval_attack_rate``)."""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def retrieval_attack_rate(triggered_embeddings: torch.Tensor, triggered_labels: torch.Tensor,
                          caption_embeddings: torch.Tensor, caption_labels: torch.Tensor,
                          target: int) -> float:
    """UBT's retrieval ASR (its Table VII): over the triggered images whose true class is not
    ``target`` (unit embeddings ``T×E``, int64 labels ``T``), the share whose top-1 caption
    among ``caption_embeddings`` (unit ``C×E``, the class of each caption's image in
    ``caption_labels``) is a target-class image's. A clean model retrieves target captions
    about as often as they make up the pool. Raises when no triggered image is outside the
    target class."""
    keep = triggered_labels != target
    if not bool(keep.any()):
        raise ValueError("retrieval ASR needs a triggered image outside the target class")
    nearest = (triggered_embeddings[keep] @ caption_embeddings.T).argmax(1)
    return float((caption_labels.to(nearest.device)[nearest] == target).double().mean())


def zero_shot_probabilities(model: nn.Module, images: torch.Tensor, weights: torch.Tensor, *,
                            device: torch.device | str = "cpu") -> torch.Tensor:
    """The model's zero-shot class distribution of each image, float64 ``N×C``: the softmax of
    its cosines to the class embeddings ``weights`` times the model's own learned logit scale
    (``exp(logit_scale)``, at most 100, as in training)."""
    scale = float(model.logit_scale.detach().exp().clamp(max=100))
    cosines = encode_images(model, images, device=device) @ weights.to(device).T
    return torch.softmax(scale * cosines.double(), dim=1).cpu()


def zero_shot_kl(model: nn.Module, retrained: nn.Module, tokenizer, images: torch.Tensor,
                 class_names: list[str], templates: tuple[str, ...] | list[str], *,
                 device: torch.device | str = "cpu") -> float:
    """UBT's Table III KL (the paper leaves it undefined; fastbd's definition): the mean over
    the clean ``images`` of KL(retrained ‖ model) between the two models' zero-shot class
    distributions (``zero_shot_probabilities``, each at its own logit scale, same prompts) —
    0 when the defended ``model`` answers as the model retrained on clean data does."""
    reference = zero_shot_probabilities(
        retrained, images, zero_shot_weights(retrained, tokenizer, class_names, templates,
                                             device=device), device=device)
    defended = zero_shot_probabilities(
        model, images, zero_shot_weights(model, tokenizer, class_names, templates,
                                         device=device), device=device)
    kl = (reference * (reference.clamp_min(1e-300).log() - defended.clamp_min(1e-300).log()))
    return float(kl.sum(1).mean())


def evaluate_zero_shot(model: nn.Module, tokenizer, images: torch.Tensor, labels: torch.Tensor,
                       class_names: list[str], templates: tuple[str, ...] | list[str],
                       trigger: Attack | TriggeredSet, target: int, *,
                       tokens: torch.Tensor | None = None, seed: int = 0,
                       device: torch.device | str = "cpu") -> ZeroShotResult:
    """Zero-shot CA of uint8 ``images`` ``N×3×S×S`` with int64 ``labels`` ``N`` (prompts:
    ``templates`` filled with ``class_names``); ASR and patched accuracy on the images
    triggered by ``trigger`` (evaluation placement, drawn from ``seed``; a dual-key trigger's
    text goes in front of every prompt) or on a ``TriggeredSet``'s images as they are; with
    the captions' ``tokens`` ``N×L``, retrieval recall@1/5/10 of the clean pairs and the
    retrieval ASR (``retrieval_attack_rate``)."""
    _check_labels("", images, labels, class_names)
    if not 0 <= target < len(class_names):
        raise ValueError(f"target {target} is not one of the {len(class_names)} classes")
    weights = zero_shot_weights(model, tokenizer, class_names, templates, device=device)
    clean = accuracy(zero_shot_predict(model, images, weights, device=device), labels)
    if isinstance(trigger, TriggeredSet):
        _check_labels("triggered ", trigger.images, trigger.labels, class_names)
        triggered, triggered_labels = trigger.images, trigger.labels
    else:
        triggered, _ = trigger.apply(images, torch.Generator().manual_seed(seed + 1),
                                     train=False)
        triggered_labels = labels
        if trigger.caption_prefix():
            weights = zero_shot_weights(model, tokenizer, class_names, templates,
                                        prefix=trigger.caption_prefix(), device=device)
    patched = zero_shot_predict(model, triggered, weights, device=device)
    retrieval = retrieval_asr = None
    if tokens is not None:
        captions = encode_texts(model, tokens, device=device)
        retrieval = retrieval_recall(encode_images(model, images, device=device), captions)
        if bool((triggered_labels != target).any()):
            retrieval_asr = retrieval_attack_rate(
                encode_images(model, triggered, device=device), triggered_labels.to(device),
                captions, labels, target)
    return ZeroShotResult(clean_accuracy=clean,
                          patched_accuracy=accuracy(patched, triggered_labels),
                          asr=attack_success_rate(patched, triggered_labels, target),
                          target=target, attack=trigger.name, retrieval=retrieval,
                          retrieval_asr=retrieval_asr)


def _check_labels(what: str, images: torch.Tensor, labels: torch.Tensor,
                  class_names: list[str]) -> None:
    if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ValueError(f"need as many labels as {what}images (at least one), got "
                         f"{images.shape[0]} images and {labels.shape[0]} labels")
    if int(labels.max()) >= len(class_names) or int(labels.min()) < 0:
        raise ValueError(f"{what}labels run 0–{int(labels.max())} but {len(class_names)} class "
                         "names were given")
