"""ldl_grpo, the main method: KL(D_x ‖ q_θ) + β·KL(π_θ ‖ π_sft) on K candidates ranked against the anchor."""

from __future__ import annotations

from vlrlcd.methods.base import LossOut, Method, Passes, reference_or_none
from vlrlcd.objectives.ldl_grpo import ldl_grpo_loss
from vlrlcd.training.rollout import distinct_mask


class LdlGrpo(Method):
    """Listwise: q_θ = softmax_k(s_θ(y_k | x)) matched to the target D_x (DESIGN.md); the reference is an
    adapter switch. With ranking.distinct, repeats of a candidate are left out of both distributions;
    train.ldl_grpo.nll adds the D_x-weighted likelihood term; train.ldl_grpo.form=reverse matches
    π_θ to D_x in the other direction, on the samples (objectives/ldl_grpo.py)."""

    sections = ("ldl_grpo",)

    def group_loss(self, student, group, passes: Passes, cfg, ctx) -> LossOut:
        policy = passes["policy"]
        valid = distinct_mask(group.candidates).to(policy.logp.device)[None] if ctx.ranking.distinct else None
        return ldl_grpo_loss(policy.logp[None], reference_or_none(passes, cfg), policy.mask[None],
                             group.target[None].to(policy.logp), cfg.beta, cfg.length_normalize, valid,
                             cfg.ldl_grpo.nll, cfg.ldl_grpo.form,
                             cfg.ldl_grpo.entropy)
