"""Stage II: local RL. Each step: sample K candidates for every prompt of the batch (one batched decode),
rank the groups against their stored anchors with the student's own judgement (one batched scoring pass),
and step on the objective: the policy and reference log-probs of all groups in one batched pass each, every
group's loss from its slice, one backward over their sum (`losses_and_backward`). The teacher is never
called from here.

Per prompt and step the image goes through the vision tower once: the features are shared by the
sampling prefix, the scoring prefix, and the policy and reference log-prob passes.

Several processes (distributed.py): each takes the prompts i ≡ rank (mod world) of the step's global
batch; sampling RNGs are fixed by (seed, step, global index), so the candidates — and, up to float
summation order, the step — are those of a single process running the whole batch. Checkpoints,
resume, Ctrl-C, non-finite steps and logging: session.py.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
import torch

from vlrlcd.adapters.base import StudentAdapter
from vlrlcd.datasets.records import Record
from vlrlcd.errors import VlrlcdError
from vlrlcd.ranking.config import RankingConfig
from vlrlcd.ranking.core import entropy
from vlrlcd.training.common import (activation_checkpointing, digest, finish_step, make_optimizer,
                                   seed_everything)
from vlrlcd.training.config import TrainConfig
from vlrlcd.training.diagnostics import group_diagnostics
from vlrlcd.training.distributed import Dist, single_process
from vlrlcd.training.rollout import rollout_batch, sample_generator
from vlrlcd.training.session import Session
from vlrlcd.training.steps import GROUP_LOSSES, STEP_END, StepContext, batched_passes, group_passes


def rl_order(pool: list[Record], steps: int, batch_size: int, seed: int) -> list[Record]:
    """The prompts of every step, back to back: reshuffled epochs of `pool` (a function of the seed only)."""
    rng = random.Random(seed)
    order: list[Record] = []
    while len(order) < steps * batch_size:
        epoch = list(pool)
        rng.shuffle(epoch)
        order.extend(epoch)
    return order


def train_rl(student: StudentAdapter, records: list[Record], anchors: dict[str, str], cfg: TrainConfig,
             rcfg: RankingConfig, max_new_tokens: int, out_dir: str | Path, seed: int = 0,
             teacher_calls: int = 0, progress: bool = True, resume: bool = False, dist: Dist | None = None,
             ctx: StepContext | None = None) -> list[dict]:
    """Run `cfg.rl_steps` steps of `cfg.objective` on the records that have an anchor.

    Writes OUT/metrics.jsonl (one line per step), OUT/rollouts.jsonl (every group), OUT/checkpoints/ and
    OUT/tb/; with `resume`, continues after the newest checkpoint in OUT. `ctx` (steps.make_context: a
    judge for judge_grpo) defaults to a bare StepContext; its `state` is checkpointed. Returns every step's row.
    """
    dist = dist or single_process(cfg.mixed_precision)
    seed_everything(seed)
    if cfg.objective not in GROUP_LOSSES:
        raise VlrlcdError(f"train.objective '{cfg.objective}' has no RL loop yet; available: {', '.join(GROUP_LOSSES)}")
    group_loss = GROUP_LOSSES[cfg.objective]
    pool = [r for r in records if r.id in anchors]
    skipped = len(records) - len(pool)
    if not pool:
        raise VlrlcdError("no training prompt has a stored anchor: run `vlrlcd anchors CONFIG` first")
    if dist.sharded and cfg.batch_size % dist.world:
        raise VlrlcdError(f"with a sharded base (FSDP / ZeRO-3) every process takes the same number of prompts: "
                          f"train.batch_size ({cfg.batch_size}) must be a multiple of the {dist.world} processes")
    order = rl_order(pool, cfg.rl_steps, cfg.batch_size, seed)
    params = student.trainable_parameters()
    opt, sched = make_optimizer(params, cfg.lr, cfg.weight_decay, cfg.rl_steps, cfg.warmup_steps)
    out = Path(out_dir)
    scaler = dist.grad_scaler()
    ctx = ctx or StepContext(step=0, total_steps=cfg.rl_steps, ranking=rcfg)
    data_digest = digest([r.id for r in order[: len(pool)]] + [f"batch={cfg.batch_size}", f"seed={seed}"])
    bs = cfg.batch_size
    # with checkpointing the loss passes run full sequences (StudentAdapter.checkpointing); sampling does not
    with activation_checkpointing(student.model, cfg.gradient_checkpointing), \
            Session("rl", out, cfg, dist, student, params, opt, sched, cfg.rl_steps, resume, progress, data_digest,
                    postfix_keys=("loss", "margin_mean", "kl")) as session:
        ctx.state = session.loop_state.get("ctx_state", ctx.state)
        calls_total: dict[str, int] = dict(session.loop_state.get("calls", {}))  # every process, cumulative
        loop_state = lambda: {"ctx_state": ctx.state, "calls": calls_total}  # noqa: E731
        rollouts_path = out / "rollouts.jsonl"
        if dist.is_main:
            _truncate_rollouts(rollouts_path, session.start_step)
        for step in range(session.start_step, cfg.rl_steps):
            ts = time.time()
            ctx.step = step
            batch = order[step * bs:(step + 1) * bs]
            sums: dict[str, float] = {}
            counts: dict[str, int] = {}
            lines, bad_ids, tokens, calls0 = [], [], 0.0, _call_counts(ctx)
            mine = dist.shard(len(batch))
            groups, unsampled = [], False
            with dist.autocast():  # this process's prompts sampled in one batched decode, then ranked per group
                student.model.eval()
                try:
                    groups = rollout_batch(student, [batch[i] for i in mine], [anchors[batch[i].id] for i in mine],
                                           cfg, rcfg, max_new_tokens, [sample_generator(seed, step, i) for i in mine])
                except RuntimeError as e:  # inf / NaN logits (diverged weights): a bad step, not a crash
                    if not nonfinite_sampling(e):
                        raise
                    unsampled = True
                    bad_ids.extend(batch[i].id for i in mine)
                finally:
                    student.model.train()
            results = losses_and_backward(student, groups, group_loss, cfg, ctx, len(batch), dist, scaler)
            for i, g, (m, finite) in zip(mine, groups, results):
                if not finite:
                    bad_ids.append(batch[i].id)
                    continue
                tokens += m.get("tokens", 0.0)
                if _ranked(g):
                    m = {**m, "margin_mean": float(g.margins.mean()), "dx_entropy": float(entropy(g.target[None])[0])}
                m = {**m, **group_diagnostics(g.record, g.texts, g.margins, g.target)}  # never a training signal
                for k, v in m.items():
                    if k != "tokens" and isinstance(v, (int, float)):
                        sums[k] = sums.get(k, 0.0) + float(v)
                        counts[k] = counts.get(k, 0) + 1
                lines.append((i, {**g.to_json(step + 1), "rank": dist.rank} if dist.multi else g.to_json(step + 1)))
            done = finish_step(dist, params, opt, sched, cfg.grad_clip, scaler, len(bad_ids))
            norm, ok, reason = done.grad_norm, done.ok, done.reason
            calls = {k: v - calls0.get(k, 0) for k, v in _call_counts(ctx).items()}
            parts = dist.all_gather((sums, counts, tokens, lines, bad_ids, calls, unsampled))
            sums, counts = _merge([p[0] for p in parts]), _merge([p[1] for p in parts])
            tokens = sum(p[2] for p in parts)
            if reason is None and not ok:
                ids = [x for p in parts for x in p[4]]
                what = (f"non-finite logits while sampling (train.lr={cfg.lr:g} too high?)" if any(p[6] for p in parts)
                        else "non-finite loss")
                reason = f"{what} on prompt(s) {', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''}"
            means = {k: v / counts[k] for k, v in sums.items()}
            kl = means.get("kl_ref", means.get("kl"))   # None: the objective has no KL term (not drawn, not 0)
            calls_total = _merge([calls_total] + [p[5] for p in parts])
            if cfg.objective in STEP_END:  # e.g. self_ppo's baseline, from metrics every process agrees on
                STEP_END[cfg.objective](ctx, cfg, means)
            session.log(step + 1, {**means, **({} if kl is None else {"kl": kl}), "grad_norm": norm, "teacher_calls": teacher_calls,
                                   **calls_total, "prompts_without_anchor": skipped},
                              ok, reason, tokens, step_seconds=time.time() - ts, count_bad=done.counts_bad)
            if dist.is_main:
                with open(rollouts_path, "a", encoding="utf-8") as f:
                    for _, line in sorted((x for p in parts for x in p[3]), key=lambda t: t[0]):
                        f.write(json.dumps(line, ensure_ascii=False) + "\n")
            session.end_step(step + 1, loop_state)
        session.finish(loop_state)
    student.model.eval()
    return session.rows


def nonfinite_sampling(e: RuntimeError) -> bool:
    """Whether a sampling error is torch.multinomial refusing inf / NaN probabilities."""
    return "probability tensor contains" in str(e)


def losses_and_backward(student: StudentAdapter, groups: list, group_loss, cfg: TrainConfig, ctx: StepContext,
                        denom: int, dist: Dist, scaler=None) -> list[tuple[dict, bool]]:
    """Each group's (metrics, finite), with ONE backward per chunk of `train.group_chunk` groups (0: all) over
    Σ finite losses / `denom`. For the objectives that read all K candidates' log-probs (`group_passes`) each
    chunk's policy, reference (and rlsd's privileged) log-probs come from one batched pass per kind
    (`batched_passes`); the others run group by group (chunks of one). A non-finite loss is left out of the
    sum; under FSDP (`dist.sharded`) it stays in, so every process runs the same backward (the step is then
    discarded everywhere)."""
    size = (cfg.group_chunk or len(groups)) if group_passes(cfg) else 1
    out: list[tuple[dict, bool]] = []
    for c0 in range(0, len(groups), max(size, 1)):
        chunk, total = groups[c0:c0 + size], None
        with dist.autocast():
            batched_passes(student, chunk, cfg)
            for g in chunk:
                loss, m = group_loss(student, g, cfg, ctx)
                finite = bool(torch.isfinite(loss))
                out.append((m, finite))
                if finite or dist.sharded:
                    total = loss / denom if total is None else total + loss / denom
        for g in chunk:
            g.passes.clear()  # the chunk's graph is freed by its backward; drop the references too
        if total is not None:
            (scaler.scale(total) if scaler is not None else total).backward()
    return out


def _call_counts(ctx) -> dict[str, int]:
    """The context's teacher-cost counters (judge calls, local teacher passes), if it keeps any."""
    counts = getattr(ctx, "call_counts", None)
    return dict(counts()) if callable(counts) else {}


def _ranked(group) -> bool:
    ranked = getattr(group, "ranked", None)
    if ranked is not None:
        return bool(ranked)
    return group.margins.numel() > 0


def _merge(dicts: list[dict]) -> dict:
    out: dict = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def _truncate_rollouts(path: Path, done_steps: int) -> None:
    """Keep the groups of the first `done_steps` steps (all of them are redone after a resume)."""
    if done_steps == 0 or not path.exists():
        path.unlink(missing_ok=True)
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", math.inf) <= done_steps:
                keep.append(line + "\n")
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(keep), encoding="utf-8")
    tmp.replace(path)
