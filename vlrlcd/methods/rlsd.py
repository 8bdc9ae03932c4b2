"""rlsd (arXiv 2604.03128; `train.rlsd.*`, plus the GRPO family's `train.grpo.*`): group advantages from a
reward set the direction; the per-token magnitude w_t comes from Δ_t = log p(y_t | x, anchor in context) −
log p(y_t | x) (the same student, no gradient: the "privileged" pass)."""

from __future__ import annotations

import torch

from vlrlcd.datasets.records import Record
from vlrlcd.errors import VlrlcdError
from vlrlcd.methods.base import LossOut, Method, Passes, reference_or_none, with_reward_stats
from vlrlcd.objectives.grpo import group_advantages
from vlrlcd.objectives.rlsd import rlsd_lambda, rlsd_loss
from vlrlcd.training.rollout import Group, RolloutPlan


def has_verifier(record: Record) -> bool:
    """Whether `score_record` can check an answer to this record (reference, choices or caption objects)."""
    from vlrlcd.evaluation.metrics import resolve_metric

    try:
        resolve_metric(record)
    except VlrlcdError:
        return False
    return True


def rlsd_rewards(group: Group) -> torch.Tensor:
    """The verifier's score (score_record: exact match / choice / caption attributes) when the record
    can be checked, else the ranking margin r_k."""
    if has_verifier(group.record):
        from vlrlcd.evaluation.metrics import score_record

        return torch.tensor([score_record(group.record, t) for t in group.texts])
    if not group.ranked:
        raise VlrlcdError(f"rlsd: record '{group.record.id}' has no reference and its candidates were not ranked")
    return group.margins.float()


class Rlsd(Method):
    sections = ("grpo", "rlsd")

    def plan(self, cfg, rcfg, record, lockstep) -> RolloutPlan:
        """No self-scoring on a record with a verifier; in lockstep (FSDP) the plan must not depend on the record,
        so every group is ranked (the reward still prefers the verifier)."""
        return RolloutPlan(cfg.k, "none" if has_verifier(record) and not lockstep else "anchor", rcfg.score_with)

    def passes(self, cfg) -> tuple[str, ...]:
        return ("policy", "privileged") + (("reference",) if cfg.beta != 0 else ())

    def group_loss(self, student, group, passes: Passes, cfg, ctx) -> LossOut:
        """λ decays linearly from rlsd.lambda0 to 0 over rlsd.decay_steps (default: the whole stage)."""
        rewards = rlsd_rewards(group)
        policy, priv, r, g = passes["policy"], passes["privileged"].logp, cfg.rlsd, cfg.grpo
        lam = rlsd_lambda(ctx.step, r.lambda0, ctx.total_steps if r.decay_steps is None else r.decay_steps)
        adv = group_advantages(rewards.to(policy.logp)[None], g.scale_rewards)
        loss, m = rlsd_loss(policy.logp[None], None, reference_or_none(passes, cfg), policy.mask[None], adv, priv[None],
                            None, lam, r.eps_w, cfg.beta, g.eps_low, g.eps_high, g.loss_type)
        return loss, with_reward_stats(m, rewards)
