"""Scorers g(x, a, y): anchor-conditioned judgements of a student's candidates (no gradient).

Each scorer returns the K candidates' scores and the anchor's own score g(x, a, a), batched over the
K candidates (and the anchor) on one shared prefix, reusing the prompt's image features (no extra
vision pass). `anchor=None` scores without a reference (self_ppo's reward); the anchor score is then 0.

- self_likelihood: mean_t log π(y_t | x, reference a, y_<t);
- self_judge: the student asked whether y is correct given the reference a: log P(yes) − log P(no);
- clip: open_clip, w_t·cos(T(y), T(a)) + w_i·[cos(I, T(y)) − cos(I, T(a))];
- anchor_match: 1 for a normalised exact match with the anchor, else token-overlap F1 (no model pass);
- composite: Σ_s w_s · g_s over named scorers.
"""

from __future__ import annotations

import functools
import inspect
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from vlrlcd.adapters.base import StudentAdapter
from vlrlcd.errors import VlrlcdError
from vlrlcd.ranking.config import RankingConfig

SCORING_TEMPLATE = "{prompt}\nReference answer: {anchor}"
JUDGE_QUESTION = "Is the following answer correct? Reply with the answer, then Verdict: yes or no."
VERDICT = "\nVerdict:"
VERDICT_WORDS = (" yes", " no")


def scoring_prompt(prompt: str, anchor: str) -> str:
    """The prompt the student reads when judging a candidate: the question with the anchor as a reference."""
    return SCORING_TEMPLATE.format(prompt=prompt, anchor=anchor)


def judge_prompt(prompt: str, anchor: str | None) -> str:
    """The self_judge prompt: the question, the reference (when given) and the judging instruction."""
    head = prompt if anchor is None else scoring_prompt(prompt, anchor)
    return f"{head}\n{JUDGE_QUESTION}"


@dataclass
class Scores:
    candidates: torch.Tensor   # [K] g(x, a, y_k)
    anchor: torch.Tensor       # []  g(x, a, a) (0 when scored without an anchor)


def self_likelihood(student: StudentAdapter, prompt: str, image: Any, anchor: str | None,
                    candidates: list[list[int]], features: Any = None) -> Scores:
    """g(x, a, y) = mean_t log π(y_t | x, reference a, y_<t): the student's likelihood of y given the
    image, the question and the anchor in a scoring prompt (without `anchor`: the plain prompt)."""
    return self_likelihood_batch(student, [ScoreItem(prompt, image, anchor, candidates, features)])[0]


@dataclass
class ScoreItem:
    """One group to score in a batch: the arguments a scorer takes for one prompt."""

    prompt: str
    image: Any
    anchor: str | None
    candidates: list[list[int]]
    features: Any = None


@torch.no_grad()
def self_likelihood_batch(student: StudentAdapter, items: list[ScoreItem]) -> list[Scores]:
    """`[self_likelihood(student, item...)]` for many groups in one batched log-prob pass
    (`StudentAdapter.token_logprobs_batch`: one prefix pass over every scoring prompt, one continuation pass
    over every candidate and anchor), equal to the per-group scores up to left padding's ~1e-6."""
    texts = [it.prompt if it.anchor is None else scoring_prompt(it.prompt, it.anchor) for it in items]
    prefixes = student.prefixes(texts, [it.image for it in items], [it.features for it in items])
    responses = [list(it.candidates) + ([student.encode_response(it.anchor)] if it.anchor is not None else [])
                 for it in items]
    out = []
    for it, tl in zip(items, student.token_logprobs_batch(prefixes, responses)):
        g = tl.sequence(length_normalize=True)
        out.append(Scores(g, g.new_zeros(())) if it.anchor is None else Scores(g[:-1], g[-1]))
    return out


def _strip_eos(student: StudentAdapter, ids: list[int]) -> list[int]:
    return [i for i in ids if i not in student.eos_ids and i != student.pad_id]


def judge_response(student: StudentAdapter, answer_ids: list[int], verdict: str) -> list[int]:
    """The judge's reply as token ids: the answer (without EOS), "\\nVerdict:", " yes" or " no", EOS."""
    word = " " + verdict.strip()
    return (_strip_eos(student, answer_ids) + student.encode_response(VERDICT, add_eos=False)
            + student.encode_response(word))


@torch.no_grad()
def self_judge(student: StudentAdapter, prompt: str, image: Any, anchor: str | None,
               candidates: list[list[int]], features: Any = None) -> Scores:
    """g(x, a, y) = log P(yes | judge prompt, y) − log P(no | judge prompt, y).

    The judge prompt holds the question, the anchor as the reference answer and the instruction; the
    reply repeats the candidate, then "Verdict: " and yes or no. The 2·(K+1) replies share the prefix;
    only the verdict tokens' log-probs enter g (sum over them when yes / no take several tokens).
    """
    prefix = student.prefix(judge_prompt(prompt, anchor), image, features=features)
    answers = list(candidates) + ([student.encode_response(anchor)] if anchor is not None else [])
    n_yes, n_no = (len(student.encode_response(w, add_eos=False)) for w in VERDICT_WORDS)
    rows = [judge_response(student, a, "yes") for a in answers] + [judge_response(student, a, "no") for a in answers]
    tl = student.token_logprobs(prefix, rows)
    n = len(answers)
    verdict = torch.zeros_like(tl.mask)
    for i, row in enumerate(rows):   # the verdict word's tokens: just before the final EOS
        width = n_yes if i < n else n_no
        verdict[i, len(row) - 1 - width: len(row) - 1] = 1.0
    lp = (tl.logp * verdict).sum(-1)
    g = lp[:n] - lp[n:]
    if anchor is None:
        return Scores(g, g.new_zeros(()))
    return Scores(g[:-1], g[-1])


# ------------------------------------------------------------------ clip
_CLIP_CACHE: dict[tuple[str, str, str], tuple[Any, Any, Any]] = {}
_CLIP_LOCK = threading.Lock()


def load_clip(model: str, pretrained: str, device: torch.device | str = "cpu") -> tuple[Any, Any, Any]:
    """(model, image preprocess, tokenizer) from open_clip, loaded once per process.

    `model` is an open_clip architecture name or a model-config .json file; `pretrained` a local
    checkpoint file, a pretrained tag already in the local cache, or "random" (untrained, tests only).
    """
    key = (model, pretrained, str(device))
    with _CLIP_LOCK:
        if key in _CLIP_CACHE:
            return _CLIP_CACHE[key]
        import open_clip

        name = model
        if model.endswith(".json"):
            if not Path(model).is_file():
                raise VlrlcdError(f"ranking.clip_model: model config {model} not found")
            open_clip.add_model_config(model)
            name = Path(model).stem
        if name not in open_clip.list_models():
            raise VlrlcdError(f"ranking.clip_model '{model}' is not an open_clip architecture "
                              "(see open_clip.list_models()) nor a model-config .json file")
        if not pretrained:
            raise VlrlcdError("ranking.clip_pretrained is empty: give a local open_clip checkpoint file")
        weights = None if pretrained == "random" else pretrained
        looks_like_path = weights is not None and ("/" in weights or Path(weights).suffix in (".bin", ".pt", ".pth", ".safetensors"))
        if looks_like_path and not Path(weights).is_file():
            raise VlrlcdError(f"ranking.clip_pretrained: checkpoint file {weights} not found")
        try:
            clip_model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=weights, device=device)
        except Exception as e:  # offline tags, corrupt files: one actionable line
            raise VlrlcdError(
                f"ranking.clip_pretrained '{pretrained}' could not be loaded for {name} ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:160] if str(e) else ''}); named tags need a download, so point it "
                "to a local checkpoint file instead"
            ) from None
        clip_model.eval()
        entry = (clip_model, preprocess, open_clip.get_tokenizer(name))
        _CLIP_CACHE[key] = entry
        return entry


@torch.no_grad()
def clip(student: StudentAdapter, prompt: str, image: Any, anchor: str | None, candidates: list[list[int]],
         features: Any = None, cfg: RankingConfig | None = None) -> Scores:
    """g(y) = w_t·cos(T(y), T(a)) + w_i·[cos(I, T(y)) − cos(I, T(a))] with open_clip embeddings T, I.

    g(a) = w_t, so the margin r = w_t·(cos(T(y), T(a)) − 1) + w_i·[cos(I, T(y)) − cos(I, T(a))] ≤ 0 on the
    text part. Text-only prompts have no image term; without an anchor g(y) = w_i·cos(I, T(y)).
    The candidates and the anchor are encoded in one text batch, the image once.
    """
    cfg = cfg or RankingConfig()
    device = student.device
    model, preprocess, tokenizer = load_clip(cfg.clip_model, cfg.clip_pretrained, device)
    texts = [student.decode(c) for c in candidates] + ([anchor] if anchor is not None else [])
    t = model.encode_text(tokenizer(texts).to(device)).float()
    t = t / t.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    K = len(candidates)
    g = torch.zeros(K, device=device)
    g_anchor = torch.zeros((), device=device)
    if anchor is not None:
        g = g + cfg.clip_text_weight * (t[:K] @ t[K])
        g_anchor = g_anchor + cfg.clip_text_weight * (t[K] @ t[K])
    if image is not None and cfg.clip_image_weight != 0:
        img = student.load_image(image).convert("RGB")
        v = model.encode_image(preprocess(img).unsqueeze(0).to(device)).float()[0]
        v = v / v.norm().clamp(min=1e-12)
        sim = t @ v
        if anchor is not None:
            g = g + cfg.clip_image_weight * (sim[:K] - sim[K])
        else:
            g = g + cfg.clip_image_weight * sim[:K]
    return Scores(g, g_anchor)


# ------------------------------------------------------------------ anchor_match
@torch.no_grad()
def anchor_match(student: StudentAdapter, prompt: str, image: Any, anchor: str | None, candidates: list[list[int]],
                 features: Any = None, cfg: RankingConfig | None = None) -> Scores:
    """g(x, a, y) = 1 when y and the anchor are equal after answer normalisation, else their token-overlap F1
    (teacher/base.reference_score): the anchor read as text, no model pass. With `ranking.anchor_suffix`, a
    candidate that is the anchor's last words ("47" for "I think it is 47.") also counts as agreement, so a
    sentence-form anchor does not rank a wrong sentence above its own bare answer. g(x, a, a) = 1; without an
    anchor every score is 0."""
    from vlrlcd.evaluation.metrics import normalize_answer
    from vlrlcd.teacher.base import reference_score

    zeros = torch.zeros(len(candidates), device=student.device)
    if anchor is None:
        return Scores(zeros, zeros.new_zeros(()))
    tail = normalize_answer(anchor).split() if cfg is not None and cfg.anchor_suffix else None

    def g(text: str) -> float:
        words = normalize_answer(text).split()
        if tail is not None and words and len(words) < len(tail) and tail[-len(words):] == words:
            return 1.0
        return reference_score(text, anchor)

    return Scores(torch.tensor([g(student.decode(c)) for c in candidates], device=student.device),
                  zeros.new_ones(()))


# ------------------------------------------------------------------ composite
@torch.no_grad()
def composite(student: StudentAdapter, prompt: str, image: Any, anchor: str | None, candidates: list[list[int]],
              features: Any = None, cfg: RankingConfig | None = None) -> Scores:
    """g = Σ_s w_s · g_s over `ranking.composite` {scorer: weight} (the anchor score likewise)."""
    cfg = cfg or RankingConfig()
    cfg.validate_composite(required=True)
    total, total_anchor = None, None
    for name, w in cfg.composite.items():
        s = get_scorer(name, cfg)(student, prompt, image, anchor, candidates, features)
        c, a = float(w) * s.candidates.float().to(student.device), float(w) * s.anchor.float().to(student.device)
        total = c if total is None else total + c
        total_anchor = a if total_anchor is None else total_anchor + a
    return Scores(total, total_anchor)


SCORERS: dict[str, Callable] = {"self_likelihood": self_likelihood, "self_judge": self_judge, "clip": clip,
                                "anchor_match": anchor_match, "composite": composite}
# scorers that read only the anchor: without one every candidate scores 0 (no signal for self_ppo)
ANCHOR_ONLY = frozenset({"anchor_match"})
# scorers with a batched form f(student, items: list[ScoreItem]) -> list[Scores] (the rollout scores a step's
# groups in one call); the others run group by group
BATCH_SCORERS: dict[str, Callable] = {"self_likelihood": self_likelihood_batch}


def get_scorer(name: str, cfg: RankingConfig | None = None) -> Callable:
    """The scorer `name` as f(student, prompt, image, anchor, candidates, features) -> Scores,
    with the ranking settings bound for the scorers that read them (clip, composite)."""
    if name not in SCORERS:
        raise VlrlcdError(f"ranking.scorer '{name}' is not available; available: {', '.join(SCORERS)}")
    fn = SCORERS[name]
    if "cfg" in inspect.signature(fn).parameters:
        return functools.partial(fn, cfg=cfg or RankingConfig())
    return fn
