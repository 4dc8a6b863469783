"""What a detector plugs into the shared pipeline (``Detector``): how it finds each image's
candidate trigger window, how the flip test scores a candidate, and how a cluster's score
combines its images' scores.

A new detector is a package with one ``DetectorMethod`` subclass and one registration
(``fastbd.registry.DETECTORS``); ``fastbd.poisoncam`` and ``fastbd.patchsearch`` are the two
examples (docs/contributing.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastbd.detection.clustering import ClusteringModel
from fastbd.detection.config import Config
from fastbd.models.encoders import Encoder

# encode_assign(normalised input B×3×S×S) -> (cluster ids int64 B, distances float B)
EncodeAssign = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class SearchContext:
    """Everything a method sees while the search runs. ``encoder``: the float32 encoder (for
    gradients); ``encode_assign``: the inference encoder (``dtype``) followed by the clustering
    model; ``bank``: uint8 ``N×3×S×S`` images (a device tensor or ``HostRows``); ``labels``:
    int64 ``N`` cluster ids; ``config``: the config scaled to the data."""

    encoder: Encoder
    encode_assign: EncodeAssign
    clustering: ClusteringModel
    bank: torch.Tensor
    labels: torch.Tensor
    config: Config
    device: torch.device
    dtype: torch.dtype


class DetectorMethod:
    """A detector's three choices. ``name`` tags its results and saved searches;
    ``cluster_score``: ``sum`` or ``max`` of a cluster's scored images."""

    name: str = ""
    cluster_score: str = "sum"

    def candidates(self, context: SearchContext, rows: torch.Tensor,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate windows int64 ``B×2`` (top-left) and attention maps float ``B×S×S`` of the
        bank ``rows`` (int64 ``B``)."""
        raise NotImplementedError

    def encoder_passes(self, config: Config) -> int:
        """Encoder passes ``candidates`` makes per image (for the throughput figures)."""
        return 1

    def flip_sources(self, context: SearchContext, rows: torch.Tensor) -> torch.Tensor | None:
        """None: a flip is any change of a test image's cluster; else int64 ``B`` cluster ids:
        the flip score counts test images pulled into that cluster minus those already in it
        (``fastbd.detection.flip.flip_counts``)."""
        return None
