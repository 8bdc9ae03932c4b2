"""Stage II: local RL. `rl_step` is the one step the loop, the benchmark and the tests call: sample K
candidates for every prompt of the batch (one batched decode), rank the groups against their stored anchors
with the student's own judgement (one batched scoring pass), and step on the method's loss: the log-prob
passes it names over all groups in one batched pass each, every group's loss from its slice, one backward
over their sum (`losses_and_backward`), then one clipped optimizer step. The teacher is never called from
here. `train_rl` is the loop around it: checkpoints, resume, Ctrl-C, logging (session.py).

Per prompt and step the image goes through the vision tower once: the features are shared by the
sampling prefix, the scoring prefix, and the policy and reference log-prob passes.

Several processes (distributed.py): each takes the prompts i ≡ rank (mod world) of the step's global
batch; sampling RNGs are fixed by (seed, step, global index), so the candidates — and, up to float
summation order, the step — are those of a single process running the whole batch.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from vlrlcd.adapters.base import StudentAdapter
from vlrlcd.datasets.records import Record
from vlrlcd.errors import VlrlcdError
from vlrlcd.files import atomic_write, json_lines
from vlrlcd.methods import get_method
from vlrlcd.methods.base import Method
from vlrlcd.ranking.config import RankingConfig
from vlrlcd.ranking.core import entropy
from vlrlcd.training.common import (activation_checkpointing, digest, finish_step, make_optimizer,
                                   seed_everything)
from vlrlcd.training.config import TrainConfig
from vlrlcd.training.diagnostics import group_diagnostics
from vlrlcd.training.distributed import Dist, single_process
from vlrlcd.training.order import epoch_order
from vlrlcd.training.runaway import RunawayWatch, unfinished_share
from vlrlcd.training.rollout import Group, rollout_batch, sample_generator
from vlrlcd.training.session import Session, Trainables
from vlrlcd.training.steps import StepContext, batched_passes


def rl_order(pool: list[Record], steps: int, batch_size: int, seed: int) -> list[Record]:
    """The prompts of every step, back to back: whole reshuffled epochs of `pool` (training/order.py), as many
    as cover steps · batch_size (a function of the seed only)."""
    epochs = max(1, -(-steps * batch_size // max(1, len(pool))))
    return epoch_order(pool, epochs * len(pool), seed)


@dataclass
class RLSetup:
    """What every step of a stage reads: the student and its optimizer, the configs, the method and its
    context, the processes, the sampling length and seed."""

    student: StudentAdapter
    cfg: TrainConfig
    rcfg: RankingConfig
    method: Method
    ctx: StepContext
    dist: Dist
    params: list[torch.nn.Parameter]
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    max_new_tokens: int
    seed: int = 0


def rl_setup(student: StudentAdapter, cfg: TrainConfig, rcfg: RankingConfig, max_new_tokens: int, seed: int = 0,
             dist: Dist | None = None, ctx: StepContext | None = None, method: Method | None = None) -> RLSetup:
    """AdamW over the student's trainable parameters (warm-up, cosine to 10% at cfg.rl_steps), `cfg.objective`'s
    method unless one is given, a bare StepContext unless one is given (steps.make_context)."""
    dist = dist or single_process(cfg.mixed_precision)
    params = student.trainable_parameters()
    opt, sched = make_optimizer(params, cfg.lr, cfg.weight_decay, cfg.rl_steps, cfg.warmup_steps)
    return RLSetup(student, cfg, rcfg, method or get_method(cfg.objective), ctx or StepContext(0, cfg.rl_steps, rcfg),
                   dist, params, opt, sched, dist.grad_scaler(), max_new_tokens, seed)


@dataclass
class StepResult:
    """One step: this process's groups with their metrics (`finite[i]`: whether group i's loss entered the
    backward), and what every process agrees on: the step's mean metrics over the finite groups, the KL (None
    when the method has none), tokens, the optimizer step's outcome, the step's teacher cost and the rollout
    lines of every group (in global prompt order)."""

    groups: list[Group]
    metrics: list[dict]
    finite: list[bool]
    means: dict[str, float]
    kl: float | None
    tokens: float
    grad_norm: float
    ok: bool
    reason: str | None
    counts_bad: bool
    calls: dict[str, int] = field(default_factory=dict)
    lines: list[dict] = field(default_factory=list)


def rl_step(run: RLSetup, step: int, batch: list[Record], anchors: list[str]) -> StepResult:
    """Step `step` (0-based) on the global `batch` (this process takes its shard): rollout → rank → passes →
    method loss → backward → optimizer step, then the method's step-end hook with the step's means."""
    student, cfg, ctx, dist = run.student, run.cfg, run.ctx, run.dist
    ctx.step = step
    mine = dist.shard(len(batch))
    calls0 = ctx.call_counts()
    groups, bad_ids, unsampled = _rollout(run, step, batch, anchors, mine)
    results = losses_and_backward(student, groups, run.method, cfg, ctx, len(batch), dist, run.scaler)
    metrics, finite, lines, tokens = [], [], [], 0.0
    for i, g, (m, ok) in zip(mine, groups, results):
        finite.append(ok)
        if not ok:
            bad_ids.append(batch[i].id)
            metrics.append(m)
            continue
        tokens += m.get("tokens", 0.0)
        m = {**m, "unfinished": unfinished_share(g.candidates, student.eos_ids)}
        if g.ranked:
            m = {**m, "margin_mean": float(g.margins.mean()), "dx_entropy": float(entropy(g.target[None])[0])}
        metrics.append({**m, **group_diagnostics(g.record, g.texts, g.margins, g.target)})  # never a training signal
        lines.append((i, {**g.to_json(step + 1), "rank": dist.rank} if dist.multi else g.to_json(step + 1)))
    done = finish_step(dist, run.params, run.opt, run.sched, cfg.grad_clip, run.scaler, len(bad_ids))
    calls = {k: v - calls0.get(k, 0) for k, v in ctx.call_counts().items()}
    sums, counts = _sums([m for m, ok in zip(metrics, finite) if ok])
    parts = dist.all_gather((sums, counts, tokens, lines, bad_ids, calls, unsampled))
    sums, counts = _merge([p[0] for p in parts]), _merge([p[1] for p in parts])
    reason = done.reason
    if reason is None and not done.ok:
        ids = [x for p in parts for x in p[4]]
        what = (f"non-finite logits while sampling (train.lr={cfg.lr:g} too high?)" if any(p[6] for p in parts)
                else "non-finite loss")
        reason = f"{what} on prompt(s) {', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''}"
    means = {k: v / counts[k] for k, v in sums.items()}
    run.method.step_end(ctx, cfg, means)  # e.g. self_ppo's baseline, from metrics every process agrees on
    return StepResult(groups, metrics, finite, means, means.get("kl_ref", means.get("kl")),
                      sum(p[2] for p in parts), done.grad_norm, done.ok, reason, done.counts_bad,
                      _merge([p[5] for p in parts]),
                      [line for _, line in sorted((x for p in parts for x in p[3]), key=lambda t: t[0])])


def _rollout(run: RLSetup, step: int, batch: list[Record], anchors: list[str],
             mine: list[int]) -> tuple[list[Group], list[str], bool]:
    """This process's prompts sampled in one batched decode, then ranked per group: (groups, the ids of the
    prompts that could not be sampled, whether sampling failed on inf / NaN logits — a bad step, not a crash)."""
    student = run.student
    with run.dist.autocast():
        student.model.eval()
        try:
            return rollout_batch(student, [batch[i] for i in mine], [anchors[i] for i in mine], run.cfg, run.rcfg,
                                 run.max_new_tokens, [sample_generator(run.seed, step, i) for i in mine],
                                 method=run.method), [], False
        except RuntimeError as e:  # inf / NaN logits (diverged weights)
            if not nonfinite_sampling(e):
                raise
            return [], [batch[i].id for i in mine], True
        finally:
            student.model.train()


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
    method = get_method(cfg.objective)
    pool = _pool(records, anchors, cfg, dist)
    order, bs, out = rl_order(pool, cfg.rl_steps, cfg.batch_size, seed), cfg.batch_size, Path(out_dir)
    run = rl_setup(student, cfg, rcfg, max_new_tokens, seed, dist, ctx, method)
    ctx = run.ctx
    data_digest = digest([r.id for r in order[: len(pool)]] + [f"batch={cfg.batch_size}", f"seed={seed}"])
    # with checkpointing the loss passes run full sequences (StudentAdapter.checkpointing); sampling does not
    with activation_checkpointing(student.model, cfg.gradient_checkpointing), \
            Session("rl", out, cfg, dist, Trainables(student, run.params, run.opt, run.sched), cfg.rl_steps,
                    resume=resume, progress=progress, data_digest=data_digest,
                    postfix_keys=("loss", "margin_mean", "kl")) as session:
        ctx.state = session.loop_state.get("ctx_state", ctx.state)
        calls_total: dict[str, int] = dict(session.loop_state.get("calls", {}))  # every process, cumulative
        loop_state = lambda: {"ctx_state": ctx.state, "calls": calls_total}  # noqa: E731
        rollouts_path, watch = out / "rollouts.jsonl", RunawayWatch()
        if dist.is_main:
            _truncate_rollouts(rollouts_path, session.start_step)
        for step in range(session.start_step, cfg.rl_steps):
            ts = time.time()
            batch = order[step * bs:(step + 1) * bs]
            r = rl_step(run, step, batch, [anchors[x.id] for x in batch])
            calls_total = _merge([calls_total, r.calls])
            session.log(step + 1, {**r.means, **({} if r.kl is None else {"kl": r.kl}), "grad_norm": r.grad_norm,
                                   "teacher_calls": teacher_calls, **calls_total,
                                   "prompts_without_anchor": len(records) - len(pool)},
                        r.ok, r.reason, r.tokens, step_seconds=time.time() - ts, count_bad=r.counts_bad)
            warning = watch.update(step + 1, r.means.get("unfinished"), cfg.lr)
            if dist.is_main:
                _append_lines(rollouts_path, r.lines)
                if warning:
                    tqdm.write(warning, file=sys.stderr)
            session.end_step(step + 1, loop_state)
        session.finish(loop_state)
    student.model.eval()
    return session.rows


def _pool(records: list[Record], anchors: dict[str, str], cfg: TrainConfig, dist: Dist) -> list[Record]:
    """The records with a stored anchor, checked against the processes' batch split."""
    pool = [r for r in records if r.id in anchors]
    if not pool:
        raise VlrlcdError("no training prompt has a stored anchor: run `vlrlcd anchors CONFIG` first")
    if dist.sharded and cfg.batch_size % dist.world:
        raise VlrlcdError(f"with a sharded base (FSDP / ZeRO-3) every process takes the same number of prompts: "
                          f"train.batch_size ({cfg.batch_size}) must be a multiple of the {dist.world} processes")
    return pool


def nonfinite_sampling(e: RuntimeError) -> bool:
    """Whether a sampling error is torch.multinomial refusing inf / NaN probabilities."""
    return "probability tensor contains" in str(e)


def losses_and_backward(student: StudentAdapter, groups: list[Group], method: Method, cfg: TrainConfig,
                        ctx: StepContext, denom: int, dist: Dist, scaler=None) -> list[tuple[dict, bool]]:
    """Each group's (metrics, finite), with ONE backward per chunk of `train.group_chunk` groups (0: all) over
    Σ finite losses / `denom`. For a method that reads all K candidates' log-probs (`Method.passes`) each
    chunk's passes come from one batched pass per kind (`batched_passes`); the others run group by group
    (chunks of one). A non-finite loss is left out of the sum; under FSDP (`dist.sharded`) it stays in, so
    every process runs the same backward (the step is then discarded everywhere)."""
    kinds = method.passes(cfg)
    size = (cfg.group_chunk or len(groups)) if kinds else 1
    out: list[tuple[dict, bool]] = []
    for c0 in range(0, len(groups), max(size, 1)):
        chunk, total = groups[c0:c0 + size], None
        with dist.autocast():
            for g, passes in zip(chunk, batched_passes(student, chunk, kinds)):
                loss, m = method.group_loss(student, g, passes, cfg, ctx)
                finite = bool(torch.isfinite(loss))
                out.append((m, finite))
                if finite or dist.sharded:
                    total = loss / denom if total is None else total + loss / denom
        if total is not None:  # the chunk's passes go out of scope here: its graph is freed by this backward
            (scaler.scale(total) if scaler is not None else total).backward()
    return out


def _sums(metrics: list[dict]) -> tuple[dict[str, float], dict[str, int]]:
    """Σ and count per numeric metric over the groups (tokens are summed apart)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for m in metrics:
        for k, v in m.items():
            if k != "tokens" and isinstance(v, (int, float)):
                sums[k] = sums.get(k, 0.0) + float(v)
                counts[k] = counts.get(k, 0) + 1
    return sums, counts


def _merge(dicts: list[dict]) -> dict:
    out: dict = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def _append_lines(path: Path, lines: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")


def _truncate_rollouts(path: Path, done_steps: int) -> None:
    """Keep the groups of the first `done_steps` steps (all of them are redone after a resume); a line cut by a
    kill is dropped."""
    if done_steps == 0 or not path.exists():
        path.unlink(missing_ok=True)
        return
    keep = [line.text + "\n" for line in json_lines(path)
            if line.error is None and isinstance(line.value, dict) and line.value.get("step", math.inf) <= done_steps]
    atomic_write(path, "".join(keep))
