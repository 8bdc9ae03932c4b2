"""self_ppo (`train.self_ppo.*`): PPO-clip on one sample per prompt, reward = the student's own score of it
without the anchor (`train.self_ppo.scorer`, not ranking.scorer), against a running-mean baseline. No teacher
signal at all."""

from __future__ import annotations

import torch

from vlrlcd.errors import VlrlcdError
from vlrlcd.methods.base import LossOut, Method, Passes
from vlrlcd.objectives.ppo import ppo_clip_loss, update_baseline
from vlrlcd.training.rollout import RolloutPlan


class SelfPpo(Method):
    """Advantage A = R − b against the baseline b in ctx.state (the sample's own reward before the first step's
    end); `step_end` updates b with the step's mean reward over every process."""

    sections = ("self_ppo",)

    def plan(self, cfg, rcfg, record, lockstep) -> RolloutPlan:
        return RolloutPlan(1, "plain", rcfg.score_with, cfg.self_ppo.scorer)

    def group_loss(self, student, group, passes: Passes, cfg, ctx) -> LossOut:
        if group.scores is None or len(group.candidates) != 1:
            raise VlrlcdError("self_ppo needs one sample scored without the anchor (see its plan)")
        reward = group.scores.candidates.float()
        old = ctx.state.get("ppo_baseline")
        baseline = float(reward.mean()) if old is None else float(old)
        policy = passes["policy"]
        ref = passes["reference"].logp if cfg.beta != 0 else None
        return ppo_clip_loss(policy.logp, None, policy.mask, reward.to(policy.logp), baseline, cfg.self_ppo.eps,
                             ref, cfg.beta)

    def step_end(self, ctx, cfg, means: dict[str, float]) -> None:
        """b ← m·b + (1 − m)·(the step's mean reward): once per step, from metrics every process agrees on, so
        the baseline is the same on every process and for any split of the batch."""
        if "reward_mean" in means:
            ctx.state["ppo_baseline"] = update_baseline(ctx.state.get("ppo_baseline"),
                                                        torch.tensor([means["reward_mean"]]),
                                                        cfg.self_ppo.baseline_momentum)
