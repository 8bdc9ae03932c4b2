"""Stage II: local RL. For each prompt: sample K candidates, rank them against the stored anchor with
the student's own judgement, and step on the objective. The teacher is never called from here.

Per prompt and step the image goes through the vision tower once: the features are shared by the
sampling prefix, the scoring prefix, and the policy and reference log-prob passes.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from vlrlcd.adapters.base import StudentAdapter
from vlrlcd.datasets.records import Record
from vlrlcd.errors import VlrlcdError
from vlrlcd.ranking.config import RankingConfig
from vlrlcd.ranking.core import entropy
from vlrlcd.training.common import clipped_step, make_optimizer, seed_everything
from vlrlcd.training.config import TrainConfig
from vlrlcd.training.metrics_log import MetricsLog
from vlrlcd.training.rollout import rollout, sample_generator
from vlrlcd.training.steps import GROUP_LOSSES, StepContext


def train_rl(student: StudentAdapter, records: list[Record], anchors: dict[str, str], cfg: TrainConfig,
             rcfg: RankingConfig, max_new_tokens: int, out_dir: str | Path, seed: int = 0,
             teacher_calls: int = 0, progress: bool = True) -> list[dict]:
    """Run `cfg.rl_steps` steps of `cfg.objective` on the records that have an anchor.

    Writes OUT/metrics.jsonl (one line per step) and OUT/rollouts.jsonl (every group); returns the rows.
    """
    seed_everything(seed)
    if cfg.objective not in GROUP_LOSSES:
        raise VlrlcdError(f"train.objective '{cfg.objective}' has no RL loop yet; available: {', '.join(GROUP_LOSSES)}")
    group_loss = GROUP_LOSSES[cfg.objective]
    pool = [r for r in records if r.id in anchors]
    skipped = len(records) - len(pool)
    if not pool:
        raise VlrlcdError("no training prompt has a stored anchor: run `vlrlcd anchors CONFIG` first")
    rng = random.Random(seed)
    order: list[Record] = []
    while len(order) < cfg.rl_steps * cfg.batch_size:
        epoch = list(pool)
        rng.shuffle(epoch)
        order.extend(epoch)
    params = student.trainable_parameters()
    opt, sched = make_optimizer(params, cfg.lr, cfg.weight_decay, cfg.rl_steps, cfg.warmup_steps)
    out = Path(out_dir)
    log = MetricsLog(out / "metrics.jsonl")
    rollouts_path = out / "rollouts.jsonl"
    rollouts_path.unlink(missing_ok=True)
    ctx = StepContext(step=0, total_steps=cfg.rl_steps, ranking=rcfg)
    rows, t0, bad = [], time.time(), 0
    bar = tqdm(range(cfg.rl_steps), desc=cfg.objective, disable=not progress, leave=False)
    for step in bar:
        ts = time.time()
        ctx.step = step
        batch = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        sums: dict[str, float] = {}
        finite, tokens, groups = True, 0.0, []
        for i, rec in enumerate(batch):
            student.model.eval()
            g = rollout(student, rec, anchors[rec.id], cfg, rcfg, max_new_tokens, sample_generator(seed, step, i))
            student.model.train()
            loss, m = group_loss(student, g, cfg, ctx)
            if not torch.isfinite(loss):
                finite = False
                continue
            (loss / len(batch)).backward()
            groups.append(g)
            tokens += m.get("tokens", 0.0)
            m = {**m, "margin_mean": float(g.margins.mean()), "dx_entropy": float(entropy(g.target[None])[0])}
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v
        if finite:
            norm, ok = clipped_step(params, opt, sched, cfg.grad_clip)
        else:
            opt.zero_grad(set_to_none=True)
            norm, ok = float("nan"), False
        bad = 0 if ok else bad + 1
        n = max(1, len(groups))
        row = {"stage": "rl", "step": step + 1, **{k: v / n for k, v in sums.items() if k != "tokens"},
               "kl": sums.get("kl_ref", 0.0) / n, "grad_norm": norm, "skipped": not ok,
               "lr": sched.get_last_lr()[0], "teacher_calls": teacher_calls, "prompts_without_anchor": skipped,
               "tokens_per_s": tokens / max(1e-9, time.time() - ts), "seconds": round(time.time() - t0, 3)}
        log.write(row)
        rows.append(row)
        with open(rollouts_path, "a", encoding="utf-8") as f:
            for g in groups:
                f.write(json.dumps(g.to_json(step + 1), ensure_ascii=False) + "\n")
        bar.set_postfix(loss=f"{row.get('loss', float('nan')):.3f}", margin=f"{row.get('margin_mean', 0):.2f}",
                        kl=f"{row['kl']:.3f}")
        if bad >= cfg.max_bad_steps:
            raise VlrlcdError(f"{bad} steps in a row had a non-finite loss or gradient (last at step {step + 1}); "
                              "lower train.lr or check the data")
    student.model.eval()
    return rows
