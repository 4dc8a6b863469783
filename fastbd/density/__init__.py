"""Detection of poisoned CLIP pairs by local density in embedding space (k-distance, LID,
SLOF, DAO over each pair's k nearest neighbours), on ``fastbd.ops.cosine_topk``: the example of
a defense built on fastbd's ops."""

from fastbd.density.detect import DensityConfig, DensityResult, density_detect, robust_cutoff
from fastbd.density.scores import (
    SCORES,
    Neighbours,
    dao,
    density_scores,
    k_distance,
    lid,
    nearest_neighbours,
    slof,
)

__all__ = ["SCORES", "DensityConfig", "DensityResult", "Neighbours", "dao", "density_detect",
           "density_scores", "k_distance", "lid", "nearest_neighbours", "robust_cutoff", "slof"]
