"""Teacher interface, answer matching, the oracle and jsonl backends (no network)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from vlrlcd.config import load_config
from vlrlcd.datasets.records import Record
from vlrlcd.errors import VlrlcdError
from vlrlcd.teacher import Teacher, build_teacher
from vlrlcd.teacher.base import TeacherCallError, normalize_answer, parse_grade, token_f1
from vlrlcd.teacher.config import TeacherConfig
from vlrlcd.teacher.jsonl_teacher import JsonlTeacher
from vlrlcd.teacher.oracle import OracleTeacher, strip_frames
from vlrlcd.teacher.runner import fill_anchors
from vlrlcd.teacher.store import AnchorStore

COLOURS = ["red", "green", "blue", "yellow", "purple"]


def colour_records(n: int) -> list[Record]:
    out = []
    for i in range(n):
        ref = COLOURS[i % len(COLOURS)]
        out.append(Record(id=f"q{i}", prompt=f"What colour is shape {i}?", reference=ref,
                          meta={"distractors": [c for c in COLOURS if c != ref]}))
    return out


# ---------------------------------------------------------------- matching
def test_normalize_answer_drops_case_punctuation_articles():
    assert normalize_answer("The  Red Cube!") == "red cube"
    assert normalize_answer("An apple, a pear.") == "apple pear"


def test_token_f1_hand_computed():
    # candidate tokens {red, big, cube}, reference {red, cube}: P = 2/3, R = 1, F1 = 2PR/(P+R) = 0.8
    assert token_f1("a red big cube", "red cube") == pytest.approx(0.8)
    assert token_f1("blue", "red") == 0.0
    assert token_f1("", "") == 1.0


def test_parse_grade():
    assert parse_grade("8") == pytest.approx(0.8)
    assert parse_grade("Grade: 10/10") == pytest.approx(1.0)
    for bad in ("no idea", "11"):
        with pytest.raises(TeacherCallError) as e:
            parse_grade(bad)
        assert e.value.kind == "unparseable"


def test_oracle_judge():
    t = OracleTeacher(TeacherConfig())
    rec = Record(id="x", prompt="What colour?", reference="red")
    assert t.judge(rec, "It is red.") == 1.0
    assert t.judge(rec, "The answer is red") == 1.0
    assert t.judge(rec, "blue") == 0.0
    assert t.judge(rec, "blue", reference="Blue!") == 1.0
    # caption: {red, square, and, blue, circle} vs {red, square, green, circle}: P = 3/5, R = 3/4 -> F1 = 2/3
    cap = Record(id="c", prompt="Describe the image.", reference="a red square, a green circle")
    assert t.judge(cap, "a red square and a blue circle") == pytest.approx(2 / 3)
    with pytest.raises(VlrlcdError, match="no reference"):
        t.judge(Record(id="n", prompt="?"), "red")


# ---------------------------------------------------------------- oracle
def test_oracle_exact_without_noise_and_counts_calls():
    t = OracleTeacher(TeacherConfig())
    recs = colour_records(10)
    assert [t.answer(r).text for r in recs] == [r.reference for r in recs]
    assert t.calls == 10
    assert isinstance(t, Teacher)


def test_oracle_deterministic_per_seed_and_id_regardless_of_order_and_concurrency(tmp_path):
    cfg = TeacherConfig(error_rate=0.3, paraphrase_rate=0.4, seed=3, concurrency=4)
    recs = colour_records(60)
    forward = {r.id: OracleTeacher(cfg).answer(r).text for r in recs}
    backward = {r.id: OracleTeacher(cfg).answer(r).text for r in reversed(recs)}
    with AnchorStore(tmp_path / "a.sqlite") as store:
        fill_anchors(cfg, recs, store, progress=False)
        threaded = store.anchors_for(recs, cfg)
    assert forward == backward == threaded
    other_seed = {r.id: OracleTeacher(TeacherConfig(error_rate=0.3, paraphrase_rate=0.4, seed=4)).answer(r).text
                  for r in recs}
    assert other_seed != forward


def test_oracle_error_and_paraphrase_rates():
    recs = colour_records(2000)
    t = OracleTeacher(TeacherConfig(error_rate=0.3, paraphrase_rate=0.2, seed=0))
    answers = [t.answer(r).text for r in recs]
    wrong = sum(strip_frames(normalize_answer(a)) != r.reference for a, r in zip(answers, recs))
    para = sum(a not in COLOURS for a in answers)  # wrong answers are colours too; only frames change the text
    assert 0.26 < wrong / len(recs) < 0.34
    assert 0.16 < para / len(recs) < 0.24


def test_oracle_wrong_answers_are_of_the_same_kind():
    cfg = TeacherConfig(error_rate=1.0)
    t = OracleTeacher(cfg)
    for r in colour_records(20):
        assert t.answer(r).text in r.meta["distractors"]
    mc = Record(id="mc", prompt="Which?", reference="cat", choices=["cat", "dog", "cow"])
    assert t.answer(mc).text in ("dog", "cow")
    for i in range(20):
        ans = int(t.answer(Record(id=f"n{i}", prompt="2+5?", reference="7")).text)
        assert ans != 7 and abs(ans - 7) <= 3
    words = t.answer(Record(id="w", prompt="Describe.", reference="red square left of blue circle")).text
    assert words != "red square left of blue circle"
    assert Counter(words.split()) == Counter("red square left of blue circle".split())
    assert t.answer(Record(id="s", prompt="?", reference="red")).text == "not red"


def test_oracle_paraphrases_keep_the_answer():
    t = OracleTeacher(TeacherConfig(paraphrase_rate=1.0))
    recs = colour_records(30)
    answers = [t.answer(r).text for r in recs]
    assert all(a != r.reference for a, r in zip(answers, recs))
    assert all(strip_frames(normalize_answer(a)) == r.reference for a, r in zip(answers, recs))
    assert all(t.judge(r, a) == 1.0 for a, r in zip(answers, recs))


def test_oracle_without_reference_is_a_recorded_failure(tmp_path):
    cfg = TeacherConfig()
    recs = [Record(id="a", prompt="one", reference="1"), Record(id="b", prompt="two")]
    with AnchorStore(tmp_path / "a.sqlite") as store:
        s = fill_anchors(cfg, recs, store, progress=False)
        assert s.stored == 1 and s.failures_by_kind == {"no_reference": 1}
        assert store.anchors_for(recs, cfg) == {"a": "1"}


# ---------------------------------------------------------------- jsonl
def test_jsonl_backend_matches_ids_and_names_missing_ones(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text(json.dumps({"id": "q0", "answer": "red"}) + "\n" + json.dumps({"id": "q1", "anchor": "green"}) + "\n")
    cfg = TeacherConfig(backend="jsonl", jsonl_path=str(path))
    t = build_teacher(cfg)
    assert isinstance(t, JsonlTeacher)
    recs = colour_records(3)
    assert t.answer(recs[0]).text == "red" and t.answer(recs[1]).text == "green"
    with pytest.raises(TeacherCallError) as e:
        t.answer(recs[2])
    assert e.value.kind == "missing_id" and "'q2'" in str(e.value) and str(path) in str(e.value)
    with AnchorStore(tmp_path / "a.sqlite") as store:
        s = fill_anchors(cfg, recs, store, progress=False)
        assert s.stored == 2 and s.failures_by_kind == {"missing_id": 1}
        assert "'q2'" in s.failure_examples["missing_id"] and "q2" in str(s)


def test_jsonl_backend_bad_file(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text(json.dumps({"id": "q0", "answer": "red"}) + "\n{oops\n")
    with pytest.raises(VlrlcdError, match=r"answers.jsonl:2: not valid JSON"):
        build_teacher(TeacherConfig(backend="jsonl", jsonl_path=str(path)))
    with pytest.raises(VlrlcdError, match="jsonl_path"):
        build_teacher(TeacherConfig(backend="jsonl"))


# ---------------------------------------------------------------- config
def test_config_rejects_a_key_in_place_of_the_variable_name():
    with pytest.raises(VlrlcdError, match="NAME of an environment variable"):
        load_config(None, ["teacher.api_key_env=sk-live-abc123"])
    cfg = load_config(None, ["teacher.backend=openai", "teacher.max_calls=7", "teacher.concurrency=2"])
    assert cfg.teacher.max_calls == 7 and cfg.teacher.concurrency == 2
    with pytest.raises(VlrlcdError, match="backend"):
        load_config(None, ["teacher.backend=gpt"])


def test_the_oracle_judge_agrees_with_exact_match_on_signs_and_number_words():
    """One answer normalisation (evaluation/metrics.py): judge_grpo's reward and `eval --judge` agree with the
    accuracy metric ("4" is not "-4"; "two" is "2")."""
    from vlrlcd.evaluation.metrics import exact_match
    from vlrlcd.teacher.config import TeacherConfig

    judge = OracleTeacher(TeacherConfig())
    for cand, ref in [("4", "-4"), ("two", "2"), ("minus 4", "-4"), ("3.50", "3.5"), ("The red one", "red one")]:
        rec = Record(id="x", prompt="q", reference=ref)
        assert (judge.judge(rec, cand) == 1.0) == exact_match(cand, ref), (cand, ref)
    assert judge.judge(Record(id="x", prompt="q", reference="-4"), "4") < 1.0
    assert judge.judge(Record(id="x", prompt="q", reference="2"), "two") == 1.0
