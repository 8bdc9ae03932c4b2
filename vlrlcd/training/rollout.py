"""Rollout: for each prompt, sample the candidates the objective needs and rank them against the stored
anchor (no gradient). A step's prompts are sampled together (`rollout_batch`: one batched decode for all of
them, each prompt's draws from its own generator), then scored group by group.

The image goes through the vision tower once; the features are shared by the sampling prefix, the
scoring prefix and the later policy / reference log-prob passes (through `Group.prefix`).

What is sampled and scored is the method's `plan` (vlrlcd/methods/): K candidates ranked against the
anchor by default; fewer, none, or not ranked where the method says so.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from vlrlcd.adapters.base import Prefix, StudentAdapter
from vlrlcd.datasets.records import Record
from vlrlcd.ranking.config import RankingConfig
from vlrlcd.ranking.core import margins, target_distribution
from vlrlcd.methods import get_method
from vlrlcd.ranking.scorers import BATCH_SCORERS, ScoreItem, Scores, get_scorer
from vlrlcd.training.config import TrainConfig

if TYPE_CHECKING:
    from vlrlcd.methods.base import Method


@dataclass(frozen=True)
class RolloutPlan:
    """k: samples per prompt; score: "anchor" (rank against the anchor), "plain" (score without it) or
    "none"; score_with: the adapter the scorer runs under (policy | sft); scorer: a `SCORERS` name in place
    of ranking.scorer (None: ranking.scorer)."""

    k: int
    score: str
    score_with: str
    scorer: str | None = None


def scorer_name(plan: RolloutPlan, rcfg: RankingConfig) -> str:
    """The scorer a plan's groups are scored with: its own, else ranking.scorer."""
    return plan.scorer or rcfg.scorer


def rollout_plan(cfg: TrainConfig, rcfg: RankingConfig, record: Record, lockstep: bool = False,
                 method: Method | None = None) -> RolloutPlan:
    """What `rollout` samples and scores for this record: the method's (default `cfg.objective`'s) plan. In
    `lockstep` (FSDP) the plan must not depend on the record."""
    return (method or get_method(cfg.objective)).plan(cfg, rcfg, record, lockstep)


@dataclass
class Group:
    """One prompt's rollout: its candidates and, when ranked, their scores, margins r_k and target D_x
    (empty tensors when the objective does not rank)."""

    record: Record
    anchor: str
    prefix: Prefix
    candidates: list[list[int]]
    texts: list[str]
    scores: Scores | None
    margins: torch.Tensor   # [K] (or [0] when not ranked)
    target: torch.Tensor    # [K] (or [0])

    @property
    def ranked(self) -> bool:
        return self.scores is not None and self.margins.numel() == len(self.candidates) > 0

    def to_json(self, step: int) -> dict:
        return {"step": step, "id": self.record.id, "prompt": self.record.prompt, "image": self.record.image,
                "anchor": self.anchor, "candidates": self.texts,
                "margins": [round(float(x), 5) for x in self.margins],
                "target": [round(float(x), 5) for x in self.target]}


def distinct_mask(candidates: Sequence[Sequence[int]]) -> torch.Tensor:
    """[K] bool: True at the first occurrence of each distinct candidate (token ids), False on its repeats.

    The candidate *set* of the group (arXiv 2601.20687 normalises over it): a repeat left in would count the
    policy's own sampling frequency into D_x and q_θ, so an answer the student already samples often would
    gain target mass for being frequent, not for agreeing with the anchor."""
    seen: set[tuple[int, ...]] = set()
    out = []
    for c in candidates:
        key = tuple(c)
        out.append(key not in seen)
        seen.add(key)
    return torch.tensor(out, dtype=torch.bool)


def sample_generator(seed: int, step: int, index: int) -> torch.Generator:
    """A sampling RNG fixed by (seed, step, prompt index): resumable and independent of batching."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 1009 + index) % (2**63))


def rollout(student: StudentAdapter, record: Record, anchor: str, cfg: TrainConfig, rcfg: RankingConfig,
            max_new_tokens: int, generator: torch.Generator) -> Group:
    """Sample the objective's candidates for one prompt and rank them against its anchor (no gradient)."""
    return rollout_batch(student, [record], [anchor], cfg, rcfg, max_new_tokens, [generator])[0]


def rollout_batch(student: StudentAdapter, records: Sequence[Record], anchors: Sequence[str], cfg: TrainConfig,
                  rcfg: RankingConfig, max_new_tokens: int, generators: Sequence[torch.Generator],
                  method: Method | None = None) -> list[Group]:
    """`[rollout(student, records[i], anchors[i], ..., generators[i])]` with the step's sampling batched: every
    prefix is built first (one vision pass per image), all prompts with the same k sample in ONE
    `sample_batch` decode, then each group is scored and ranked on its own (no gradient)."""
    if not len(records) == len(anchors) == len(generators):
        raise ValueError(f"one anchor and one generator per record: {len(records)}, {len(anchors)}, {len(generators)}")
    lockstep, method = student.lockstep is not None, method or get_method(cfg.objective)
    plans = [method.plan(cfg, rcfg, r, lockstep) for r in records]
    # one vision pass per image, not `student.prefixes`' one over the step's images: a batched tower pass moves the
    # features by ~3e-6, and with them every seeded sample and loss of a run (the scorers reuse these features)
    prefixes = [student.prefix(r.prompt, r.image) for r in records]
    with torch.no_grad():
        candidates = sample_plans(student, prefixes, plans, cfg.temperature, max_new_tokens, list(generators))
        scores = score_batch(student, records, anchors, plans, prefixes, candidates, rcfg)
        return [rank_group(student, r, a, plan, prefix, cands, rcfg, s)
                for r, a, plan, prefix, cands, s in zip(records, anchors, plans, prefixes, candidates, scores)]


@torch.no_grad()
def score_batch(student: StudentAdapter, records: Sequence[Record], anchors: Sequence[str], plans: list[RolloutPlan],
                prefixes: list[Prefix], candidates: list[list[list[int]]], rcfg: RankingConfig) -> list[Scores | None]:
    """The scores of every group `plan` says to score, in one batched scorer call per adapter when the scorer
    has a batched form (`BATCH_SCORERS`: self_likelihood); None where the group is left to `rank_group`
    (not scored, or a scorer that runs group by group)."""
    out: list[Scores | None] = [None] * len(records)
    scored = [i for i, p in enumerate(plans) if p.score != "none"]
    for key in sorted({(plans[i].score_with, scorer_name(plans[i], rcfg)) for i in scored}):
        batched = BATCH_SCORERS.get(key[1])
        if batched is None:
            continue
        idx = [i for i in scored if (plans[i].score_with, scorer_name(plans[i], rcfg)) == key]
        score_with = key[0]
        items = [ScoreItem(records[i].prompt, records[i].image, anchors[i] if plans[i].score == "anchor" else None,
                           candidates[i], prefixes[i].image_features) for i in idx]
        with scoring_adapter(student, score_with):
            for i, s in zip(idx, batched(student, items)):
                out[i] = s
    return out


def scoring_adapter(student: StudentAdapter, score_with: str):
    """The adapter the scorer runs under: the frozen SFT one ("sft") or the policy as it is."""
    return student.reference() if score_with == "sft" else contextlib.nullcontext()


def sample_plans(student: StudentAdapter, prefixes: list[Prefix], plans: list[RolloutPlan], temperature: float,
                 max_new_tokens: int, generators: list[torch.Generator]) -> list[list[list[int]]]:
    """Each prefix's `plan.k` samples: one `sample_batch` call per distinct k > 0 (k == 0 samples nothing)."""
    out: list[list[list[int]]] = [[] for _ in prefixes]
    for k in sorted({p.k for p in plans if p.k > 0}):
        idx = [i for i, p in enumerate(plans) if p.k == k]
        for i, cands in zip(idx, student.sample_batch([prefixes[i] for i in idx], k, max_new_tokens, temperature,
                                                      [generators[i] for i in idx])):
            out[i] = cands
    return out


@torch.no_grad()
def rank_group(student: StudentAdapter, record: Record, anchor: str, plan: RolloutPlan, prefix: Prefix,
               candidates: list[list[int]], rcfg: RankingConfig, scores: Scores | None = None) -> Group:
    """Score one prompt's candidates as `plan` says (unless `scores` were computed in a batch) and build its
    Group (margins r_k and target D_x)."""
    r = target = torch.zeros(0)
    if plan.score == "none":
        scores = None
    elif scores is None:
        scorer = get_scorer(scorer_name(plan, rcfg), rcfg)
        with scoring_adapter(student, plan.score_with):
            scores = scorer(student, record.prompt, record.image, anchor if plan.score == "anchor" else None,
                            candidates, prefix.image_features)
    if scores is not None:
        r = margins(scores.candidates[None], scores.anchor.reshape(1))[0]
        if rcfg.anchor_in_group and plan.score == "anchor":
            candidates = list(candidates) + [student.encode_response(anchor)]
            r = torch.cat([r, r.new_zeros(1)])
        valid = distinct_mask(candidates)[None] if rcfg.distinct else None
        target = target_distribution(r[None], rcfg.gamma, rcfg.tau, valid)[0]
    return Group(record, anchor, prefix, candidates, [student.decode(c) for c in candidates], scores, r, target)
