"""LDL-GRPO: match the student's normalised probability over the group to the ranking's D_x."""

from __future__ import annotations

import torch
from torch import Tensor

from vlrlcd.objectives.common import masked_mean, masked_sum, per_token_kl, sequence_scores

LDL_FORMS = ("forward", "reverse")   # train.ldl_grpo.form
LOG_D_FLOOR = -69.0                  # log D_x below this (D < 1e-30, float32 underflow) counts as this


def ldl_grpo_loss(token_logp: Tensor, ref_token_logp: Tensor | None, mask: Tensor, target: Tensor,
                  beta: float, length_normalize: bool = True,
                  valid: Tensor | None = None, nll_weight: float = 0.0,
                  form: str = "forward", entropy: float = 0.0) -> tuple[Tensor, dict[str, float]]:
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

    form="reverse" replaces KL(D_x ‖ q_θ) by the match in the other direction, H(π_θ, D_x) − η·H(π_θ) over
    answers (η = `entropy`), estimated on the K samples drawn from π_θ (`reverse_kl_surrogate`); `loss`'s first
    term is then that estimator's surrogate and `kl_target` still reports the forward KL (a diagnostic
    comparable across forms).
    """
    if form not in LDL_FORMS:
        raise ValueError(f"form must be one of {', '.join(LDL_FORMS)}, got '{form}'")
    if target.shape != token_logp.shape[:2]:
        raise ValueError(f"target must be [B, K] = {tuple(token_logp.shape[:2])}, got {tuple(target.shape)}")
    target = target.detach().to(token_logp.dtype)
    seq = sequence_scores(token_logp, mask, length_normalize)                 # [B, K]
    scores = seq if valid is None else seq.masked_fill(~valid.bool(), float("-inf"))
    log_q = torch.log_softmax(scores, dim=-1)
    cross = (target * log_q.masked_fill(target == 0, 0.0)).sum(-1)           # Σ D log q
    neg_h = torch.special.xlogy(target, target).sum(-1)                      # Σ D log D
    kl_target = (neg_h - cross).mean()
    reverse = reverse_kl_surrogate(token_logp, mask, target, seq, valid, entropy) if form == "reverse" else None

    token_mask = mask if valid is None else mask * valid.unsqueeze(-1).to(mask.dtype)
    if ref_token_logp is None:
        if beta != 0:
            raise ValueError("ldl_grpo_loss needs ref_token_logp when beta != 0")
        kl_ref = token_logp.new_zeros(())
    else:
        kl_ref = masked_mean(per_token_kl(token_logp, ref_token_logp), token_mask)
    loss = (kl_target if reverse is None else reverse[0]) + beta * kl_ref
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
            **({"reverse_adv_abs": reverse[1]} if reverse is not None else {}),
            "q_entropy": float(q_entropy),
            "target_entropy": float(-neg_h.mean()),
            "q_target_argmax_agree": float((q.argmax(-1) == target.argmax(-1)).float().mean()),
            "seq_score_mean": float(scores[finite].mean()) if finite.any() else 0.0,
            "tokens": float(token_mask.sum()),
        }
    return loss, metrics


def reverse_kl_surrogate(token_logp: Tensor, mask: Tensor, target: Tensor, seq: Tensor,
                         valid: Tensor | None = None, entropy: float = 0.0) -> tuple[Tensor, float]:
    """Surrogate whose gradient is the K-sample estimate of ∇ [H(π_θ, D_x) − η·H(π_θ)] over answers, and mean |A_k|.

    D_x(k) ∝ σ(γ r_k)·exp(r_k / τ) read as an unnormalised target P over answers (a constant per group cancels).
    With y_k ~ π_θ, ∇ E_π[η log π_θ(y) − log P(y)] = E[(η log π_θ(y) − log P(y)) ∇ log π_θ(y)]
    ≈ (1/K) Σ_k A_k ∇ s_θ(y_k), A_k = c_k − mean_j c_j, c_k = η log π_θ(y_k) − log D_x(k) (a constant: no
    gradient), log π_θ the sequence's summed token log-prob and s_θ the score q_θ uses (mean or sum, `seq`):
    policy gradient with reward log D_x = log σ(γ r) + r/τ and the group's mean as baseline. η = 1 is
    KL(π_θ ‖ D_x), η = 0 (`entropy`, the default) the cross-entropy alone. Repeats of an answer are samples, each
    counted once: a wrong answer sampled once gets the full push, however rare (the forward KL over the multiset
    pushes it by q_k − D_k, small when it is rare). Every term is 0 when all samples have the same c.
    A loss of Σ_k A_k s_k / K per prompt, averaged over prompts; `valid` [B, K] leaves candidates out.
    """
    keep = torch.ones_like(target, dtype=torch.bool) if valid is None else valid.bool()
    with torch.no_grad():
        c = -torch.log(target).clamp(min=LOG_D_FLOOR)
        if entropy != 0:
            c = c + entropy * masked_sum(token_logp, mask, dim=-1)
        c = c.masked_fill(~keep, 0.0)
        n = keep.sum(-1, keepdim=True).clamp(min=1)
        adv = (c - c.sum(-1, keepdim=True) / n).masked_fill(~keep, 0.0)
    surrogate = ((adv * seq.masked_fill(~keep, 0.0)).sum(-1) / n.squeeze(-1)).mean()
    adv_abs = float((adv.abs().sum(-1) / n.squeeze(-1)).mean())
    return surrogate, adv_abs
