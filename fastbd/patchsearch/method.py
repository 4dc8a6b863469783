"""PatchSearch's plug-in to the shared pipeline (Tejankar et al.): Grad-CAM of the assigned
cluster finds each image's candidate, the flip score counts test images pulled into the
candidate's cluster minus those already there, a cluster scores the max of its images."""

from __future__ import annotations

import torch

from fastbd.detection.method import DetectorMethod, SearchContext
from fastbd.patchsearch.gradcam import gradcam_windows


class PatchSearchMethod(DetectorMethod):
    name = "patchsearch"
    cluster_score = "max"

    def candidates(self, context: SearchContext, rows: torch.Tensor,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return gradcam_windows(context.encoder, context.bank, rows, context.clustering,
                               context.config.window,
                               batch_size=max(1, context.config.batch_size // 4))

    def flip_sources(self, context: SearchContext, rows: torch.Tensor) -> torch.Tensor:
        return context.labels[rows.to(context.labels.device)]
