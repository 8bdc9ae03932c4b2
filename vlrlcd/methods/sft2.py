"""sft2, the SFT→SFT baseline: stage II is more SFT on the anchors; nothing is sampled or ranked."""

from __future__ import annotations

from vlrlcd.methods.base import LossOut, Method, Passes, anchored_prefix
from vlrlcd.objectives.sft import sft_loss
from vlrlcd.training.rollout import RolloutPlan


class Sft2(Method):
    reads_ranking = False

    def plan(self, cfg, rcfg, record, lockstep) -> RolloutPlan:
        return RolloutPlan(0, "none", rcfg.score_with)

    def passes(self, cfg) -> tuple[str, ...]:
        return ()

    def group_loss(self, student, group, passes: Passes, cfg, ctx) -> LossOut:
        """Mean token NLL of the anchor in the answer and the scoring format, as in stage I (one batched
        forward, the prompt's image features reused)."""
        target = student.encode_response(group.anchor)
        tl = student.batch_token_logprobs([group.prefix, anchored_prefix(student, group)], [target, target])
        return sft_loss(tl.logp, tl.mask)
