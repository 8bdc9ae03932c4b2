"""Pretraining for the tiny random students, so that the demo starts where a user does: from a base
model that can already see (a real student is a pretrained checkpoint; a tiny one built from a config
is not). All weights train, on generic data the teacher never sees and the evaluation never uses:
captions of freshly drawn scenes for a vision-language student, arithmetic for a text student.

The examples are tokenized once (the checkpoint's own chat template and processor) and trained as plain
right-padded batches through the standard forward: this stage is throughput-bound, not RL.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tqdm import tqdm

from vlrlcd.datasets.records import Record
from vlrlcd.training.common import clipped_step, make_optimizer, seed_everything

PRETRAIN_SEED_OFFSET = 7919   # keeps pretraining scenes apart from every data split's seed stream


def pretraining_records(vision: bool, n: int, seed: int, image_dir: Path, image_size: int) -> list[Record]:
    """Generic (prompt, reference) pairs: scene captions for a VLM, arithmetic for a text model."""
    from vlrlcd.datasets import synthetic

    if vision:
        return synthetic.shapes_caption(n, seed + PRETRAIN_SEED_OFFSET, image_dir, image_size, split="pretrain")
    return synthetic.arithmetic(n, seed + PRETRAIN_SEED_OFFSET, split="pretrain")


def _encode(student, records: list[Record]) -> list[tuple[list[int], int, dict]]:
    """(prompt + answer token ids, prompt length, pixel inputs) per record."""
    out = []
    for r in records:
        ids, _, pixels = student.family.build_prompt(student, r.prompt, student.load_image(r.image))
        prompt = ids[0].tolist()
        out.append((prompt + student.encode_response(r.reference), len(prompt), pixels))
    return out


def pretrain_base(path: str | Path, records: list[Record], epochs: float, lr: float, seed: int = 0,
                  batch_size: int = 16, progress: bool = True) -> list[float]:
    """Train every weight of the checkpoint at `path` on `records` (prompt -> reference, loss on the
    answer tokens) and save it back; returns the per-step losses."""
    from vlrlcd.adapters.base import StudentAdapter
    from vlrlcd.adapters.config import StudentConfig
    from vlrlcd.adapters.loader import load_base

    seed_everything(seed)
    model, processor, tokenizer, family = load_base(StudentConfig(name_or_path=str(path)))
    student = StudentAdapter(model, processor, tokenizer, family, str(path))
    data = _encode(student, records)
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    n_items = max(1, int(round(epochs * len(data))))
    order: list[int] = []
    rng = random.Random(seed)
    while len(order) < n_items:
        epoch = list(range(len(data)))
        rng.shuffle(epoch)
        order.extend(epoch)
    order = order[:n_items]
    steps = (len(order) + batch_size - 1) // batch_size
    opt, sched = make_optimizer(params, lr, 0.0, steps, max(1, steps // 10))
    pad = student.pad_id
    model.train()
    losses = []
    for step in tqdm(range(steps), desc="pretrain tiny base", disable=not progress, leave=False):
        batch = [data[i] for i in order[step * batch_size:(step + 1) * batch_size]]
        L = max(len(ids) for ids, _, _ in batch)
        input_ids = torch.full((len(batch), L), pad, dtype=torch.long)
        labels = torch.full((len(batch), L), -100, dtype=torch.long)
        attn = torch.zeros(len(batch), L, dtype=torch.long)
        for i, (ids, n_prompt, _) in enumerate(batch):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, n_prompt: len(ids)] = torch.tensor(ids[n_prompt:])
            attn[i, : len(ids)] = 1
        kwargs = {}
        pixels = [px for _, _, px in batch if px]
        if pixels:
            kwargs = {k: torch.cat([px[k] for px in pixels], 0) for k in pixels[0]}
        device = student.device
        out = model(input_ids=input_ids.to(device), attention_mask=attn.to(device), labels=labels.to(device),
                    **{k: v.to(device) for k, v in kwargs.items()})
        out.loss.backward()
        clipped_step(params, opt, sched, 1.0)
        losses.append(out.loss.item())
    model.eval()
    model.save_pretrained(path)
    return losses
