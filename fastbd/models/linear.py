"""A linear classifier fitted on frozen features: the probe of the SSL evaluation and the pool
model of the poison classifier."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fit_linear(features: torch.Tensor, labels: torch.Tensor, n_classes: int, steps: int,
               weight_decay: float) -> torch.nn.Linear:
    """Multinomial logistic regression (L-BFGS) on float ``N×D`` features, from zero weights
    (the problem is convex, so no random start is needed and the fit is reproducible)."""
    layer = torch.nn.Linear(features.shape[1], n_classes).to(features.device)
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    optimizer = torch.optim.LBFGS(layer.parameters(), lr=1.0, max_iter=steps,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(layer(features), labels) + weight_decay * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return layer
