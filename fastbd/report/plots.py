"""PNG plots for reports (matplotlib, headless)."""

from __future__ import annotations

import math
from collections.abc import Sequence
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
                         xlabel: str = "score", ylabel: str = "images") -> Path:
    """Histogram of ``scores`` (counts of ``ylabel`` on a log axis); split into poisoned vs
    clean when ``truth`` (bool) is given."""
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
    ax.set_ylabel(f"{ylabel} (log scale)")
    return _save(fig, path)


def save_token_heatmap(relevance: torch.Tensor, tokens: torch.Tensor, tokenizer,
                       path: str | Path, pair_ids: Sequence[int] | None = None,
                       poisoned: Sequence[bool] | None = None) -> Path:
    """``token_heatmap_figure`` written to ``path`` as a PNG."""
    return _save(token_heatmap_figure(relevance, tokens, tokenizer, pair_ids, poisoned), path)


def token_heatmap_figure(relevance: torch.Tensor, tokens: torch.Tensor, tokenizer,
                         pair_ids: Sequence[int] | None = None,
                         poisoned: Sequence[bool] | None = None):
    """Relevance ``k×L`` of each caption's tokens (between its start and end tokens) as a
    labelled heatmap: one row per caption (labelled with its pair id from ``pair_ids`` and,
    when known, whether it is ``poisoned``), one cell per decoded token, and a colour bar."""
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
    shown = ax.imshow(grid.numpy(), cmap="Reds", aspect="auto", vmin=0,
                      vmax=max(1e-6, float(grid.max())))
    labels = []
    for row in range(tokens.shape[0]):
        label = f"pair {pair_ids[row]}" if pair_ids is not None else f"#{row}"
        if poisoned is not None:
            label += " (poisoned)" if poisoned[row] else " (clean)"
        labels.append(label)
    ax.set_yticks(range(tokens.shape[0]), labels, fontsize=7)
    ax.set_xticks([])
    ax.set_xlabel("caption tokens, in order")
    fig.colorbar(shown, ax=ax, label="relevance (share of the caption's)")
    ax.set_title("token relevance (Chefer) of the top pairs")
    return fig
