"""Zero-shot classification and image–text retrieval for CLIP models."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastbd.models.clip import context_length_of, encode_images, encode_texts, tokenize


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
