"""Every numeric config key has a declared range, checked before anything runs (issue 15, item 7): a value
outside it, NaN included, is one line naming the key, the value and the range."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest

from vlrlcd.config import Config, load_config
from vlrlcd.demo import TASKS, demo_config
from vlrlcd.errors import VlrlcdError
from vlrlcd.ranges import Range, parse_range, ranges_of

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "tiny_text_arithmetic.yaml"
NOT_OURS: tuple[type, ...] = ()   # every section declares its ranges


def _numeric(tp) -> type | None:
    """int or float for a numeric field type (Optional included), else None; bool is not numeric."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _numeric(args[0]) if len(args) == 1 else None
    return tp if tp in (int, float) else None


def _sections(cls: type = Config, prefix: str = ""):
    """(dotted prefix, dataclass) for Config and every section below it."""
    yield prefix, cls
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp) and tp not in NOT_OURS:
            yield from _sections(tp, f"{prefix}{name}.")


def _numeric_keys() -> list[tuple[str, type, str, Range]]:
    """(dotted key, int|float, field name, declared range or None) for every numeric field."""
    out = []
    for prefix, cls in _sections():
        hints, ranges = typing.get_type_hints(cls), ranges_of(cls)
        for f in dataclasses.fields(cls):
            kind = _numeric(hints[f.name])
            if kind is not None:
                out.append((prefix + f.name, kind, cls.__name__, ranges.get(f.name)))
    return out


def _outside(kind: type, r: Range) -> list:
    """Values just outside `r` (and NaN / infinity for floats)."""
    bad = []
    if not math.isinf(r.lo):
        bad.append(r.lo - 1 if r.lo_closed else r.lo)
    if not math.isinf(r.hi):
        bad.append(r.hi + 1 if r.hi_closed else r.hi)
    bad = [int(v) if kind is int else float(v) for v in bad]
    if kind is float:
        bad += [math.nan, math.inf if math.isinf(r.hi) else -math.inf]
    return bad


def test_every_numeric_key_of_every_section_declares_a_range():
    keys = _numeric_keys()
    assert len(keys) > 60 and {"train.batch_size", "ranking.tau", "student.lora.r", "student.tiny.pretrain_lr",
                               "data.max_objects", "eval.max_new_tokens", "seed"} <= {k for k, *_ in keys}
    missing = [f"{k} ({cls})" for k, _, cls, r in keys if r is None]
    assert not missing, f"declare a range in RANGES for: {', '.join(missing)}"
    for _, cls in _sections():   # RANGES names real numeric fields only (no stale entries)
        numeric = {f.name for f in dataclasses.fields(cls) if _numeric(typing.get_type_hints(cls)[f.name])}
        assert set(getattr(cls, "RANGES", {})) <= numeric, cls.__name__


def test_defaults_lie_in_their_ranges():
    cfg = Config()
    for key, _, _, r in _numeric_keys():
        v = cfg
        for part in key.split("."):
            v = getattr(v, part)
        assert v is None or v in r, (key, v, r)


@pytest.mark.parametrize("key,kind,r", [(k, kind, r) for k, kind, _, r in _numeric_keys()],
                         ids=[k for k, *_ in _numeric_keys()])
def test_every_value_outside_a_range_is_refused_naming_key_value_and_range(key, kind, r):
    for v in _outside(kind, r):
        with pytest.raises(VlrlcdError) as e:
            load_config(None, [f"{key}={v}"])
        msg = str(e.value)
        assert msg.startswith(f"{key} must be {r.describe()}") and msg.endswith(f"got {v!r}"), msg
        assert "\n" not in msg


def test_range_notation():
    r = parse_range("[0, 1) note here")
    assert (r.lo, r.hi, r.lo_closed, r.hi_closed, r.note) == (0, 1, True, False, "note here")
    assert 0 in r and 0.5 in r and 1 not in r and math.nan not in r and -1e-9 not in r
    assert parse_range("(0, inf)").describe() == "> 0" and math.inf not in parse_range("(0, inf)")
    assert parse_range("[1, inf)").describe() == ">= 1" and parse_range("[1, 4]").describe() == "in [1, 4]"
    assert parse_range("(-inf, inf)").describe() == "a finite number" and math.inf not in parse_range("(-inf, inf)")
    with pytest.raises(ValueError):
        parse_range("1..4")


def test_every_recipe_and_demo_config_validates(tmp_path):
    for p in sorted((REPO / "configs").glob("*.yaml")) + sorted((REPO / "vlrlcd" / "configs").glob("*.yaml")):
        load_config(p)
    for task in TASKS:
        for quick in (False, True):
            demo_config(tmp_path / task, 0, quick, task=task)


def test_null_section_is_its_defaults_and_takes_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train: null\nranking:\n")
    cfg = load_config(p, ["train.lr=0.125", "ranking.tau=0.25"])
    assert cfg.train.lr == 0.125 and cfg.train.k == 8 and cfg.ranking.tau == 0.25
    assert load_config(p).train == Config().train
    p.write_text("train: 5\n")
    with pytest.raises(VlrlcdError, match=r"config key 'train' is a section; expected a mapping, got 5"):
        load_config(p, ["train.lr=0.1"])


def test_tiny_student_shapes_are_checked():
    with pytest.raises(VlrlcdError, match=r"student.tiny.hidden_size \(30\) must be a multiple of student.tiny.num_heads"):
        load_config(None, ["student.tiny.hidden_size=30"])
    with pytest.raises(VlrlcdError, match="student.tiny.vision_hidden_size must be a multiple of 4"):
        load_config(None, ["student.tiny.vision_hidden_size=30"])
    with pytest.raises(VlrlcdError, match=r"student.tiny.patch_size \(64\) must be <= student.tiny.image_size"):
        load_config(None, ["student.tiny.patch_size=64"])


# ------------------------------------------------------------------ the issue's cases through the CLI

ISSUE_CASES = {   # override -> the one error line
    "train.batch_size=0": "train.batch_size must be >= 1, got 0",
    "train.batch_size=-3": "train.batch_size must be >= 1, got -3",
    "train.rl_steps=-5": "train.rl_steps must be >= 1 (train.objective=sft skips stage II), got -5",
    "train.sft_epochs=-1": "train.sft_epochs must be > 0, got -1.0",
    "ranking.tau=nan": "ranking.tau must be > 0, got nan",
    "train.beta=-5": "train.beta must be >= 0, got -5.0",
    "train.grad_clip=nan": "train.grad_clip must be >= 0 (0: no clipping), got nan",
    "train.sft_lr=nan": "train.sft_lr must be > 0, got nan",
    "train.lr=-1": "train.lr must be > 0, got -1.0",
    "train.sft_batch_size=0": "train.sft_batch_size must be >= 1, got 0",
    "student.max_new_tokens=0": "student.max_new_tokens must be >= 1, got 0",
    "eval.max_new_tokens=0": "eval.max_new_tokens must be >= 1, got 0",
}


def _cli(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "vlrlcd.cli", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def issue_runs(tmp_path_factory) -> dict[str, tuple[int, str, bool]]:
    """Every issue case as `vlrlcd train RECIPE run_dir=RUN key=value`, started together (each ~2 s, mostly
    imports): (exit code, stderr, whether RUN was created)."""
    cwd = tmp_path_factory.mktemp("cli")
    procs = {o: _cli(["train", str(RECIPE), f"run_dir={cwd / str(i)}", o, "--no-progress"], cwd)
             for i, o in enumerate(ISSUE_CASES)}
    out = {}
    for i, (o, p) in enumerate(procs.items()):
        _, err = p.communicate(timeout=120)
        out[o] = (p.returncode, err, (cwd / str(i)).exists())
    return out


@pytest.mark.parametrize("override", sorted(ISSUE_CASES))
def test_issue_case_exits_non_zero_with_one_line(issue_runs, override):
    rc, err, ran = issue_runs[override]
    assert rc == 1 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines == [f"error: {ISSUE_CASES[override]}"], err
    assert not ran, "nothing may run (not even the run directory) before the config is valid"


def test_null_section_plus_override_through_the_cli(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run_dir: {tmp_path / 'run'}\ndata: {{task: arithmetic, train_size: 4, eval_size: 2}}\ntrain: null\n")
    res = _cli(["data", "check", str(cfg), "train.lr=0.1"], tmp_path)
    out, err = res.communicate(timeout=120)
    assert res.returncode == 0 and "Traceback" not in err, err
    assert "result: OK" in out
