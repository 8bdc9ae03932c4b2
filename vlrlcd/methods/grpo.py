"""The GRPO family (`train.grpo.*`): group-normalised advantages of a reward, PPO-style clipping, the token
aggregation TRL names `loss_type`. anchor_grpo: reward = the frozen SFT model's anchor-conditioned margin;
judge_grpo: reward = the teacher judging each of the K candidates (N·K stored calls). rlsd builds on it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from vlrlcd.errors import VlrlcdError
from vlrlcd.methods.base import LossOut, Method, Passes, reference_or_none, skipped_loss, with_reward_stats
from vlrlcd.objectives.grpo import group_advantages, grpo_loss
from vlrlcd.training.rollout import Group, RolloutPlan


def grpo_group_loss(passes: Passes, rewards: torch.Tensor, cfg) -> LossOut:
    """GRPO on the group's K candidates with group-normalised advantages of `rewards` [K]."""
    policy, g = passes["policy"], cfg.grpo
    adv = group_advantages(rewards.to(policy.logp)[None], g.scale_rewards)
    loss, m = grpo_loss(policy.logp[None], None, reference_or_none(passes, cfg), policy.mask[None], adv, cfg.beta,
                        g.eps_low, g.eps_high, g.loss_type)
    return loss, with_reward_stats(m, rewards)


class AnchorGrpo(Method):
    """GRPO with reward r_k = the frozen SFT model's anchor-conditioned margin (the rollout scores under the
    reference adapter for this method, whatever ranking.score_with says)."""

    sections = ("grpo",)

    def plan(self, cfg, rcfg, record, lockstep) -> RolloutPlan:
        return RolloutPlan(cfg.k, "anchor", "sft")

    def group_loss(self, student, group, passes: Passes, cfg, ctx) -> LossOut:
        if not group.ranked:
            raise VlrlcdError("anchor_grpo needs a ranked group: the rollout did not score the candidates")
        return grpo_group_loss(passes, group.margins, cfg)


def judge_rewards(group: Group, ctx) -> torch.Tensor | None:
    """The teacher's judgement in [0, 1] of each candidate against the anchor, through ctx.judge (stored,
    never paid twice), up to teacher.concurrency requests at a time; None when a judgement failed after
    its retries (the group is then skipped)."""
    from vlrlcd.teacher.base import TeacherCallError

    if ctx.judge is None:
        raise VlrlcdError("judge_grpo needs the teacher judge: the loop must build its StepContext with "
                          "vlrlcd.training.steps.make_context(cfg)")
    texts = list(dict.fromkeys(group.texts))   # a repeated candidate is asked about once
    workers = max(1, min(len(texts), int(getattr(getattr(ctx.judge, "cfg", None), "concurrency", 1))))  # any callable
    ask = lambda text: float(ctx.judge(group.record, text, group.anchor))  # noqa: E731
    try:
        if workers == 1:
            scores = [ask(t) for t in texts]
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="judge") as pool:
                scores = list(pool.map(ask, texts))
    except TeacherCallError as e:
        if e.fatal or e.kind == "budget":
            raise VlrlcdError(f"judge_grpo: the teacher judge stopped ({e}); raise teacher.max_calls or "
                              "fix the endpoint, then run again (stored judgements are reused)") from None
        ctx.state["judge_failures"] = ctx.state.get("judge_failures", 0) + 1
        return None
    by_text = dict(zip(texts, scores))
    return torch.tensor([by_text[t] for t in group.texts])


class JudgeGrpo(Method):
    """GRPO with reward = the teacher judging each of the K candidates (N·K calls over N prompts, stored)."""

    sections = ("grpo",)
    reads_teacher = True

    def plan(self, cfg, rcfg, record, lockstep) -> RolloutPlan:
        return RolloutPlan(cfg.k, "none", rcfg.score_with)

    def setup(self, ctx, cfg, tcfg, run_dir) -> None:
        """A CachedJudge over RUN/anchors.sqlite: each judgement is paid once and stored beside the anchors."""
        from vlrlcd.teacher.runner import STORE_NAME, CachedJudge
        from vlrlcd.teacher.store import AnchorStore

        store = AnchorStore(Path(run_dir or cfg.run_dir) / STORE_NAME)
        ctx.closers.append(store.close)
        ctx.judge = CachedJudge(cfg.teacher, store)

    def group_loss(self, student, group, passes: Passes, cfg, ctx) -> LossOut:
        rewards = judge_rewards(group, ctx)
        if rewards is None:  # skipped (in lockstep its passes still run, with weight 0)
            loss = skipped_loss(student, lambda: grpo_group_loss(passes, torch.zeros(len(group.candidates)), cfg)[0])
            return loss, {"loss": 0.0, "judge_failed": 1.0, "tokens": 0.0}
        return grpo_group_loss(passes, rewards, cfg)
