"""Scores of the baselines, which run through the same database → search → surgery path as zipkd:

- `magnitude`: uniform width pruning (every layer keeps the same KV groups count and MLP width); structures
  ranked by the L2 norm of all their weights (q/k/v rows and o columns of a KV group; gate/up rows and the
  down column of a channel). Needs no calibration data.
- `shortgpt`: whole layers dropped by block influence BI = 1 − cos(input, output) of the layer, averaged over
  calibration tokens (Men et al., 2024, "ShortGPT").
- `wanda-sp`: structures ranked by (`structure_scores`) Σ|W|·‖x‖ of the output projection's columns (Wanda-sp / FLAP-like, An et
  al., 2024), no weight update; errors for the search are the true output errors of the kept structures.
"""

from __future__ import annotations

import torch


def kv_group_magnitude(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, head_dim: int, group_size: int
) -> torch.Tensor:
    """Squared L2 norm of every weight belonging to each KV group (its query heads, K/V head and o columns)."""
    n_groups = k.shape[0] // head_dim
    qg = q.float().square().sum(1).view(n_groups, group_size * head_dim).sum(1)
    kg = k.float().square().sum(1).view(n_groups, head_dim).sum(1)
    vg = v.float().square().sum(1).view(n_groups, head_dim).sum(1)
    og = o.float().square().sum(0).view(n_groups, group_size * head_dim).sum(1)
    return qg + kg + vg + og


def channel_magnitude(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of each MLP channel's weights (gate row, up row, down column)."""
    return gate.float().square().sum(1) + up.float().square().sum(1) + down.float().square().sum(0)


class BlockInfluence:
    """Running mean over tokens of 1 − cos(layer input, layer output) (ShortGPT's block influence)."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def update(self, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        a = x_in.float().reshape(-1, x_in.shape[-1])
        b = x_out.float().reshape(-1, x_out.shape[-1])
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-8)
        self.total += float((1 - cos).sum())
        self.count += a.shape[0]

    @property
    def value(self) -> float:
        return self.total / max(self.count, 1)


def structure_scores(W: torch.Tensor, H: torch.Tensor, cols_per_structure: int) -> torch.Tensor:
    """Wanda-sp / FLAP-like activation-weighted scores: Σ_i |W_ij|·‖x_j‖ summed over each structure's columns
    (‖x_j‖ ∝ sqrt(H_jj))."""
    norms = H.diagonal().clamp_min(0).sqrt()
    col = (W.abs().float() * norms).sum(0)
    return col.view(-1, cols_per_structure).sum(1)
