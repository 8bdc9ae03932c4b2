"""The DPO family (`train.dpo.*`): single_pair_dpo (the anchor chosen over the one student sample) and
anchor_rank_dpo (the pairs the anchor-conditioned ranking induces); tvkd_dpo builds on the pair helpers.

These read subsets of the candidates (and the anchor), so they run their own policy / reference passes over
just the responses the pairs name, group by group."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlrlcd.adapters.base import StudentAdapter
from vlrlcd.errors import VlrlcdError
from vlrlcd.methods.base import LossOut, Method, Passes, reference_logp, skipped_loss
from vlrlcd.objectives.dpo import dpo_loss
from vlrlcd.ranking.config import RankingConfig
from vlrlcd.ranking.pairs import ANCHOR, preference_pairs
from vlrlcd.training.rollout import Group, RolloutPlan


@dataclass
class PairBatch:
    """Sequence log-probs of the distinct responses the pairs name, and each pair's indices into them."""

    responses: list[list[int]]
    policy: torch.Tensor       # [U] Σ_t log π_θ
    ref: torch.Tensor          # [U] Σ_t log π_sft (constant)
    mask: torch.Tensor         # [U, T]
    chosen: list[int]
    rejected: list[int]


def pair_batch(student: StudentAdapter, group: Group, pairs: list[tuple[int, int, int]]) -> PairBatch:
    """Policy and reference log-probs for only the candidates (and anchor) that `pairs` name."""
    used = sorted({k for _, c, r in pairs for k in (c, r)})
    slot = {k: i for i, k in enumerate(used)}
    anchor_ids = student.encode_response(group.anchor)
    responses = [anchor_ids if k == ANCHOR else group.candidates[k] for k in used]
    policy = student.token_logprobs(group.prefix, responses)
    ref = reference_logp(student, group.prefix, responses)
    return PairBatch(responses, policy.logp.sum(-1), ref.sum(-1), policy.mask,
                     [slot[c] for _, c, _ in pairs], [slot[r] for _, _, r in pairs])


def ranked_pairs(group: Group, rcfg: RankingConfig) -> list[tuple[int, int, int]]:
    if not group.ranked:
        raise VlrlcdError("this objective needs a ranked group: the rollout did not score the candidates")
    return preference_pairs(group.margins[None], rcfg.pairs, rcfg.pair_margin)


def no_pair(student: StudentAdapter, group: Group) -> LossOut:
    """No preference pair in this group (all candidates tie, or the sample is the anchor): zero loss. In
    lockstep (FSDP) the pair passes still run, on the anchor with weight 0, so every process makes the same
    forward and backward calls."""
    loss = skipped_loss(student, lambda: pair_batch(student, group, [(0, ANCHOR, ANCHOR)]).policy.sum())
    return loss, {"loss": 0.0, "reward_accuracy": 0.0, "reward_margin": 0.0, "pairs": 0.0, "tokens": 0.0}


def pair_dpo_loss(pb: PairBatch, beta: float) -> LossOut:
    c, r = pb.chosen, pb.rejected
    loss, m = dpo_loss(pb.policy[c], pb.policy[r], pb.ref[c], pb.ref[r], beta)
    return loss, {**m, "tokens": float(pb.mask.sum())}


class SinglePairDpo(Method):
    """DPO with the anchor chosen and the one student sample rejected (skipped when they are the same)."""

    sections = ("dpo",)

    def plan(self, cfg, rcfg, record, lockstep) -> RolloutPlan:
        return RolloutPlan(1, "none", rcfg.score_with)

    def passes(self, cfg) -> tuple[str, ...]:
        return ()

    def group_loss(self, student, group, passes: Passes, cfg, ctx) -> LossOut:
        anchor_ids = student.encode_response(group.anchor)
        if not group.candidates or student.decode(group.candidates[0]) == student.decode(anchor_ids):
            return no_pair(student, group)
        return pair_dpo_loss(pair_batch(student, group, [(0, ANCHOR, 0)]), cfg.dpo.beta)


class AnchorRankDpo(Method):
    """DPO on the pairs the anchor-conditioned ranking induces (ranking.pairs, ranking.pair_margin)."""

    sections = ("dpo",)

    def passes(self, cfg) -> tuple[str, ...]:
        return ()

    def group_loss(self, student, group, passes: Passes, cfg, ctx) -> LossOut:
        pairs = ranked_pairs(group, ctx.ranking)
        if not pairs:
            return no_pair(student, group)
        return pair_dpo_loss(pair_batch(student, group, pairs), cfg.dpo.beta)
