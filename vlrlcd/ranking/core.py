"""The ranking core's math: margins against the anchor, the target distribution D_x, its entropy.

Pure tensor functions; no model, no gradient needed (the scorer's outputs are constants here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def margins(g_cand: Tensor, g_anchor: Tensor) -> Tensor:
    """r_k = g(x, a, y_k) − g(x, a, a): [B, K] candidate scores minus the [B] anchor self-score."""
    if g_cand.dim() != 2 or g_anchor.shape != g_cand.shape[:1]:
        raise ValueError(f"margins expects g_cand [B, K] and g_anchor [B], got {tuple(g_cand.shape)} "
                         f"and {tuple(g_anchor.shape)}")
    return g_cand - g_anchor.unsqueeze(-1)


def log_target_distribution(r: Tensor, gamma: float, tau: float, valid: Tensor | None = None) -> Tensor:
    """log D_x(k) = log σ(γ r_k) + r_k / τ − logsumexp_j(·); −inf where valid is False."""
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    logits = F.logsigmoid(gamma * r) + r / tau
    if valid is not None:
        logits = logits.masked_fill(~valid.bool(), float("-inf"))
    log_d = torch.log_softmax(logits, dim=-1)
    # a group with no valid candidate would be NaN (−inf − −inf): make it all −inf (D = 0)
    return torch.nan_to_num(log_d, nan=float("-inf"))


def target_distribution(r: Tensor, gamma: float, tau: float, valid: Tensor | None = None) -> Tensor:
    """D_x(k) ∝ sigmoid(γ r_k) · exp(r_k / τ) over the K candidates of each prompt, [B, K] -> [B, K].

    Computed in log space (logsigmoid + r/τ, then log-softmax) so large |r|/τ cannot overflow.
    Strictly increasing in r_k for γ ≥ 0, τ > 0. Entries with valid=False get probability 0; a row
    with no valid entry is all zeros. γ = 0 gives the Gibbs distribution softmax(r/τ).
    """
    return log_target_distribution(r, gamma, tau, valid).exp()


def entropy(D: Tensor) -> Tensor:
    """H(D) = −Σ_k D_k log D_k over the last dim (0·log 0 = 0), [B, K] -> [B]."""
    return -torch.special.xlogy(D, D).sum(dim=-1)
