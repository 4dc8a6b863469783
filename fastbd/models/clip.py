"""open_clip CLIP models: the synthetic world's tiny CLIP, loading any architecture with its
weights, tokenizing, normalising images and encoding both towers."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastbd.devices import conv_memory_format
from fastbd.models.encoders import seeded_rng
from fastbd.storage import load_state_dict_file, state_dict_mismatch

log = logging.getLogger(__name__)


@dataclass
class TinyCLIPConfig:
    """A CLIP small enough for two CPU cores. ``vision_type``: ``resnet`` (open_clip's
    ModifiedResNet with ``resnet_layers`` blocks per stage and stem width ``vision_width``) or
    ``vit`` (``vision_layers`` blocks of ``vision_width``, ``patch_size``). ``vocab_size`` stays
    49408 so EOT (49407) is the largest id and open_clip's argmax pooling finds it."""

    vision_type: str = "resnet"
    resnet_layers: tuple[int, int, int, int] = (1, 1, 1, 1)
    embed_dim: int = 64
    image_size: int = 32
    patch_size: int = 4
    vision_width: int = 16
    vision_layers: int = 2
    vision_head_width: int = 32
    context_length: int = 32
    text_width: int = 64
    text_heads: int = 2
    text_layers: int = 2


def tiny_clip(config: TinyCLIPConfig | None = None, seed: int = 0) -> nn.Module:
    """A randomly initialised open_clip ``CLIP`` of the given size, its weights from ``seed``
    alone (the global RNG is left as it was)."""
    import open_clip

    config = config or TinyCLIPConfig()
    if config.vision_type not in ("resnet", "vit"):
        raise ValueError(f"vision_type must be 'resnet' or 'vit', got {config.vision_type!r}")
    layers = (tuple(config.resnet_layers) if config.vision_type == "resnet"
              else config.vision_layers)
    with seeded_rng(seed):
        return open_clip.CLIP(
            embed_dim=config.embed_dim,
            vision_cfg=dict(image_size=config.image_size, layers=layers,
                            width=config.vision_width, patch_size=config.patch_size,
                            head_width=config.vision_head_width),
            text_cfg=dict(context_length=config.context_length, vocab_size=49408,
                          width=config.text_width, heads=config.text_heads,
                          layers=config.text_layers))


def load_clip(arch: str, checkpoint: str | Path | None, image_size: int | None = None,
              seed: int = 0, pretrained: str | None = None) -> nn.Module:
    """An open_clip CLIP by architecture name (e.g. ``ViT-B-32``, ``RN50``) or ``tiny``
    (fastbd's ``TinyCLIPConfig``), with weights from ``checkpoint`` (a state dict, or a dict
    holding one under ``state_dict``/``model``; ``module.`` prefixes are stripped), else from
    open_clip's ``pretrained`` tag (e.g. ``openai``: open_clip loads it from its cache, or
    downloads it where the network allows; a tag it cannot get is a ``ValueError`` saying what
    to fetch), else random from ``seed``. ``image_size``: the image tower's input side
    (default: the architecture's; for ``tiny`` with a checkpoint, the size it was trained at,
    read from its position embedding)."""
    import open_clip

    if pretrained is not None:
        if checkpoint is not None:
            raise ValueError("give one of a checkpoint file and an open_clip pretrained tag")
        if arch == "tiny":
            raise ValueError("the tiny CLIP has no open_clip pretrained weights; give a "
                             "checkpoint file")
        options = {} if image_size is None else {"force_image_size": image_size}
        try:
            return open_clip.create_model(arch, pretrained=pretrained, **options).eval()
        except Exception as error:  # unknown tag, not cached and no network, corrupt file
            raise ValueError(
                f"cannot load open_clip's {arch!r} weights {pretrained!r} ({error}); on a "
                f"machine with network access run open_clip.create_model({arch!r}, "
                f"pretrained={pretrained!r}) to fill the cache, or save the weights and pass "
                "the file as the checkpoint") from None
    state = None
    if checkpoint is not None:
        path = Path(checkpoint)
        state = {k.removeprefix("module."): v for k, v in load_state_dict_file(path).items()}
    if arch == "tiny":
        size = image_size or (tiny_image_size(state) if state is not None else None)
        model = tiny_clip(TinyCLIPConfig(**({} if size is None else {"image_size": size})),
                          seed=seed)
    else:
        options = {} if image_size is None else {"force_image_size": image_size}
        try:
            with seeded_rng(seed):
                model = open_clip.create_model(arch, pretrained=None, **options)
        except RuntimeError as error:
            raise ValueError(f"unknown open_clip architecture {arch!r}: {error}") from error
    if state is not None:
        mismatch = state_dict_mismatch(model, state)
        if mismatch:
            raise ValueError(f"checkpoint {path} does not fit the {arch!r} CLIP: {mismatch}")
        model.load_state_dict(state)
    return model.eval()


def tiny_image_size(state: dict[str, torch.Tensor]) -> int | None:
    """The input side a ``load_clip('tiny')`` state dict (ResNet image tower) was built for:
    the attention pool's position embedding has one row per output cell (``S/32`` a side) plus
    the pooled token. None when the state holds no such embedding (another architecture)."""
    embedding = state.get("visual.attnpool.positional_embedding")
    if embedding is None:
        return None
    return round((embedding.shape[0] - 1) ** 0.5) * 32


def tokenizer_name(arch: str) -> str:
    """The open_clip tokenizer of ``load_clip``'s ``arch`` (``tiny`` uses CLIP's BPE)."""
    return "ViT-B-32" if arch == "tiny" else arch


def clip_tokenizer(name: str = "ViT-B-32"):
    """open_clip's BPE tokenizer (ships with the package; no download)."""
    import open_clip

    return open_clip.get_tokenizer(name)


def clip_preprocessing(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std (in [0, 1] units) ``model``'s image tower expects: the
    ``preprocess_cfg`` open_clip set when it built the model (its architecture's and pretrained
    tag's), OpenAI's for a model built without one (``tiny_clip``)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    mean = cfg.get("mean") or getattr(model.visual, "image_mean", None) or OPENAI_DATASET_MEAN
    std = cfg.get("std") or getattr(model.visual, "image_std", None) or OPENAI_DATASET_STD
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def clip_mean_std(model: nn.Module, device: torch.device | str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``clip_preprocessing(model)`` as float32 ``3×1×1`` tensors on ``device``."""
    mean, std = clip_preprocessing(model)
    return (torch.tensor(mean, device=device)[:, None, None],
            torch.tensor(std, device=device)[:, None, None])


def clip_normalise(images: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """uint8 ``N×3×S×S`` → float32 with ``model``'s mean/std (``clip_preprocessing``), in
    ``conv_memory_format`` of the images' device (channels-last on CUDA)."""
    mean, std = clip_mean_std(model, images.device)
    pixels = (images.float() / 255 - mean) / std
    return pixels.contiguous(memory_format=conv_memory_format(images.device))


def caption_ends(tokens: torch.Tensor) -> torch.Tensor:
    """Position int64 ``N`` of each caption's end-of-text token in token ids ``N×L``: its last
    non-padding position (open_clip's tokenizers pad with 0 after it). No token id is assumed,
    so it holds for any vocabulary whose captions start and end with their own special
    tokens."""
    positions = torch.arange(1, tokens.shape[1] + 1, device=tokens.device)
    return ((tokens != 0) * positions).argmax(dim=1)


def clip_image_size(model: nn.Module) -> int:
    """The input side of a CLIP's image tower (``visual.image_size``; 224 when it has none)."""
    size = getattr(model.visual, "image_size", 224)
    return int(size[0] if isinstance(size, tuple | list) else size)


def context_length_of(model: nn.Module) -> int:
    return int(getattr(model, "context_length", model.positional_embedding.shape[0]))


def tokenize(tokenizer, captions: list[str], context_length: int,
             names: list[str] | None = None) -> torch.Tensor:
    """int64 ``N×L`` token ids; raises ``ValueError`` if a caption does not fit (open_clip
    would truncate it silently, dropping words and moving EOT), naming it by ``names[i]`` (e.g.
    ``file.csv:12``) or, without names, by its 1-based position."""
    encode = getattr(tokenizer, "encode", None)
    if encode is not None:
        for i, caption in enumerate(captions):
            length = len(encode(caption)) + 2  # SOT and EOT
            if length > context_length:
                where = names[i] if names is not None else f"caption #{i + 1}"
                raise ValueError(f"{where}: the caption needs {length} tokens, longer than the "
                                 f"context ({context_length} tokens): {caption[:80]!r}")
    return tokenizer(captions, context_length=context_length)


@torch.no_grad()
def encode_images(model: nn.Module, images: torch.Tensor, batch_size: int = 512,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Unit-norm image embeddings, float32 ``N×E``, of uint8 images ``N×3×S×S``."""
    model.eval()
    out = [model.encode_image(clip_normalise(images[s:s + batch_size].to(device), model)).float()
           for s in range(0, images.shape[0], batch_size)]
    return F.normalize(torch.cat(out), dim=1) if out else torch.empty(0, 0)


@torch.no_grad()
def encode_texts(model: nn.Module, tokens: torch.Tensor, batch_size: int = 1024,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Unit-norm text embeddings, float32 ``N×E``, of token ids ``N×L``."""
    model.eval()
    out = [model.encode_text(tokens[s:s + batch_size].to(device)).float()
           for s in range(0, tokens.shape[0], batch_size)]
    return F.normalize(torch.cat(out), dim=1) if out else torch.empty(0, 0)
