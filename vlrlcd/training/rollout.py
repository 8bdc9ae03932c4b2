"""Rollout: for one prompt, sample K candidates and rank them against the stored anchor (no gradient).

The image goes through the vision tower once; the features are shared by the sampling prefix, the
scoring prefix and the later policy / reference log-prob passes (through `Group.prefix`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlrlcd.adapters.base import Prefix, StudentAdapter
from vlrlcd.datasets.records import Record
from vlrlcd.ranking.config import RankingConfig
from vlrlcd.ranking.core import margins, target_distribution
from vlrlcd.ranking.scorers import Scores, get_scorer
from vlrlcd.training.config import TrainConfig


@dataclass
class Group:
    """One prompt's rollout: K candidates, their scores, margins r_k and target D_x."""

    record: Record
    anchor: str
    prefix: Prefix
    candidates: list[list[int]]
    texts: list[str]
    scores: Scores
    margins: torch.Tensor   # [K]
    target: torch.Tensor    # [K]

    def to_json(self, step: int) -> dict:
        return {"step": step, "id": self.record.id, "prompt": self.record.prompt, "image": self.record.image,
                "anchor": self.anchor, "candidates": self.texts,
                "margins": [round(float(x), 5) for x in self.margins],
                "target": [round(float(x), 5) for x in self.target]}


def sample_generator(seed: int, step: int, index: int) -> torch.Generator:
    """A sampling RNG fixed by (seed, step, prompt index): resumable and independent of batching."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 1009 + index) % (2**63))


def rollout(student: StudentAdapter, record: Record, anchor: str, cfg: TrainConfig, rcfg: RankingConfig,
            max_new_tokens: int, generator: torch.Generator) -> Group:
    """Sample K candidates for one prompt and rank them against its anchor (no gradient)."""
    prefix = student.prefix(record.prompt, record.image)
    with torch.no_grad():
        candidates = student.sample(prefix, cfg.k, max_new_tokens, cfg.temperature, generator)
        scorer = get_scorer(rcfg.scorer)
        if rcfg.score_with == "sft":
            with student.reference():
                scores = scorer(student, record.prompt, record.image, anchor, candidates, prefix.image_features)
        else:
            scores = scorer(student, record.prompt, record.image, anchor, candidates, prefix.image_features)
        r = margins(scores.candidates[None], scores.anchor[None])[0]
        target = target_distribution(r[None], rcfg.gamma, rcfg.tau)[0]
    return Group(record, anchor, prefix, candidates, [student.decode(c) for c in candidates], scores, r, target)


