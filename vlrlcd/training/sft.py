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
from tqdm import tqdm

from vlrlcd.adapters.base import StudentAdapter
from vlrlcd.datasets.records import Record
from vlrlcd.objectives.sft import sft_loss
from vlrlcd.ranking.scorers import scoring_prompt
from vlrlcd.training.common import clipped_step, make_optimizer, seed_everything
from vlrlcd.training.config import TrainConfig
from vlrlcd.training.metrics_log import MetricsLog


@dataclass
class SFTItem:
    """One record's supervised pairs (prompt, target), all over the same image."""

    id: str
    image: Any
    pairs: list[tuple[str, str]]


def sft_items(records: list[Record], anchors: dict[str, str], scoring_format: bool = True) -> list[SFTItem]:
    """Training pairs from the records that have an anchor (the rest are skipped)."""
    items = []
    for r in records:
        a = anchors.get(r.id)
        if a is None:
            continue
        pairs = [(r.prompt, a)] + ([(scoring_prompt(r.prompt, a), a)] if scoring_format else [])
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


def train_sft(student: StudentAdapter, items: list[SFTItem], cfg: TrainConfig, out_dir: str | Path,
              seed: int = 0, epochs: float | None = None, progress: bool = True) -> list[dict]:
    """Run SFT for `cfg.sft_epochs` passes; writes OUT/metrics.jsonl; returns the metric rows."""
    seed_everything(seed)
    epochs = cfg.sft_epochs if epochs is None else epochs
    if not items:
        raise ValueError("no SFT examples: no record has a stored anchor")
    order: list[SFTItem] = []
    rng = random.Random(seed)
    while len(order) < int(round(epochs * len(items))):
        batch = list(items)
        rng.shuffle(batch)
        order.extend(batch)
    order = order[: max(1, int(round(epochs * len(items))))]
    bs = cfg.sft_batch_size
    total_steps = (len(order) + bs - 1) // bs
    params = student.trainable_parameters()
    opt, sched = make_optimizer(params, cfg.sft_lr, cfg.weight_decay, total_steps, max(cfg.warmup_steps, total_steps // 20))
    log = MetricsLog(Path(out_dir) / "metrics.jsonl")
    student.model.train()
    rows, t0 = [], time.time()
    bar = tqdm(range(total_steps), desc="sft", disable=not progress, leave=False)
    for step in bar:
        batch = order[step * bs:(step + 1) * bs]
        loss, m = batch_loss(student, batch)
        if torch.isfinite(loss):
            loss.backward()
            norm, ok = clipped_step(params, opt, sched, cfg.grad_clip)
        else:
            opt.zero_grad(set_to_none=True)
            norm, ok = float("nan"), False
        row = {"stage": "sft", "step": step + 1, "loss": m["loss"], "grad_norm": norm,
               "skipped": not ok, "lr": sched.get_last_lr()[0], "tokens": m["tokens"],
               "seconds": round(time.time() - t0, 3)}
        log.write(row)
        rows.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}")
    student.model.eval()
    return rows
