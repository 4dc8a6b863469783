"""PoisonCAM's plug-in to the shared pipeline: cluster activation masking finds each image's
candidate, a flip is any change of a test image's cluster, a cluster scores the sum of its
images' scores (the paper's rules)."""

from __future__ import annotations

import torch

from fastbd.detection.config import Config
from fastbd.detection.method import DetectorMethod, SearchContext
from fastbd.poisoncam.masking import candidate_windows


class PoisonCAMMethod(DetectorMethod):
    name = "poisoncam"
    cluster_score = "sum"

    def candidates(self, context: SearchContext, rows: torch.Tensor,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        config, encoder = context.config, context.encoder
        out = candidate_windows(context.encode_assign, context.bank, rows.to(context.device),
                                encoder.mean, encoder.std, n_masks=config.n_masks,
                                window=config.window, strategy=config.mask_strategy,
                                block=config.mask_block, fill=config.fill,
                                batch_size=config.batch_size, generator=generator,
                                dtype=context.dtype)
        return out.windows, out.maps

    def encoder_passes(self, config: Config) -> int:
        return config.n_masks
