"""Scorers g(x, a, y): the student's own anchor-conditioned judgement of a candidate (no gradient).

Each scorer returns the K candidates' scores and the anchor's own score g(x, a, a), computed in one
batch over the shared scoring prefix, reusing the prompt's image features (no extra vision pass).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vlrlcd.adapters.base import StudentAdapter

SCORING_TEMPLATE = "{prompt}\nReference answer: {anchor}"


def scoring_prompt(prompt: str, anchor: str) -> str:
    """The prompt the student reads when judging a candidate: the question with the anchor as a reference."""
    return SCORING_TEMPLATE.format(prompt=prompt, anchor=anchor)


@dataclass
class Scores:
    candidates: torch.Tensor   # [K] g(x, a, y_k)
    anchor: torch.Tensor       # []  g(x, a, a)


@torch.no_grad()
def self_likelihood(student: StudentAdapter, prompt: str, image: Any, anchor: str,
                    candidates: list[list[int]], features: Any = None) -> Scores:
    """g(x, a, y) = mean_t log π(y_t | x, reference a, y_<t): the student's likelihood of y given the
    image, the question and the anchor in a scoring prompt."""
    prefix = student.prefix(scoring_prompt(prompt, anchor), image, features=features)
    responses = list(candidates) + [student.encode_response(anchor)]
    g = student.token_logprobs(prefix, responses).sequence(length_normalize=True)
    return Scores(g[:-1], g[-1])


SCORERS = {"self_likelihood": self_likelihood}


def get_scorer(name: str):
    from vlrlcd.errors import VlrlcdError

    if name not in SCORERS:
        raise VlrlcdError(f"ranking.scorer '{name}' is not available; available: {', '.join(SCORERS)}")
    return SCORERS[name]
