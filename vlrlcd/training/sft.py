"""Stage I: supervised fine-tuning of the student on teacher anchors.

Each record contributes the answer format (question -> anchor) and, so that the student can read a
reference from its context when it later scores candidates, the scoring format
(question + reference anchor -> anchor). Both prompts share the record's one vision pass.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlrlcd.adapters.base import StudentAdapter
from vlrlcd.datasets.records import Record
from vlrlcd.objectives.sft import sft_loss
from vlrlcd.ranking.scorers import scoring_prompt
from vlrlcd.training.common import (activation_checkpointing, digest, finish_step, make_optimizer,
                                   seed_everything)
from vlrlcd.training.config import TrainConfig
from vlrlcd.training.distributed import Dist, single_process
from vlrlcd.training.order import epoch_order
from vlrlcd.training.session import Session, Trainables


@dataclass
class SFTItem:
    """One record's supervised pairs (prompt, target), all over the same image."""

    id: str
    image: Any
    pairs: list[tuple[str, str]]


def sft_items(records: list[Record], anchors: dict[str, str], scoring_format: bool = True,
              copy_pairs: int = 0, seed: int = 0) -> list[SFTItem]:
    """Training pairs from the records that have an anchor (the rest are skipped).

    `copy_pairs` adds, per record, scoring-format pairs whose reference is another record's anchor and
    whose target is that reference: they teach a student that has never read a reference from its
    context (a tiny one trained from scratch) to follow it, so that g(x, a, y) measures agreement with
    `a` rather than the student's prior. A pretrained instruct student needs none (the default)."""
    pool = sorted(set(anchors.values()))
    rng = random.Random(seed)
    items = []
    for r in records:
        a = anchors.get(r.id)
        if a is None:
            continue
        pairs = [(r.prompt, a)] + ([(scoring_prompt(r.prompt, a), a)] if scoring_format else [])
        for _ in range(copy_pairs if scoring_format and len(pool) > 1 else 0):
            other = rng.choice([x for x in pool if x != a] or pool)
            pairs.append((scoring_prompt(r.prompt, other), other))
        items.append(SFTItem(r.id, r.image, pairs))
    return items


def batch_loss(student: StudentAdapter, items: list[SFTItem]) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean token NLL over every pair of the items, in one batched forward (one vision pass per item)."""
    prefixes, responses = [], []
    for item in items:
        features = None
        for prompt, target in item.pairs:
            prefix = student.prefix(prompt, item.image, features=features)
            features = prefix.image_features
            prefixes.append(prefix)
            responses.append(student.encode_response(target))
    tl = student.batch_token_logprobs(prefixes, responses)
    return sft_loss(tl.logp, tl.mask)


def target_tokens(student: StudentAdapter, items: list[SFTItem]) -> int:
    """How many target tokens (EOS included) the items' pairs hold: the denominator of a step's mean NLL."""
    return sum(len(student.encode_response(target)) for item in items for _, target in item.pairs)


def sft_order(items: list[SFTItem], epochs: float, seed: int) -> list[SFTItem]:
    """round(epochs · N) items: reshuffled passes over `items`, cut to length (a function of the seed only)."""
    return epoch_order(items, max(1, int(round(epochs * len(items)))), seed)


def train_sft(student: StudentAdapter, items: list[SFTItem], cfg: TrainConfig, out_dir: str | Path,
              seed: int = 0, epochs: float | None = None, progress: bool = True, resume: bool = False,
              dist: Dist | None = None) -> list[dict]:
    """Run SFT for `cfg.sft_epochs` passes; writes OUT/metrics.jsonl, OUT/checkpoints/, OUT/tb/; with `resume`,
    continues after the newest checkpoint in OUT. Returns every step's row.

    A step's batch (`cfg.sft_batch_size` items) is split across processes, and each process's share into
    `cfg.grad_accum` micro-batches; each micro-batch's loss is weighted by its share of the step's target
    tokens, so the step is the same for any split.
    """
    dist = dist or single_process(cfg.mixed_precision)
    seed_everything(seed)
    epochs = cfg.sft_epochs if epochs is None else epochs
    if not items:
        raise ValueError("no SFT examples: no record has a stored anchor")
    order = sft_order(items, epochs, seed)
    bs = cfg.sft_batch_size
    total_steps = (len(order) + bs - 1) // bs
    params = student.trainable_parameters()
    opt, sched = make_optimizer(params, cfg.sft_lr, cfg.weight_decay, total_steps, max(cfg.warmup_steps, total_steps // 20))
    scaler = dist.grad_scaler()
    data_digest = digest([it.id for it in order[: len(items)]] + [f"batch={bs}", f"seed={seed}"])
    try:
        with activation_checkpointing(student.model, cfg.gradient_checkpointing), \
                Session("sft", out_dir, cfg, dist, Trainables(student, params, opt, sched), total_steps,
                        resume=resume, progress=progress, data_digest=data_digest) as session:
            student.model.train()
            for step in range(session.start_step, total_steps):
                ts = time.time()
                batch = order[step * bs:(step + 1) * bs]
                step_tokens = target_tokens(student, batch)
                mine = [batch[i] for i in dist.shard(len(batch))]
                nll, tokens, bad = 0.0, 0.0, 0
                chunks = _chunks(mine, cfg.grad_accum)
                if dist.sharded:  # lockstep: every process runs grad_accum passes (empty ones on batch[:1], weight 0)
                    chunks += [[]] * (cfg.grad_accum - len(chunks))
                for chunk in chunks:
                    with dist.autocast():
                        loss, m = batch_loss(student, chunk or batch[:1])
                    if not chunk:
                        (loss * 0.0).backward()
                        continue
                    if not torch.isfinite(loss):
                        bad += 1
                        if dist.sharded:
                            loss.backward()  # the step is discarded on every process afterwards
                        continue
                    if m["tokens"] != step_tokens:  # a part of the step: weight by its share of the tokens
                        loss = loss * (m["tokens"] / step_tokens)
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                    nll += m["loss"] * m["tokens"]
                    tokens += m["tokens"]
                done = finish_step(dist, params, opt, sched, cfg.grad_clip, scaler, bad)
                reason = done.reason or (f"non-finite loss in {done.bad_losses} micro-batch(es)" if done.bad_losses
                                         else None)
                parts = dist.all_gather((nll, tokens))
                nll, tokens = sum(p[0] for p in parts), sum(p[1] for p in parts)
                mean = nll / tokens if tokens and done.bad_losses == 0 else float("nan")
                session.log(step + 1, {"loss": mean, "grad_norm": done.grad_norm, "tokens": tokens}, done.ok, reason,
                            tokens, step_seconds=time.time() - ts, count_bad=done.counts_bad)
                session.end_step(step + 1, dict)
            session.finish(dict)
    finally:
        student.model.eval()
    return session.rows


def _chunks(items: list, n: int) -> list[list]:
    """`items` in n nearly equal consecutive parts (empty parts dropped)."""
    size, extra = divmod(len(items), n)
    parts, start = [], 0
    for j in range(n):
        end = start + size + (1 if j < extra else 0)
        if end > start:
            parts.append(items[start:end])
        start = end
    return parts
