"""A CLIP defense's input from files: the pairs of a CSV as uint8 images at the model's input
size and token ids of its context length, with the CSV's ground truth when it has one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fastbd.data.bank import ImageBank, LoadReport
from fastbd.data.readers import csv_labels, read_csv_pairs
from fastbd.models.clip import clip_image_size, clip_tokenizer, context_length_of, tokenize

TRUE_FLAGS = ("1", "true", "yes")


@dataclass
class LoadedPairs:
    """uint8 ``images`` ``N×3×S×S``, int64 ``tokens`` ``N×L`` (None: no captions), ``truth``
    (bool ``N`` from the CSV's ``is_backdoor`` column, or None), ``labels`` (int64 ``N`` from
    its ``label`` column, or None), the ``tokenizer`` used and the files' ``report`` (which
    rows were kept, which images skipped); for shards, each pair's sample ``keys``
    (``<shard>/<key>``)."""

    images: torch.Tensor
    tokens: torch.Tensor | None
    truth: torch.Tensor | None
    tokenizer: object
    report: LoadReport
    labels: torch.Tensor | None = None
    keys: list[str] | None = None


def load_pairs(csv_path: str | Path, model: nn.Module, *, tokenizer_name: str = "ViT-B-32",
               image_key: str = "image", caption_key: str = "caption", separator: str = ",",
               image_size: int | None = None, skip_bad: bool = False,
               cache: str | Path | None = None, duplicates: str = "warn",
               verbose: bool = True, captions_required: bool = True) -> LoadedPairs:
    """Read the pairs of ``csv_path`` for ``model``: images through CLIP's eval transform
    (shorter side resized to ``image_size``, centre crop; default: the model's input size;
    cached as a memory-mapped ``.npy`` at ``cache``), captions tokenized with open_clip's
    ``tokenizer_name`` tokenizer at the model's context length (a caption that does not fit is
    an error naming its line, not a silent truncation). Without ``captions_required`` a CSV
    with no caption column gives ``tokens`` None (images and labels only)."""
    pairs = read_csv_pairs(csv_path, image_key=image_key, caption_key=caption_key,
                           separator=separator, duplicates=duplicates,
                           captions_required=captions_required)
    tokenizer = clip_tokenizer(tokenizer_name)
    tokens = None
    if pairs.captions is not None:  # before the images: a caption too long fails at once
        tokens = tokenize(tokenizer, pairs.captions, context_length_of(model),
                          [f"{csv_path}:{line}" for line in pairs.lines])
    size = image_size or clip_image_size(model)
    bank, report = ImageBank.from_files(pairs.paths, size, crop_ratio=1.0, skip_bad=skip_bad,
                                        cache=cache, verbose=verbose)
    if tokens is not None:
        tokens = tokens[report.kept]
    flags = pairs.columns.get("is_backdoor")
    truth = (torch.tensor([flags[i].strip().lower() in TRUE_FLAGS for i in report.kept])
             if flags else None)
    labels = (torch.tensor(csv_labels(csv_path, pairs))[report.kept]
              if "label" in pairs.columns else None)
    return LoadedPairs(torch.as_tensor(bank.images[:]), tokens, truth, tokenizer, report, labels)


def load_shard_pairs(urls: str | list[str], model: nn.Module, *,
                     tokenizer_name: str = "ViT-B-32", caption_key: str = "txt",
                     image_size: int | None = None, skip_bad: bool = False,
                     cache: str | Path | None = None, verbose: bool = True) -> LoadedPairs:
    """``load_pairs`` for WebDataset shards (``fastbd.data.shards``): streamed, decoded at the
    model's input size (or ``image_size``) into a memory-mapped ``cache`` when given; ground
    truth and labels from the samples' ``json`` members (``is_backdoor``, ``label``)."""
    from fastbd.data.shards import read_shard_pairs

    read = read_shard_pairs(urls, image_size or clip_image_size(model), caption_key=caption_key,
                            skip_bad=skip_bad, cache=cache, verbose=verbose)
    tokenizer = clip_tokenizer(tokenizer_name)
    tokens = tokenize(tokenizer, read.captions, context_length_of(model), read.keys)
    return LoadedPairs(read.bank.images, tokens, read.truth, tokenizer, read.report, read.labels,
                       read.keys)
