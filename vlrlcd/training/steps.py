"""Per-objective losses for one rolled-out group: each maps (student, group, cfg, ctx) to (loss, metrics).

The RL loop (rl.py) samples and ranks (rollout.py); these turn a group into a loss through the student's
log-probs and the pure objective functions in vlrlcd/objectives/. The reference policy is always the
frozen SFT adapter switched in on the same weights (`student.reference()`), never a second model.
Every loss returned is attached to the graph (a group with nothing to learn from gives a zero leaf).

The objectives that read all K candidates' log-probs (`group_passes`) take them through
`candidate_logprobs`: the group's slice of the loop's batched passes over many groups (`batched_passes`),
or, called on a group alone, the group's own passes — the same values either way.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from vlrlcd.adapters.base import StudentAdapter, TokenLogprobs
from vlrlcd.errors import VlrlcdError
from vlrlcd.objectives.dpo import dpo_loss
from vlrlcd.objectives.grpo import group_advantages, grpo_loss
from vlrlcd.objectives.ldl_grpo import ldl_grpo_loss
from vlrlcd.objectives.ppo import ppo_clip_loss, update_baseline
from vlrlcd.objectives.rlsd import rlsd_lambda, rlsd_loss
from vlrlcd.objectives.sft import sft_loss
from vlrlcd.objectives.tvkd import topk_with_rest, tvkd_dpo_loss, tvkd_values
from vlrlcd.ranking.config import RankingConfig
from vlrlcd.ranking.pairs import ANCHOR, preference_pairs
from vlrlcd.ranking.scorers import scoring_prompt
from vlrlcd.training.config import TrainConfig
from vlrlcd.training.rollout import Group, distinct_mask, has_verifier

LossOut = tuple[torch.Tensor, dict]   # (loss attached to the graph, metrics)


@dataclass
class StepContext:
    """What a group loss may need beyond the group: the step (schedules), the ranking settings, a teacher
    judge for judge_grpo, `state` that persists across steps (baselines, call counts; checkpointed) and
    `cache`, a per-process memo that is not checkpointed (the tvkd teacher and its token values)."""

    step: int
    total_steps: int
    ranking: RankingConfig
    judge: Callable | None = None
    state: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)
    closers: list[Callable[[], None]] = field(default_factory=list)

    @property
    def teacher_calls(self) -> int:
        """Teacher requests made by this stage (judge_grpo's judgements; retries included)."""
        return int(getattr(self.judge, "calls", 0)) if self.judge is not None else 0

    def call_counts(self) -> dict[str, int]:
        """Stage-II teacher cost: remote judge calls and local (tvkd) teacher forward passes."""
        return {"stage2_teacher_calls": self.teacher_calls,
                "local_teacher_passes": int(self.state.get("tvkd_teacher_passes", 0))}

    def close(self) -> None:
        """Release what `make_context` opened (the anchor store behind the judge)."""
        while self.closers:
            self.closers.pop()()


def make_context(cfg, tcfg: TrainConfig | None = None, run_dir: str | Path | None = None) -> StepContext:
    """The StepContext for `tcfg.objective` (default cfg.train) of root config `cfg`.

    judge_grpo: a CachedJudge over RUN/anchors.sqlite, so each judgement is paid once and stored beside
    the anchors. tvkd_dpo: checks that a teacher is configured (it is loaded at the first step).
    Call `ctx.close()` when the stage ends.
    """
    tcfg = tcfg or cfg.train
    ctx = StepContext(step=0, total_steps=tcfg.rl_steps, ranking=cfg.ranking)
    if tcfg.objective == "judge_grpo":
        from vlrlcd.teacher.runner import STORE_NAME, CachedJudge
        from vlrlcd.teacher.store import AnchorStore

        store = AnchorStore(Path(run_dir or cfg.run_dir) / STORE_NAME)
        ctx.closers.append(store.close)
        ctx.judge = CachedJudge(cfg.teacher, store)
    if tcfg.objective == "tvkd_dpo":
        tcfg.require_tvkd_teacher()
    return ctx


# ------------------------------------------------------------------ helpers
def _skipped_loss(student: StudentAdapter, passes: Callable[[], torch.Tensor]) -> torch.Tensor:
    """A zero loss that backward() accepts, for a group that gives nothing to learn from: a leaf, or in lockstep
    (FSDP / ZeRO-3) 0 · the loss `passes()` computes, so every process still makes the same forwards and backward."""
    if student.lockstep is not None:
        return 0.0 * passes()
    return torch.zeros((), device=student.device, requires_grad=True)


def _reference_logp(student: StudentAdapter, prefix, responses: list[list[int]]) -> torch.Tensor:
    """Token log-probs [K, T] under the frozen SFT adapter (no gradient)."""
    with _pass_context(student, "reference"):
        return student.token_logprobs(prefix, responses).logp


@contextlib.contextmanager
def _pass_context(student: StudentAdapter, kind: str):
    """The adapter and grad mode of a pass over candidates: "policy" as is (grad when enabled), "reference"
    under the frozen SFT adapter and "privileged" (the policy with the anchor in context) without grad."""
    if kind not in ("policy", "reference", "privileged"):
        raise ValueError(f"unknown pass '{kind}'")
    if kind == "policy":
        yield
        return
    with torch.no_grad(), (student.reference() if kind == "reference" else contextlib.nullcontext()):
        yield


def _pass_prefix(student: StudentAdapter, group: Group, kind: str):
    """The prefix a pass reads: the prompt's, or for rlsd's "privileged" pass the scoring prompt (the anchor in
    context) with the prompt's image features reused."""
    if kind != "privileged":
        return group.prefix
    return student.prefix(scoring_prompt(group.record.prompt, group.anchor), group.record.image,
                          features=group.prefix.image_features)


def candidate_logprobs(student: StudentAdapter, group: Group, kind: str) -> TokenLogprobs:
    """Token log-probs of the group's K candidates for pass `kind` (`_pass_context`): the group's slice of the
    loop's batched pass (`batched_passes`) when there is one, else the pass run for this group alone."""
    done = group.passes.get(kind)
    if done is not None:
        return done
    with _pass_context(student, kind):
        return student.token_logprobs(_pass_prefix(student, group, kind), group.candidates)


def group_passes(cfg: TrainConfig) -> tuple[str, ...]:
    """The passes over all K candidates that `cfg.objective`'s group loss reads (in the order it runs them),
    which the loop batches across groups; () for the objectives that score subsets (DPO family, sft2)."""
    ref = ("reference",) if cfg.beta != 0 else ()
    if cfg.objective in ("ldl_grpo", "anchor_grpo", "judge_grpo", "self_ppo"):
        return ("policy",) + ref
    if cfg.objective == "rlsd":
        return ("policy", "privileged") + ref
    return ()


def batched_passes(student: StudentAdapter, groups: list[Group], cfg: TrainConfig) -> None:
    """Fill each group's `passes` with its slice of ONE `token_logprobs_batch` per pass kind over all `groups`
    (two forwards each instead of two per group): policy with gradient (when grad is on), the reference under
    the SFT adapter and rlsd's privileged context without. The group losses read them through
    `candidate_logprobs` and give the same values as their own per-group passes (up to ~1e-6)."""
    for kind in group_passes(cfg) if groups else ():
        with _pass_context(student, kind):
            tls = student.token_logprobs_batch([_pass_prefix(student, g, kind) for g in groups],
                                               [g.candidates for g in groups])
        for g, tl in zip(groups, tls):
            g.passes[kind] = tl


def _with_reward_stats(metrics: dict, rewards: torch.Tensor) -> dict:
    rewards = rewards.float()
    return {**metrics, "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0}


def _grpo(student: StudentAdapter, group: Group, rewards: torch.Tensor, cfg: TrainConfig) -> LossOut:
    """GRPO on the group's K candidates with group-normalised advantages of `rewards` [K]."""
    policy = candidate_logprobs(student, group, "policy")
    ref = candidate_logprobs(student, group, "reference").logp[None] if cfg.beta != 0 else None
    adv = group_advantages(rewards.to(policy.logp)[None], cfg.scale_rewards)
    loss, m = grpo_loss(policy.logp[None], None, ref, policy.mask[None], adv, cfg.beta, cfg.eps_low, cfg.eps_high,
                        cfg.grpo_loss_type)
    return loss, _with_reward_stats(m, rewards)


@dataclass
class PairBatch:
    """Sequence log-probs of the distinct responses the pairs name, and each pair's indices into them."""

    responses: list[list[int]]
    policy: torch.Tensor       # [U] Σ_t log π_θ
    ref: torch.Tensor          # [U] Σ_t log π_sft (constant)
    mask: torch.Tensor         # [U, T]
    chosen: list[int]
    rejected: list[int]


def _pair_batch(student: StudentAdapter, group: Group, pairs: list[tuple[int, int, int]]) -> PairBatch:
    """Policy and reference log-probs for only the candidates (and anchor) that `pairs` name."""
    used = sorted({k for _, c, r in pairs for k in (c, r)})
    slot = {k: i for i, k in enumerate(used)}
    anchor_ids = student.encode_response(group.anchor)
    responses = [anchor_ids if k == ANCHOR else group.candidates[k] for k in used]
    policy = student.token_logprobs(group.prefix, responses)
    ref = _reference_logp(student, group.prefix, responses)
    return PairBatch(responses, policy.logp.sum(-1), ref.sum(-1), policy.mask,
                     [slot[c] for _, c, _ in pairs], [slot[r] for _, _, r in pairs])


def _ranked_pairs(group: Group, rcfg: RankingConfig) -> list[tuple[int, int, int]]:
    if not group.ranked:
        raise VlrlcdError("this objective needs a ranked group: the rollout did not score the candidates")
    return preference_pairs(group.margins[None], rcfg.pairs, rcfg.pair_margin)


def _no_pair(student: StudentAdapter, group: Group) -> LossOut:
    """No preference pair in this group (all candidates tie, or the sample is the anchor): zero loss. In
    lockstep (FSDP) the pair passes still run, on the anchor with weight 0, so every process makes the same
    forward and backward calls."""
    loss = _skipped_loss(student, lambda: _pair_batch(student, group, [(0, ANCHOR, ANCHOR)]).policy.sum())
    return loss, {"loss": 0.0, "reward_accuracy": 0.0, "reward_margin": 0.0, "pairs": 0.0,
                                 "tokens": 0.0}


# ------------------------------------------------------------------ objectives
def ldl_grpo_group_loss(student: StudentAdapter, group: Group, cfg: TrainConfig, ctx: StepContext) -> LossOut:
    """KL(D_x ‖ q_θ) + β·KL(π_θ ‖ π_sft) for one group; the reference is an adapter switch."""
    policy = candidate_logprobs(student, group, "policy")
    ref = candidate_logprobs(student, group, "reference").logp[None] if cfg.beta != 0 else None
    valid = distinct_mask(group.candidates).to(policy.logp.device)[None] if ctx.ranking.distinct else None
    return ldl_grpo_loss(policy.logp[None], ref, policy.mask[None], group.target[None].to(policy.logp), cfg.beta,
                         cfg.length_normalize, valid)


def sft2_group_loss(student: StudentAdapter, group: Group, cfg: TrainConfig, ctx: StepContext) -> LossOut:
    """SFT→SFT: stage II is more SFT on the anchor, in the answer and the scoring format as in stage I
    (mean token NLL; one batched forward, the prompt's image features reused)."""
    target = student.encode_response(group.anchor)
    scoring = student.prefix(scoring_prompt(group.record.prompt, group.anchor), group.record.image,
                             features=group.prefix.image_features)
    tl = student.batch_token_logprobs([group.prefix, scoring], [target, target])
    return sft_loss(tl.logp, tl.mask)


def single_pair_dpo_group_loss(student: StudentAdapter, group: Group, cfg: TrainConfig, ctx: StepContext) -> LossOut:
    """DPO with the anchor chosen and the one student sample rejected (skipped when they are the same)."""
    anchor_ids = student.encode_response(group.anchor)
    if not group.candidates or student.decode(group.candidates[0]) == student.decode(anchor_ids):
        return _no_pair(student, group)
    pb = _pair_batch(student, group, [(0, ANCHOR, 0)])
    loss, m = dpo_loss(pb.policy[pb.chosen], pb.policy[pb.rejected], pb.ref[pb.chosen], pb.ref[pb.rejected],
                       cfg.dpo_beta)
    return loss, {**m, "tokens": float(pb.mask.sum())}


def anchor_rank_dpo_group_loss(student: StudentAdapter, group: Group, cfg: TrainConfig, ctx: StepContext) -> LossOut:
    """DPO on the pairs the anchor-conditioned ranking induces (ranking.pairs, ranking.pair_margin)."""
    pairs = _ranked_pairs(group, ctx.ranking)
    if not pairs:
        return _no_pair(student, group)
    pb = _pair_batch(student, group, pairs)
    loss, m = dpo_loss(pb.policy[pb.chosen], pb.policy[pb.rejected], pb.ref[pb.chosen], pb.ref[pb.rejected],
                       cfg.dpo_beta)
    return loss, {**m, "tokens": float(pb.mask.sum())}


def anchor_grpo_group_loss(student: StudentAdapter, group: Group, cfg: TrainConfig, ctx: StepContext) -> LossOut:
    """GRPO with reward r_k = the frozen SFT model's anchor-conditioned margin (rollout scores under
    the reference adapter for this objective), group-normalised advantages."""
    if not group.ranked:
        raise VlrlcdError("anchor_grpo needs a ranked group: the rollout did not score the candidates")
    return _grpo(student, group, group.margins, cfg)


def judge_rewards(group: Group, ctx: StepContext) -> torch.Tensor | None:
    """The teacher's judgement in [0, 1] of each candidate against the anchor, through ctx.judge (stored,
    never paid twice), up to teacher.concurrency requests at a time; None when a judgement failed after
    its retries (the group is then skipped)."""
    from concurrent.futures import ThreadPoolExecutor

    from vlrlcd.teacher.base import TeacherCallError

    if ctx.judge is None:
        raise VlrlcdError("judge_grpo needs the teacher judge: the loop must build its StepContext with "
                          "vlrlcd.training.steps.make_context(cfg)")
    texts = list(dict.fromkeys(group.texts))   # a repeated candidate is asked about once
    workers = max(1, min(len(texts), int(getattr(getattr(ctx.judge, "cfg", None), "concurrency", 1))))
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


def judge_grpo_group_loss(student: StudentAdapter, group: Group, cfg: TrainConfig, ctx: StepContext) -> LossOut:
    """GRPO with reward = the teacher judging each of the K candidates (N·K calls over N prompts, stored)."""
    rewards = judge_rewards(group, ctx)
    if rewards is None:  # skipped (in lockstep its passes still run, with weight 0)
        loss = _skipped_loss(student, lambda: _grpo(student, group, torch.zeros(len(group.candidates)), cfg)[0])
        return loss, {"loss": 0.0, "judge_failed": 1.0, "tokens": 0.0}
    return _grpo(student, group, rewards, cfg)


def self_ppo_group_loss(student: StudentAdapter, group: Group, cfg: TrainConfig, ctx: StepContext) -> LossOut:
    """PPO-clip on one sample, reward = the student's own score of it without the anchor, advantage
    A = R − b against the running baseline b in ctx.state (the sample's own reward before the first step's
    end; STEP_END updates b with the step's mean reward over every process). No teacher signal."""
    if group.scores is None or len(group.candidates) != 1:
        raise VlrlcdError("self_ppo needs one sample scored without the anchor (see rollout_plan)")
    reward = group.scores.candidates.float()
    old = ctx.state.get("ppo_baseline")
    baseline = float(reward.mean()) if old is None else float(old)
    policy = candidate_logprobs(student, group, "policy")
    ref = candidate_logprobs(student, group, "reference").logp if cfg.beta != 0 else None
    loss, m = ppo_clip_loss(policy.logp, None, policy.mask, reward.to(policy.logp), baseline, cfg.ppo_eps, ref, cfg.beta)
    return loss, m


def self_ppo_step_end(ctx: StepContext, cfg: TrainConfig, means: dict[str, float]) -> None:
    """b ← m·b + (1 − m)·(the step's mean reward): once per step, from metrics every process agrees on, so
    the baseline is the same on every process and for any split of the batch."""
    if "reward_mean" in means:
        ctx.state["ppo_baseline"] = update_baseline(ctx.state.get("ppo_baseline"),
                                                    torch.tensor([means["reward_mean"]]), cfg.ppo_baseline_momentum)


def rlsd_rewards(group: Group) -> torch.Tensor:
    """The verifier's score (score_record: exact match / choice / caption attributes) when the record
    can be checked, else the ranking margin r_k."""
    if has_verifier(group.record):
        from vlrlcd.evaluation.metrics import score_record

        return torch.tensor([score_record(group.record, t) for t in group.texts])
    if not group.ranked:
        raise VlrlcdError(f"rlsd: record '{group.record.id}' has no reference and its candidates were not ranked")
    return group.margins.float()


def rlsd_group_loss(student: StudentAdapter, group: Group, cfg: TrainConfig, ctx: StepContext) -> LossOut:
    """RLSD (arXiv 2604.03128): group advantages from the reward set the direction; per-token magnitude
    w_t from Δ_t = log p(y_t | x, anchor in context) − log p(y_t | x) (the same student, no gradient);
    λ decays linearly from rlsd_lambda0 to 0 over rlsd_decay_steps (default: the whole stage)."""
    rewards = rlsd_rewards(group)
    policy = candidate_logprobs(student, group, "policy")
    priv = candidate_logprobs(student, group, "privileged").logp
    ref = candidate_logprobs(student, group, "reference").logp[None] if cfg.beta != 0 else None
    decay = ctx.total_steps if cfg.rlsd_decay_steps is None else cfg.rlsd_decay_steps
    lam = rlsd_lambda(ctx.step, cfg.rlsd_lambda0, decay)
    adv = group_advantages(rewards.to(policy.logp)[None], cfg.scale_rewards)
    loss, m = rlsd_loss(policy.logp[None], None, ref, policy.mask[None], adv, priv[None], None, lam, cfg.rlsd_eps_w,
                        cfg.beta, cfg.eps_low, cfg.eps_high, cfg.grpo_loss_type)
    return loss, _with_reward_stats(m, rewards)


# ------------------------------------------------------------------ tvkd
def load_tvkd_teacher(cfg: TrainConfig, student: StudentAdapter) -> StudentAdapter:
    """The white-box teacher (frozen, no adapter) behind the StudentAdapter interface; its tokenizer must
    be the student's (same vocabulary), since its values are read at the student's response tokens."""
    from vlrlcd.adapters.config import StudentConfig
    from vlrlcd.adapters.loader import load_base

    path = cfg.require_tvkd_teacher()
    dtype = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(
        student.model.get_output_embeddings().weight.dtype, "float32")
    model, processor, tokenizer, family = load_base(
        StudentConfig(name_or_path=path, quantization=cfg.tvkd_teacher_quantization, compute_dtype=dtype))
    if tokenizer.get_vocab() != student.tokenizer.get_vocab():
        raise VlrlcdError(
            f"train.tvkd_teacher {path}: its tokenizer differs from the student's ({len(tokenizer)} vs "
            f"{len(student.tokenizer)} tokens or different ids); TVKD reads the teacher's values at the "
            "student's tokens, so use a teacher of the same model family / tokenizer"
        )
    if student.is_vision and not family.vision:
        raise VlrlcdError(f"train.tvkd_teacher {path} is a text-only model but the student sees images; "
                          "use a vision-language teacher of the student's family")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return StudentAdapter(model, processor, tokenizer, family, path)


@torch.no_grad()
def teacher_token_values(teacher: StudentAdapter, group: Group, responses: list[list[int]],
                         cfg: TrainConfig) -> list[torch.Tensor]:
    """V_T(s_{t+1}) at each response token (the teacher's top-k next-token log-probs after y_≤t, plus
    the rest bucket), one forward of the teacher over all responses on its shared prefix."""
    prefix = teacher.prefix(group.record.prompt, group.record.image)
    logits, _ = teacher.continuation_logits(prefix, responses)   # right positions for every family (Qwen mrope)
    top, rest = topk_with_rest(logits, cfg.tvkd_topk)
    values = tvkd_values(top, rest, cfg.tvkd_alpha, cfg.tvkd_beta_t).float().cpu()
    return [values[i, : len(r)] for i, r in enumerate(responses)]


def cached_token_values(student: StudentAdapter, group: Group, responses: list[list[int]], cfg: TrainConfig,
                        ctx: StepContext) -> list[torch.Tensor]:
    """Teacher values per response, computed once per (prompt, response) and kept in ctx.cache."""
    if ctx.cache.get("tvkd_teacher_path") != cfg.tvkd_teacher:
        ctx.cache["tvkd_teacher"] = load_tvkd_teacher(cfg, student)
        ctx.cache["tvkd_teacher_path"] = cfg.tvkd_teacher
        ctx.cache["tvkd_values"] = {}
    memo: dict = ctx.cache["tvkd_values"]
    keys = [(group.record.id, group.record.prompt, tuple(r)) for r in responses]
    todo = [i for i, k in enumerate(keys) if k not in memo]
    if todo:
        values = teacher_token_values(ctx.cache["tvkd_teacher"], group, [responses[i] for i in todo], cfg)
        for i, v in zip(todo, values):
            memo[keys[i]] = v
        ctx.state["tvkd_teacher_passes"] = ctx.state.get("tvkd_teacher_passes", 0) + 1
        ctx.state["tvkd_values_computed"] = ctx.state.get("tvkd_values_computed", 0) + len(todo)
    return [memo[k] for k in keys]


def tvkd_dpo_group_loss(student: StudentAdapter, group: Group, cfg: TrainConfig, ctx: StepContext) -> LossOut:
    """TVKD (arXiv 2509.16965): DPO on the ranking's pairs whose rewards subtract (1 − γ_s)·Σ_t V_T(s_{t+1})
    from a white-box teacher's token values (computed once per response, kept in ctx.cache)."""
    cfg.require_tvkd_teacher()
    pairs = _ranked_pairs(group, ctx.ranking)
    if not pairs:
        return _no_pair(student, group)
    pb = _pair_batch(student, group, pairs)
    values = cached_token_values(student, group, pb.responses, cfg, ctx)
    V = torch.zeros_like(pb.mask)
    for i, v in enumerate(values):
        V[i, : len(v)] = v.to(V)
    c, r = pb.chosen, pb.rejected
    loss, m = tvkd_dpo_loss(pb.policy[c], pb.policy[r], pb.ref[c], pb.ref[r], V[c], V[r], pb.mask[c], pb.mask[r],
                            cfg.dpo_beta, cfg.tvkd_gamma_s)
    return loss, {**m, "tokens": float(pb.mask.sum())}


# per objective, what the loop runs after each step with the step's metrics averaged over every group
STEP_END: dict[str, Callable[[StepContext, TrainConfig, dict], None]] = {"self_ppo": self_ppo_step_end}

GROUP_LOSSES: dict[str, Callable] = {
    "ldl_grpo": ldl_grpo_group_loss,
    "sft2": sft2_group_loss,
    "single_pair_dpo": single_pair_dpo_group_loss,
    "anchor_rank_dpo": anchor_rank_dpo_group_loss,
    "anchor_grpo": anchor_grpo_group_loss,
    "self_ppo": self_ppo_group_loss,
    "judge_grpo": judge_grpo_group_loss,
    "tvkd_dpo": tvkd_dpo_group_loss,
    "rlsd": rlsd_group_loss,
}
