"""LDL-GRPO: match the student's normalised probability over the group to the ranking's D_x."""

from __future__ import annotations

import torch
from torch import Tensor

from vlrlcd.objectives.common import masked_mean, per_token_kl, sequence_scores


def ldl_grpo_loss(token_logp: Tensor, ref_token_logp: Tensor | None, mask: Tensor, target: Tensor,
                  beta: float, length_normalize: bool = True,
                  valid: Tensor | None = None, nll_weight: float = 0.0) -> tuple[Tensor, dict[str, float]]:
    """L = mean_x KL(D_x ‖ q_θ) + β · KL(π_θ ‖ π_ref) + α · mean_x Σ_k D_x(k) · NLL_θ(y_k), q_θ(k) = softmax_k s_θ(y_k | x).

    token_logp, ref_token_logp, mask: [B, K, T]; target D_x: [B, K] (rows sum to 1; a constant).
    s_θ is the mean (length_normalize) or sum of the token log-probs. KL(D‖q) = Σ_k D_k (log D_k − log q_k)
    with 0·log 0 = 0, averaged over the B prompts. KL(π_θ ‖ π_ref) uses the k3 estimator
    exp(ref − logp) − (ref − logp) − 1 on the sampled candidates' tokens, averaged over all real tokens.
    `valid` [B, K] drops candidates from q's softmax (give them D = 0). NLL_θ(y_k) is y_k's mean token negative
    log-likelihood; the α term (`nll_weight`, train.ldl_grpo.nll) is RPO's likelihood term (arXiv 2404.19733)
    on the D_x-weighted candidates: KL(D‖q) sets their probabilities only relative to each other, which it can
    satisfy by lowering all of them (likelihood displacement, arXiv 2410.08847). Gradient flows through
    token_logp only.
    """
    if target.shape != token_logp.shape[:2]:
        raise ValueError(f"target must be [B, K] = {tuple(token_logp.shape[:2])}, got {tuple(target.shape)}")
    target = target.detach().to(token_logp.dtype)
    seq = sequence_scores(token_logp, mask, length_normalize)                 # [B, K]
    scores = seq if valid is None else seq.masked_fill(~valid.bool(), float("-inf"))
    log_q = torch.log_softmax(scores, dim=-1)
    cross = (target * log_q.masked_fill(target == 0, 0.0)).sum(-1)           # Σ D log q
    neg_h = torch.special.xlogy(target, target).sum(-1)                      # Σ D log D
    kl_target = (neg_h - cross).mean()

    token_mask = mask if valid is None else mask * valid.unsqueeze(-1).to(mask.dtype)
    if ref_token_logp is None:
        if beta != 0:
            raise ValueError("ldl_grpo_loss needs ref_token_logp when beta != 0")
        kl_ref = token_logp.new_zeros(())
    else:
        kl_ref = masked_mean(per_token_kl(token_logp, ref_token_logp), token_mask)
    loss = kl_target + beta * kl_ref
    nll = token_logp.new_zeros(())
    if nll_weight != 0:
        mean_nll = -(seq if length_normalize else sequence_scores(token_logp, mask, True))   # [B, K]
        nll = (target * mean_nll.masked_fill(target == 0, 0.0)).sum(-1).mean()
        loss = loss + nll_weight * nll

    with torch.no_grad():
        q = log_q.exp()
        q_entropy = -torch.special.xlogy(q, q).sum(-1).mean()
        finite = torch.isfinite(scores)
        metrics = {
            "loss": float(loss.detach()),
            "kl_target": float(kl_target),
            "kl_ref": float(kl_ref),
            **({"nll": float(nll)} if nll_weight != 0 else {}),
            "q_entropy": float(q_entropy),
            "target_entropy": float(-neg_h.mean()),
            "q_target_argmax_agree": float((q.argmax(-1) == target.argmax(-1)).float().mean()),
            "seq_score_mean": float(scores[finite].mean()) if finite.any() else 0.0,
            "tokens": float(token_mask.sum()),
        }
    return loss, metrics
