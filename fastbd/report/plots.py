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


def save_attention_grid(images: torch.Tensor, maps: torch.Tensor, windows: torch.Tensor,
                        window: int, path: str | Path, image_ids: Sequence[int] | None = None,
                        poisoned: Sequence[bool] | None = None) -> Path:
    """``attention_grid_figure`` written to ``path`` as a PNG."""
    return _save(attention_grid_figure(images, maps, windows, window, image_ids, poisoned), path)


def attention_grid_figure(images: torch.Tensor, maps: torch.Tensor, windows: torch.Tensor,
                          window: int, image_ids: Sequence[int] | None = None,
                          poisoned: Sequence[bool] | None = None, per_row: int = 4):
    """Each candidate side by side: its image (uint8 ``k×3×S×S``), its attention map (float
    ``k×S×S``, per-map colour scale) and the image with the chosen ``window``-px window
    (``windows`` int ``k×2``, top-left y, x) outlined; ``per_row`` candidates per row, titled
    with ``image_ids`` (bank rows) and, where known, ``poisoned``."""
    from matplotlib.patches import Rectangle

    k = images.shape[0]
    if maps.shape[0] != k or windows.shape[0] != k:
        raise ValueError(f"{k} images, {maps.shape[0]} maps and {windows.shape[0]} windows")
    per_row = min(per_row, max(1, k))
    rows = math.ceil(k / per_row)
    fig, axes = plt.subplots(rows, 3 * per_row, figsize=(3 * per_row * 1.2, rows * 1.45),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(k):
        image_ax, map_ax, window_ax = axes[i // per_row, 3 * (i % per_row):3 * (i % per_row) + 3]
        picture = images[i].permute(1, 2, 0).cpu().numpy()
        label = f"#{image_ids[i]}" if image_ids is not None else f"{i + 1}"
        if poisoned is not None:
            label += " poisoned" if poisoned[i] else " clean"
        image_ax.imshow(picture)
        image_ax.set_title(label, fontsize=7)
        map_ax.imshow(maps[i].cpu().numpy(), cmap="inferno")
        map_ax.set_title("map", fontsize=7)
        window_ax.imshow(picture)
        y, x = (int(v) for v in windows[i])
        window_ax.add_patch(Rectangle((x - 0.5, y - 0.5), window, window, fill=False,
                                      edgecolor="lime", linewidth=1.2))
        window_ax.set_title("window", fontsize=7)
    return fig


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


def save_retrieval_curve(curve: Sequence[dict], path: str | Path) -> Path:
    """Acc, IoU and CR of the top-k retrieved windows over k (``curve``: rows with ``k``,
    ``acc``, ``iou``, ``cr``; the PoisonCAM paper's Fig. 4), k on a log axis."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    depths = [row["k"] for row in curve]
    for key, label in (("acc", "Acc (any overlap)"), ("iou", "IoU"), ("cr", "CR (catch rate)")):
        ax.plot(depths, [row[key] for row in curve], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("top-k windows of the ranking")
    ax.set_ylabel("share")
    ax.set_title("retrieved windows against the true triggers")
    ax.legend()
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
