"""Supervised fine-tuning on the anchors (stage I, and `sft2`)."""

from __future__ import annotations

from torch import Tensor

from vlrlcd.objectives.common import masked_mean


def sft_loss(token_logp: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, float]]:
    """L = −(1/N_tok) Σ_t log π_θ(y_t | x, y_<t) over the real tokens of every sequence (mean NLL per token)."""
    loss = -masked_mean(token_logp, mask)
    tokens = float(mask.sum())
    return loss, {"loss": float(loss.detach()), "nll": float(loss.detach()), "tokens": tokens}
