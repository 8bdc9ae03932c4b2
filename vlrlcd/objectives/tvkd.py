"""TVKD, teacher value-based knowledge distillation (arXiv 2509.16965): DPO whose implicit reward adds a
potential-based shaping term built from a white-box teacher's soft token values.

  V_T(s) = α · β_T · log Σ_a π_T(a | s)^{1/β_T} = α · β_T · logsumexp_a(log π_T(a | s) / β_T)
  R(y)   = β [log π_θ(y | x) − log π_ref(y | x)] − (1 − γ_s) · Σ_t V_T(s_{t+1})
  L      = −log σ(R(y_w) − R(y_l))

Only the teacher's top-k log-probs are stored per position (k = 50 by default) plus ONE bucket for the
rest of the vocabulary: the bucket enters the logsumexp as a single pseudo-token whose log-prob is
log(1 − Σ_topk π_T), i.e. the remaining mass lumped together. This is exact for β_T = 1 (V = 0 there,
since the probabilities sum to 1) and otherwise approximates Σ_{a ∉ topk} π_T(a)^{1/β_T} by
(Σ_{a ∉ topk} π_T(a))^{1/β_T}, an upper bound for β_T < 1 and a lower bound for β_T > 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlrlcd.objectives.dpo import preference_loss


def rest_logp(teacher_topk_logp: Tensor) -> Tensor:
    """log(1 − Σ_k exp(topk_k)) over the last dim: the log-mass outside the top-k (−inf when none)."""
    lse = torch.logsumexp(teacher_topk_logp, dim=-1).clamp(max=0.0)
    return torch.log(-torch.expm1(lse))


def topk_with_rest(teacher_logits: Tensor, k: int = 50) -> tuple[Tensor, Tensor]:
    """Top-k log-probs [..., T, k] and the rest bucket [..., T] from teacher logits [..., T, V]."""
    logp = torch.log_softmax(teacher_logits.float(), dim=-1)
    top = logp.topk(min(k, logp.shape[-1]), dim=-1).values
    return top, rest_logp(top)


def tvkd_values(teacher_topk_logp: Tensor, rest_logp: Tensor, alpha: float, beta_T: float) -> Tensor:
    """V_T(s) = α·β_T·logsumexp([topk log-probs, rest bucket] / β_T), [..., T, k] + [..., T] -> [..., T].

    Position t must hold the teacher's next-token distribution at the state the shaping sum reads:
    for tvkd_dpo_loss that is s_{t+1} = (x, y_≤t), i.e. the teacher's logits AT response token t
    (the ones predicting y_{t+1}), not the shifted ones that score y_t.
    """
    if beta_T <= 0:
        raise ValueError(f"beta_T must be > 0, got {beta_T}")
    logp = torch.cat([teacher_topk_logp, rest_logp.unsqueeze(-1).to(teacher_topk_logp.dtype)], dim=-1)
    return alpha * beta_T * torch.logsumexp(logp / beta_T, dim=-1)


def tvkd_dpo_loss(chosen_logp: Tensor, rejected_logp: Tensor, ref_chosen_logp: Tensor,
                  ref_rejected_logp: Tensor, chosen_values: Tensor, rejected_values: Tensor,
                  chosen_mask: Tensor, rejected_mask: Tensor, beta: float,
                  gamma_s: float) -> tuple[Tensor, dict[str, float]]:
    """L = mean −log σ(R_w − R_l), R(y) = β[log π_θ(y|x) − log π_ref(y|x)] − (1 − γ_s)·Σ_t V_T(s_{t+1}).

    *_logp: [P] sequence log-probs summed over tokens; *_values: [P, T] from tvkd_values (constants),
    summed over the real tokens given by *_mask [P, T]. γ_s = 1 is plain DPO.
    """
    shape_w = (chosen_values.detach() * chosen_mask.to(chosen_values.dtype)).sum(-1)
    shape_l = (rejected_values.detach() * rejected_mask.to(rejected_values.dtype)).sum(-1)
    dpo_w = beta * (chosen_logp - ref_chosen_logp.detach())
    dpo_l = beta * (rejected_logp - ref_rejected_logp.detach())
    loss, metrics = preference_loss(dpo_w - (1.0 - gamma_s) * shape_w, dpo_l - (1.0 - gamma_s) * shape_l)
    if chosen_logp.numel():
        with torch.no_grad():
            metrics["dpo_reward_margin"] = float((dpo_w - dpo_l).mean())
            metrics["shaping_chosen"] = float(shape_w.mean())
            metrics["shaping_rejected"] = float(shape_l.mean())
    return loss, metrics
