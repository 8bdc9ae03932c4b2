"""Pretraining for the tiny random students, so that the demo starts where a user does: from a base
model that can already see (a real student is a pretrained checkpoint; a tiny one built from a config
is not). All weights train, on generic data the teacher never sees and the evaluation never uses:
captions of freshly drawn scenes for a vision-language student, arithmetic for a text student.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tqdm import tqdm

from vlrlcd.adapters.base import StudentAdapter
from vlrlcd.datasets.records import Record
from vlrlcd.objectives.sft import sft_loss
from vlrlcd.training.common import clipped_step, make_optimizer, seed_everything

PRETRAIN_SEED_OFFSET = 7919   # keeps pretraining scenes apart from every data split's seed stream


def pretraining_records(vision: bool, n: int, seed: int, image_dir: Path, image_size: int) -> list[Record]:
    """Generic (prompt, reference) pairs: scene captions for a VLM, arithmetic for a text model."""
    from vlrlcd.datasets import synthetic

    if vision:
        return synthetic.shapes_caption(n, seed + PRETRAIN_SEED_OFFSET, image_dir, image_size, split="pretrain")
    return synthetic.arithmetic(n, seed + PRETRAIN_SEED_OFFSET, split="pretrain")


def pretrain_base(path: str | Path, records: list[Record], epochs: float, lr: float, seed: int = 0,
                  batch_size: int = 32, progress: bool = True) -> list[float]:
    """Train every weight of the checkpoint at `path` on `records` (prompt -> reference) and save it back."""
    from vlrlcd.adapters.config import StudentConfig
    from vlrlcd.adapters.loader import load_base

    seed_everything(seed)
    model, processor, tokenizer, family = load_base(StudentConfig(name_or_path=str(path)))
    student = StudentAdapter(model, processor, tokenizer, family, str(path))
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    n_items = max(1, int(round(epochs * len(records))))
    order: list[Record] = []
    rng = random.Random(seed)
    while len(order) < n_items:
        epoch = list(records)
        rng.shuffle(epoch)
        order.extend(epoch)
    order = order[:n_items]
    steps = (len(order) + batch_size - 1) // batch_size
    opt, sched = make_optimizer(params, lr, 0.0, steps, max(1, steps // 10))
    model.train()
    losses = []
    for step in tqdm(range(steps), desc="pretrain tiny base", disable=not progress, leave=False):
        batch = order[step * batch_size:(step + 1) * batch_size]
        prefixes = [student.prefix(r.prompt, r.image) for r in batch]
        tl = student.batch_token_logprobs(prefixes, [student.encode_response(r.reference) for r in batch])
        loss, _ = sft_loss(tl.logp, tl.mask)
        loss.backward()
        clipped_step(params, opt, sched, 1.0)
        losses.append(loss.item())
    model.eval()
    model.save_pretrained(path)
    return losses
