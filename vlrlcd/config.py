"""Config: one dataclass per section, YAML in, dotted `key.sub=value` overrides on the command line.

Each section's dataclass lives beside the code it configures; this module composes them and does the
generic work: nested dict -> dataclasses with type checks, unknown keys named with the closest valid one,
keys an earlier version had (`REMOVED_KEYS`) ignored at their old default with a note, else an error.
Every numeric key has a declared range (`RANGES` in its dataclass, checked by `validate()`: vlrlcd/ranges.py).
A section written as `null` (e.g. `train:` with every key commented out) means its defaults.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from vlrlcd.adapters.config import StudentConfig
from vlrlcd.datasets.config import DataConfig
from vlrlcd.errors import VlrlcdError
from vlrlcd.evaluation.config import EvalConfig
from vlrlcd.files import atomic_write
from vlrlcd.ranges import check_ranges
from vlrlcd.ranking.config import RankingConfig
from vlrlcd.teacher.config import TeacherConfig
from vlrlcd.training.config import TrainConfig


@dataclass
class Config:
    run_dir: str = "runs/demo"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    ranking: RankingConfig = field(default_factory=RankingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    RANGES: ClassVar[dict[str, str]] = {"seed": "[0, 2147483647]"}

    def validate(self) -> None:
        check_ranges(self, "")


# Keys an earlier version had (and wrote into every RUN/config.yaml) that this one dropped: key -> (the value it
# saved by default, what to know instead). That value is ignored with a one-line note, so old run directories
# still load and resume (the key never changed a result); any other value asked for something nothing does.
REMOVED_KEYS: dict[str, tuple[Any, str]] = {
    "train.log_every": (1, "every optimizer step is logged to STAGE/metrics.jsonl"),
    "teacher.call_in_training": (False, "training never calls the teacher: `vlrlcd anchors CONFIG` (or `vlrlcd "
                                        "train`, which fills the store first) gives every prompt its anchor"),
}
_noted: set[str] = set()


def _removed_key(key: str, value: Any) -> bool:
    """True for a removed key at the value old versions saved (noted once per process, to be skipped); a
    removed key at another value is a VlrlcdError; False for a key that was never removed."""
    if key not in REMOVED_KEYS:
        return False
    default, instead = REMOVED_KEYS[key]
    if value != default or type(value) is not type(default):
        raise VlrlcdError(f"config key '{key}' was removed ({instead}); delete it from the config")
    if key not in _noted:
        _noted.add(key)
        print(f"note: ignoring config key '{key}: {yaml.safe_dump(value).splitlines()[0]}' (removed: {instead}); "
              "delete it from the config", file=sys.stderr)
    return True


def _unknown_key(name: str, valid: list[str], where: str, cls: type | None = None) -> VlrlcdError:
    renamed = getattr(cls, "RENAMED", {}).get(name)   # a key an earlier version had (TrainConfig.RENAMED)
    if renamed:
        return VlrlcdError(f"config key '{where}{name}' is now '{where}{renamed}'; rename it in the recipe "
                           "or the override")
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{where}{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return VlrlcdError(f"unknown config key '{where}{name}'{hint}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check / convert a YAML value to the field's declared type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except VlrlcdError as e:
                errors.append(str(e))
        raise VlrlcdError(errors[0] if errors else f"config key '{key}': bad value {value!r}")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if value is None:  # an empty section in YAML
            value = {}
        if not isinstance(value, dict):
            raise VlrlcdError(f"config key '{key}' is a section; expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin in (list, tuple):
        (inner,) = typing.get_args(tp)[:1] or (Any,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise VlrlcdError(f"config key '{key}' expects a list, got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise VlrlcdError(f"config key '{key}' expects a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise VlrlcdError(f"config key '{key}' expects true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)) or (
            isinstance(value, str) and not value.strip().lstrip("-+").isdigit()
        ):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise VlrlcdError(f"config key '{key}' expects an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool):
            raise VlrlcdError(f"config key '{key}' expects a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise VlrlcdError(f"config key '{key}' expects a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise VlrlcdError(f"config key '{key}' expects a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type, d: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys raise naming the closest valid key."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in (d or {}).items():
        if k not in names:
            if _removed_key(prefix + str(k), v):
                continue
            raise _unknown_key(str(k), names, prefix, cls)
        kwargs[k] = _coerce(v, hints[k], prefix + k)
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if callable(check):
        check()
    return obj


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _set_dotted(d: dict, cls: type, dotted: str, raw: str) -> None:
    parts = dotted.split(".")
    node, node_cls, where = d, cls, ""
    for i, p in enumerate(parts):
        names = [f.name for f in dataclasses.fields(node_cls)]
        if p not in names:
            if i == len(parts) - 1 and _removed_key(where + p, yaml.safe_load(raw) if raw != "" else ""):
                return
            raise _unknown_key(p, names, where, node_cls)
        if i == len(parts) - 1:
            node[p] = yaml.safe_load(raw) if raw != "" else ""
            return
        ftype = typing.get_type_hints(node_cls)[p]
        if not dataclasses.is_dataclass(ftype):
            raise VlrlcdError(f"config key '{where}{p}' is not a section; cannot set '{dotted}'")
        if node.get(p) is None:  # absent, or `section: null` in the YAML
            node[p] = {}
        if not isinstance(node[p], dict):
            raise VlrlcdError(f"config key '{where}{p}' is a section; expected a mapping, got {node[p]!r}")
        node = node[p]
        node_cls, where = ftype, f"{where}{p}."


def apply_overrides(d: dict, overrides: list[str], cls: type = Config) -> dict:
    """Apply `a.b=value` overrides (value parsed as YAML) to a raw config dict."""
    for o in overrides:
        if "=" not in o:
            raise VlrlcdError(f"override '{o}' is not of the form key.sub=value")
        k, v = o.split("=", 1)
        _set_dotted(d, cls, k.strip(), v.strip())
    return d


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe (or the defaults when `path` is None) and apply overrides."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise VlrlcdError(f"config file {p} does not exist")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise VlrlcdError(f"{p}: not valid YAML ({e})") from None
        if not isinstance(raw, dict):
            raise VlrlcdError(f"{p}: expected a mapping of sections at the top level")
    raw = apply_overrides(raw, overrides or [])
    return from_dict(Config, raw)


def save_config(cfg: Config, path: str | Path) -> None:
    atomic_write(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
