"""PNG plots for reports (matplotlib, headless)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from fastbd.storage import atomic_output  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    """Write ``fig`` as a PNG through ``atomic_output`` and close it."""
    fig.tight_layout()
    with atomic_output(path) as handle:
        fig.savefig(handle, format="png", dpi=100)
    plt.close(fig)
    return Path(path)


def save_image_grid(images: torch.Tensor, path: str | Path, columns: int = 10,
                    scale: float = 1.0) -> Path:
    """uint8 ``k×3×h×w`` images in a grid."""
    k = images.shape[0]
    columns = min(columns, max(1, k))
    rows = math.ceil(k / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(scale * columns, scale * rows),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < k:
            ax.imshow(images[i].permute(1, 2, 0).cpu().numpy())
    return _save(fig, path)


def save_attention_grid(maps: torch.Tensor, path: str | Path, columns: int = 10) -> Path:
    """float ``k×S×S`` maps in a grid (per-map colour scale)."""
    k = maps.shape[0]
    columns = min(columns, max(1, k))
    rows = math.ceil(k / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(columns, rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < k:
            ax.imshow(maps[i].cpu().numpy(), cmap="inferno")
    return _save(fig, path)


def save_score_histogram(scores: torch.Tensor, path: str | Path,
                         truth: torch.Tensor | None = None, title: str = "poison scores",
                         xlabel: str = "score") -> Path:
    """Histogram of ``scores``; split into poisoned vs clean when ``truth`` (bool) is given."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    values = scores.double().cpu()
    bins = 40
    if truth is not None:
        truth = truth.bool().cpu()
        ax.hist(values[~truth].numpy(), bins=bins, alpha=0.6, label="clean", log=True)
        ax.hist(values[truth].numpy(), bins=bins, alpha=0.6, label="poisoned", log=True)
        ax.legend()
    else:
        ax.hist(values.numpy(), bins=bins, log=True)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images")
    return _save(fig, path)


def save_token_heatmap(relevance: torch.Tensor, tokens: torch.Tensor, tokenizer,
                       path: str | Path) -> Path:
    """Relevance ``k×L`` of each caption's tokens (between its start and end tokens) as a
    labelled heatmap: one row per caption, one cell per token."""
    from fastbd.models.clip import caption_ends

    eot = caption_ends(tokens)
    width = max(1, int(eot.max()) - 1)
    grid = torch.zeros(tokens.shape[0], width)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * width), 0.45 * tokens.shape[0] + 1))
    for row in range(tokens.shape[0]):
        end = int(eot[row])
        grid[row, : end - 1] = relevance[row, 1:end]
        for col in range(1, end):
            word = tokenizer.decode([int(tokens[row, col])]).strip()
            ax.text(col - 1, row, word, ha="center", va="center", fontsize=7)
    ax.imshow(grid.numpy(), cmap="Reds", aspect="auto", vmin=0, vmax=max(1e-6, float(grid.max())))
    ax.set_yticks(range(tokens.shape[0]))
    ax.set_xticks([])
    ax.set_title("token relevance (Chefer) of the top pairs")
    return _save(fig, path)
