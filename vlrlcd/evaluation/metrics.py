"""Evaluation metrics: exact match, multiple choice, the caption attribute metric, judge win rates.

All functions are pure; judge calls go through a callable the caller passes in (the teacher's
`judge`, whose answers the teacher's store keeps, so an evaluation is never paid for twice).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Callable, Sequence

import numpy as np

from vlrlcd.datasets.records import Record
from vlrlcd.errors import VlrlcdError

METRICS = ("auto", "exact_match", "choice", "caption_attributes")

_NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}
_ARTICLES = {"a", "an", "the"}
# Punctuation that separates words; '-' before a digit and '.' between digits are kept (numbers).
_PUNCT = set(string.punctuation) | {"\u201c", "\u201d", "\u2013", "\u2014"}
_APOSTROPHES = {"'", "\u2019", "\u2018"}


def _strip_punct(s: str) -> str:
    out = []
    for i, ch in enumerate(s):
        if ch in _APOSTROPHES:
            continue  # "it's" -> "its", "apple's" -> "apples"
        if ch not in _PUNCT:
            out.append(ch)
            continue
        nxt = s[i + 1] if i + 1 < len(s) else ""
        prv = out[-1] if out else ""  # from the output, so that normalising twice changes nothing
        if ch == "-" and nxt.isdigit() and not prv.isalnum():
            out.append(ch)  # sign of a negative number: "-4" stays "-4", not "4"
        elif ch == "." and prv.isdigit() and nxt.isdigit():
            out.append(ch)  # decimal point: "3.5"
        elif ch == "," and prv.isdigit() and nxt.isdigit():
            continue  # thousands separator: "1,000" -> "1000"
        else:
            out.append(" ")
    return "".join(out)


def normalize_answer(s: str) -> str:
    """Lower-case; punctuation, articles (a/an/the) and extra whitespace removed; number words
    zero..twenty -> digits and "minus/negative N" -> "-N"; signs and decimal points of numbers kept,
    trailing decimal zeros dropped ("3.50" -> "3.5"), apostrophes deleted ("it's" -> "its")."""
    words = _strip_punct(str(s).lower()).split()
    out: list[str] = []
    for w in words:
        w = _NUMBER_WORDS.get(w, w)
        if w in _ARTICLES:
            continue
        if re.fullmatch(r"-?\d+\.\d+", w):
            w = w.rstrip("0").rstrip(".")  # "3.50" -> "3.5", "2.0" -> "2"
        if out and out[-1] in ("minus", "negative") and re.fullmatch(r"\d+(\.\d+)?", w):
            out[-1] = "-" + w
            continue
        out.append(w)
    return " ".join(out)


def exact_match(pred: str, ref: str) -> bool:
    """True when prediction and reference are equal after `normalize_answer`."""
    return normalize_answer(pred) == normalize_answer(ref)


# A label alone ("B"), bracketed ("(B)", "[B]") or followed by ")", "." or ":" and maybe more text
# ("B) blue"); "A red circle" is not the label A.
_LABEL = r"^\s*(?:[\(\[]\s*({x})\s*[\)\]]|({x})\s*(?:[\):]|\.(?!\d)|$))"
_LETTER = re.compile(_LABEL.format(x="[A-Za-z]"))
_INDEX = re.compile(_LABEL.format(x="\\d+"))


def _label(m: re.Match | None) -> str | None:
    return None if m is None else (m.group(1) or m.group(2))


def predicted_choice(pred: str, choices: Sequence[str]) -> int | None:
    """The choice index a prediction names, or None.

    In order: the whole prediction equals a choice's text (normalised); a letter label "B", "(b)",
    "B." or "B) blue" (A = 0; "A red circle" is not a label); a leading 0-based index "1" (the same numbering as the index argument of
    `choice_match`; a choice whose text is that number wins under the first rule).
    """
    norm = normalize_answer(pred)
    texts = [normalize_answer(c) for c in choices]
    if norm in texts:
        return texts.index(norm)
    letter = _label(_LETTER.match(pred))
    if letter is not None and 0 <= ord(letter.lower()) - ord("a") < len(choices):
        return ord(letter.lower()) - ord("a")
    index = _label(_INDEX.match(pred))
    if index is not None and 0 <= int(index) < len(choices):
        return int(index)
    return None


def _correct_index(choices: Sequence[str], correct: int | str) -> int | None:
    if isinstance(correct, bool):
        raise VlrlcdError(f"correct answer must be an index or a choice text, got {correct!r}")
    if isinstance(correct, int):
        if not 0 <= correct < len(choices):
            raise VlrlcdError(f"correct index {correct} is out of range for {len(choices)} choices")
        return correct
    texts = [normalize_answer(c) for c in choices]
    norm = normalize_answer(correct)
    if norm in texts:
        return texts.index(norm)
    if len(correct.strip()) == 1 and correct.strip().isalpha():
        k = ord(correct.strip().lower()) - ord("a")
        if 0 <= k < len(choices):
            return k
    return None


def choice_match(pred: str, choices: Sequence[str], correct_index_or_text: int | str) -> bool:
    """Multiple choice: does `pred` name the correct choice (by letter, 0-based index or text)?"""
    if not choices:
        raise VlrlcdError("choice_match needs a non-empty list of choices")
    want = _correct_index(choices, correct_index_or_text)
    if want is None:  # the correct answer is not among the choices: fall back to exact match
        return exact_match(pred, str(correct_index_or_text))
    return predicted_choice(pred, choices) == want


# --- caption attribute metric ---------------------------------------------------------------------

_COLOURS = set(
    "red green blue yellow orange purple pink brown black white gray grey cyan magenta violet".split()
)
_SHAPES = set("circle square triangle rectangle star ellipse oval diamond hexagon pentagon cross".split())
_JOINERS = {"and", "or"}
_MODIFIERS = {"small", "big", "large", "tiny", "little", "bright", "dark", "light", "solid", "filled"}
_COUNT_WORDS = {"a": 1, "an": 1, "one": 1, "single": 1}


def _singular(word: str, shapes: set[str]) -> str | None:
    """The shape a word names ("circles" -> "circle", "crosses" -> "cross"), or None."""
    if word in shapes:
        return word
    for suffix in ("s", "es"):
        if word.endswith(suffix) and word[: -len(suffix)] in shapes:
            return word[: -len(suffix)]
    return None


def caption_mentions(caption: str, colours: set[str] | None = None,
                     shapes: set[str] | None = None) -> Counter:
    """Colour-shape mentions in a caption, as a Counter {(colour, shape): count}.

    A shape noun takes the colour words right before it in the same phrase: between a colour and its
    shape only other colours, "and" / "or" / ",", size words (small, big ...) and count words may
    stand. So "red and blue squares" names a red square and a blue square. The count of a colour is
    the number word right before it ("two red circles" -> 2, "a red circle" -> 1); with no number a
    plural noun counts as any number (math.inf) and a singular one as 1. A colour after its noun
    ("the circle is red") is not counted.
    """
    colours = _COLOURS | (colours or set())
    shapes = _SHAPES | (shapes or set())
    tokens = _strip_punct(str(caption).lower()).split()  # commas become spaces
    mentions: Counter = Counter()
    for j, tok in enumerate(tokens):
        shape = _singular(tok, shapes)
        if shape is None:
            continue
        plural = tok != shape
        found: list[tuple[str, float]] = []  # (colour, count), nearest first
        k = j - 1
        while k >= 0:
            t = tokens[k]
            if t in colours:
                found.append((t, math.nan))
            elif t in _COUNT_WORDS or t in _NUMBER_WORDS or t.isdigit():
                n = _COUNT_WORDS.get(t) or int(_NUMBER_WORDS.get(t, t))
                if found and math.isnan(found[-1][1]):
                    found[-1] = (found[-1][0], float(n))  # the number before a colour is its count
            elif t in _JOINERS or t in _MODIFIERS or t in _ARTICLES:
                pass
            else:
                break
            k -= 1
        for colour, n in found:
            if math.isnan(n):
                n = math.inf if plural else 1.0
            mentions[(colour, shape)] += n
    return mentions


def caption_attribute_score(pred: str, objects: list[dict]) -> float:
    """Fraction of the image's objects named with the right colour in the caption.

    Objects are dicts with "shape" and "color". Mentions come from `caption_mentions` (colour before
    the shape noun; plurals and "red and blue squares" handled as documented there); each mention
    covers at most its count of objects of that colour and shape:
    score = sum over (colour, shape) of min(#objects, #mentioned) / #objects. This is recall only:
    naming extra objects is not penalised. No objects: 1.0 (nothing to name).
    """
    if not objects:
        return 1.0
    want: Counter = Counter()
    for i, o in enumerate(objects):
        if not isinstance(o, dict) or "shape" not in o or "color" not in o:
            raise VlrlcdError(f"object {i} ({o!r}) needs 'shape' and 'color' keys")
        want[(str(o["color"]).lower(), str(o["shape"]).lower())] += 1
    got = caption_mentions(pred, {c for c, _ in want}, {s for _, s in want})
    named = sum(min(n, got.get(key, 0)) for key, n in want.items())
    return float(named) / len(objects)


# --- per-record scoring ---------------------------------------------------------------------------


def resolve_metric(record: Record, metric: str = "auto") -> str:
    """The metric `score_record` uses for this record: `metric`, or for "auto" by meta["task"]
    (a caption task with meta["objects"] -> caption_attributes), then choices -> choice, then a
    reference -> exact_match, then meta["objects"] -> caption_attributes."""
    if metric not in METRICS:
        raise VlrlcdError(f"unknown eval metric '{metric}'; valid: {', '.join(METRICS)}")
    if metric != "auto":
        return metric
    meta = record.meta or {}
    task = str(meta.get("task", ""))
    if "caption" in task and meta.get("objects"):
        return "caption_attributes"
    if record.choices:
        return "choice"
    if record.reference is not None:
        return "exact_match"
    if meta.get("objects"):
        return "caption_attributes"
    raise VlrlcdError(
        f"record '{record.id}' has no reference, choices or meta objects, so it cannot be scored "
        "automatically; give it a reference or evaluate it with a judge"
    )


def score_record(record: Record, prediction: str, metric: str = "auto") -> float:
    """Score one prediction in [0, 1] with the record's metric (see `resolve_metric`)."""
    name = resolve_metric(record, metric)
    meta = record.meta or {}
    if name == "caption_attributes":
        if "objects" not in meta:
            raise VlrlcdError(f"record '{record.id}': metric caption_attributes needs meta['objects']")
        return caption_attribute_score(prediction, meta["objects"])
    if name == "choice":
        if not record.choices:
            raise VlrlcdError(f"record '{record.id}': metric choice needs choices")
        correct = meta.get("answer_index", meta.get("correct_index", record.reference))
        if correct is None:
            raise VlrlcdError(f"record '{record.id}': no reference or meta['answer_index'] to score against")
        return float(choice_match(prediction, record.choices, correct))
    if record.reference is None:
        raise VlrlcdError(f"record '{record.id}': metric exact_match needs a reference answer")
    return float(exact_match(prediction, record.reference))


# --- judge win rates ------------------------------------------------------------------------------

Judge = Callable[[Record, str, "str | None"], float]


def judge_predictions(records: Sequence[Record], predictions: Sequence[str],
                      references: Sequence[str | None] | None, judge: Judge) -> list[float]:
    """Ask `judge(record, prediction, reference)` for each prediction: 1 = the prediction wins
    against the reference answer, 0 = it loses, 0.5 = tie. `references=None` uses record.reference."""
    if references is None:
        references = [r.reference for r in records]
    if not len(records) == len(predictions) == len(references):
        raise VlrlcdError(
            f"judge_predictions: {len(records)} records, {len(predictions)} predictions and "
            f"{len(references)} references; they must be aligned"
        )
    out = []
    for r, p, ref in zip(records, predictions, references):
        s = float(judge(r, p, ref))
        if not 0.0 <= s <= 1.0:  # also catches NaN
            raise VlrlcdError(f"judge returned {s!r} for record '{r.id}'; scores must lie in [0, 1]")
        out.append(s)
    return out


def judge_win_rate(judgements: Sequence[float]) -> float:
    """Mean of the judgements: a win counts 1, a tie (0.5) counts 0.5, a loss 0."""
    if len(judgements) == 0:
        raise VlrlcdError("no judgements to compute a win rate from")
    w = np.asarray(judgements, dtype=np.float64)
    if np.any(~np.isfinite(w)) or np.any((w < 0) | (w > 1)):
        raise VlrlcdError("judgements must lie in [0, 1] (1 win, 0.5 tie, 0 loss)")
    return float(w.mean())


def _fit_logistic(x: np.ndarray, y: np.ndarray, l2: np.ndarray, iters: int = 100) -> np.ndarray:
    """Maximum-likelihood logistic regression with soft labels y in [0, 1] and a ridge penalty
    0.5·Σ l2_j·w_j², by Newton's method (the problem is convex)."""
    w = np.zeros(x.shape[1])
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -500.0, 500.0)))
        grad = x.T @ (p - y) + l2 * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + np.diag(l2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return w


def length_controlled_win_rate(wins: Sequence[float], len_candidate: Sequence[int],
                               len_reference: Sequence[int], l2: float = 1e-4) -> float:
    """Win rate with the length bias regressed out (AlpacaEval-LC style, arXiv 2404.04475).

    Fit  P(win_i) = sigmoid(a + b·tanh(d_i / σ)),  d_i = len_candidate_i − len_reference_i,
    σ = std(d), by maximum likelihood (ties are the soft label 0.5; a tiny ridge `l2` on b keeps
    the fit finite when wins are perfectly separated by length) and report the predicted win rate
    at zero length difference, sigmoid(a). Without a per-instruction difficulty term this is the
    same as AlpacaEval's average over instructions. When d or the wins are constant the length
    effect cannot be fitted and the plain win rate is returned.
    """
    w = np.asarray(wins, dtype=np.float64)
    lc = np.asarray(len_candidate, dtype=np.float64)
    lr = np.asarray(len_reference, dtype=np.float64)
    if not len(w) == len(lc) == len(lr):
        raise VlrlcdError(f"{len(w)} wins, {len(lc)} candidate lengths and {len(lr)} reference lengths")
    plain = judge_win_rate(w)
    d = lc - lr
    sigma = d.std()
    if sigma == 0 or np.all(w == w[0]):
        return plain
    x = np.stack([np.ones_like(d), np.tanh(d / sigma)], axis=1)
    a, _ = _fit_logistic(x, w, np.array([0.0, l2]))
    return float(1.0 / (1.0 + math.exp(-a)))


def win_rates(judgements: Sequence[float], predictions: Sequence[str],
              references: Sequence[str | None]) -> dict:
    """{"win_rate", "lc_win_rate", "n"} with lengths in characters (a missing reference counts 0)."""
    return {
        "win_rate": judge_win_rate(judgements),
        "lc_win_rate": length_controlled_win_rate(
            judgements, [len(p) for p in predictions], [len(r or "") for r in references]
        ),
        "n": len(judgements),
    }
