"""What determines a stage's result, as a flat {dotted key: JSON value} dict, and its digest.

A stage records these inputs when it starts (RUN/<stage>/stage.json); `--resume` continues or reuses it only
when they are unchanged, and otherwise names the keys that changed. The digest is sha256 over canonical JSON
(sorted keys, fixed separators), so it is the same in every process and every Python session.

What is left out never changes a stage's result: the run directory, progress and logging switches, checkpoint
cadence, memory knobs that keep the arithmetic (grad_accum, group_chunk, activation checkpointing), teacher
transport settings, and the eval section (a stage's evaluation has its own inputs: `eval_inputs`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

# train.* keys that never change a stage's weights
_TRAIN_INFRA = {"save_every", "keep_checkpoints", "max_bad_steps", "grad_accum", "gradient_checkpointing",
                "group_chunk", "tensorboard"}
_SFT_KEYS = {"sft_epochs", "sft_lr", "sft_batch_size", "sft_copy_pairs"}
_SHARED_KEYS = {"grad_clip", "weight_decay", "warmup_steps", "mixed_precision"}
_DATA_EVAL_ONLY = {"eval_path", "eval_size", "eval_split"}
# teacher.* keys that change what the teacher answers (judge_grpo asks it during stage II); the rest is transport
_TEACHER_ANSWERS = {"backend", "model", "base_url", "jsonl_path", "temperature", "max_tokens", "system_prompt",
                    "quantization", "error_rate", "paraphrase_rate", "seed"}
# keys added after runs were recorded, left out while at their off value (the behaviour before them) so that
# those runs still resume (train.self_ppo.scorer is not: before it self_ppo scored with ranking.scorer)
_ADDED_OFF = {"student.tiny.tower_pretrain_epochs": 0.0, "student.tiny.pretrain_sides": False,
              "train.ldl_grpo.form": "forward", "train.ldl_grpo.entropy": 0.0}
# inputs computed from files rather than read from the config (phase-one checks, before any data is loaded,
# compare the config keys only)
DERIVED = ("student.base", "data.train_records", "data.eval_records", "anchors", "start")


def canonical(value: Any) -> str:
    """Canonical JSON: sorted keys, no whitespace, non-finite floats as strings."""
    return json.dumps(_plain(value), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def digest_of(value: Any) -> str:
    return hashlib.sha256(canonical(value).encode("ascii")).hexdigest()[:20]


def _plain(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        v = dataclasses.asdict(v)
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    if isinstance(v, Path):
        return str(v)
    return v


def flatten(section: Any, prefix: str) -> dict[str, Any]:
    """{'prefix.key.sub': value} for every leaf of a config section (dataclass or dict)."""
    out: dict[str, Any] = {}
    for k, v in _plain(section).items():
        key = f"{prefix}.{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def _drop(d: dict[str, Any], prefix: str, names: Iterable[str]) -> dict[str, Any]:
    gone = {f"{prefix}.{n}" for n in names}
    return {k: v for k, v in d.items() if k not in gone and not any(k.startswith(g + ".") for g in gone)}


def omit_added_off(keys: dict[str, Any]) -> dict[str, Any]:
    """`keys` without the later-added keys that are at their off value (_ADDED_OFF): a run recorded before a
    key existed resumes as long as the key stays off."""
    return {k: v for k, v in keys.items() if not (k in _ADDED_OFF and v == _ADDED_OFF[k])}


def _student(cfg, sampling: bool) -> dict[str, Any]:
    keys = omit_added_off(flatten(cfg.student, "student"))
    if cfg.student.name_or_path not in ("tiny-llava", "tiny-text"):  # pipeline.TINY_STUDENTS
        keys = _drop(keys, "student", ["tiny"])
    return keys if sampling else _drop(keys, "student", ["max_new_tokens"])


def _data(cfg) -> dict[str, Any]:
    return _drop(flatten(cfg.data, "data"), "data", _DATA_EVAL_ONLY)


def sft_inputs(cfg) -> dict[str, Any]:
    """The config keys stage I reads (its derived inputs are added by the pipeline)."""
    train = {f"train.{k}": v for k, v in _plain(cfg.train).items() if k in _SFT_KEYS | _SHARED_KEYS}
    return {"seed": cfg.seed, **_student(cfg, sampling=False), **_data(cfg), **train}


def rl_inputs(cfg, objective: str) -> dict[str, Any]:
    """The config keys a stage-II method reads: the shared train keys, its own `train.<section>.*`
    (`Method.sections`), the ranking unless it ranks nothing, the teacher when it asks it during the stage."""
    from vlrlcd.methods import get_method
    from vlrlcd.training.config import METHOD_SECTIONS

    method = get_method(objective)
    other = [s for s in METHOD_SECTIONS if s not in method.sections]
    train = {k: v for k, v in omit_added_off(_drop(flatten(cfg.train, "train"), "train", other)).items()
             if k.split(".")[1] not in _TRAIN_INFRA | _SFT_KEYS}
    train["train.objective"] = objective
    out = {"seed": cfg.seed, **_student(cfg, sampling=True), **_data(cfg), **train}
    if method.reads_ranking:
        out.update(flatten(cfg.ranking, "ranking"))
    if method.reads_teacher:  # the teacher judges the candidates during the stage
        out.update({k: v for k, v in flatten(cfg.teacher, "teacher").items() if k.split(".", 1)[1] in _TEACHER_ANSWERS})
    return out


def eval_inputs(cfg) -> dict[str, Any]:
    """What a stage's held-out evaluation reads besides the adapter (the eval split is added by the pipeline)."""
    return {**flatten(cfg.eval, "eval"), **{f"data.{k}": getattr(cfg.data, k) for k in sorted(_DATA_EVAL_ONLY)}}


def records_digest(records, root: str | Path | None = None) -> str:
    """The records in order: ids, prompts, references, choices, meta, and each image as its path (relative to
    `root`, the run directory, when inside it) and size."""
    rows = []
    for r in records:
        rows.append([r.id, r.prompt, r.reference, r.choices, r.meta, _image_identity(r.image, root)])
    return digest_of(rows)


def _image_identity(image: str | None, root: str | Path | None) -> Any:
    if not image:
        return None
    p = Path(image)
    name = p.as_posix()
    if root is not None:
        try:
            name = p.resolve().relative_to(Path(root).resolve()).as_posix()
        except (ValueError, OSError):
            pass
    try:
        size = os.stat(p).st_size
    except OSError:
        size = None
    return [name, size]


def anchors_digest(anchors: dict[str, str]) -> str:
    return digest_of(sorted(anchors.items()))


def files_digest(folder: Path, names: Iterable[str] = ("config.json",), sized: tuple[str, ...] = ()) -> str:
    """A model directory's identity: the bytes of `names` and the names and sizes of files ending in `sized`
    (weights are not read: a 7B checkpoint must not be hashed on every resume)."""
    h = hashlib.sha256()
    for n in names:
        p = folder / n
        h.update(n.encode() + b"\0" + (p.read_bytes() if p.is_file() else b"<missing>") + b"\0")
    for p in sorted(folder.iterdir()) if sized else []:
        if p.is_file() and p.name.endswith(sized):
            h.update(f"{p.name}:{p.stat().st_size}\0".encode())
    return h.hexdigest()[:20]


def changed_keys(old: dict[str, Any], new: dict[str, Any], derived: bool = True) -> list[str]:
    """Keys whose values differ (or that only one side has); `derived=False` compares config keys only."""
    keys = sorted(set(old) | set(new))
    if not derived:
        keys = [k for k in keys if k not in DERIVED]
    return [k for k in keys if canonical(old.get(k, _MISSING)) != canonical(new.get(k, _MISSING))]


_MISSING = "<unset>"


def describe_changes(old: dict[str, Any], new: dict[str, Any], keys: list[str], limit: int = 6) -> str:
    """'train.lr 0.0002 -> 0.001, data.train_records changed, ...' (at most `limit`, then how many more)."""
    parts = []
    for k in keys[:limit]:
        if k == "start":
            parts.append("start (the adapter this stage starts from) changed")
        elif k in DERIVED:
            parts.append(f"{k} changed")
        else:
            parts.append(f"{k} {_short(old.get(k, _MISSING))} -> {_short(new.get(k, _MISSING))}")
    if len(keys) > limit:
        parts.append(f"and {len(keys) - limit} more")
    return ", ".join(parts)


def _short(v: Any) -> str:
    s = v if isinstance(v, str) else canonical(v)
    s = " ".join(str(s).split())
    return s if len(s) <= 48 else s[:45] + "..."
