"""Train / held-out splits for a run: synthetic data generated once under <run_dir>/data/, or files.

Synthetic: train.jsonl, eval.jsonl and images/ are written the first time and read back later;
manifest.json records the generator parameters, and a change (or a missing image) regenerates.
The held-out split uses its own seed stream ("eval") and is redrawn away from training examples.

Files: data.train_path / data.eval_path go through the format readers; every record is validated
before anything else runs. data.on_error=raise stops at the first bad record with its location;
skip drops bad records and lists them with their reasons in <run_dir>/data/skipped.jsonl.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from vlrlcd.datasets import synthetic
from vlrlcd.datasets.checks import validate_entries
from vlrlcd.datasets.formats import Context, detect_format, to_entries
from vlrlcd.datasets.records import Entry, Problem, Record, read_jsonl, write_jsonl
from vlrlcd.datasets.sources import read_source, source_kind
from vlrlcd.errors import VlrlcdError
from vlrlcd.files import atomic_open, write_json

GENERATOR_VERSION = 1   # bump when a generator's output changes, so cached data is regenerated


@dataclass
class Splits:
    train: list[Record]
    eval: list[Record]
    skipped: int = 0                                  # bad records dropped (data.on_error=skip)
    notes: list[str] = field(default_factory=list)    # what was detected / generated, for the user


@dataclass
class SplitSource:
    """One split read from a file source, before validation."""

    split: str
    source: str
    format: str
    note: str
    entries: list[Entry]


def data_dir(cfg) -> Path:
    return Path(cfg.run_dir).absolute() / "data"


# ------------------------------------------------------------------------------------- synthetic


def _manifest(cfg) -> dict:
    d = cfg.data
    m = {"version": GENERATOR_VERSION, "task": d.task, "seed": d.seed,
         "train_size": d.train_size, "eval_size": d.eval_size}
    if d.task in ("shapes_vqa", "shapes_caption"):
        m.update(image_size=d.image_size, max_objects=d.max_objects)
    if d.task == "shapes_vqa":
        m["qtypes"] = list(d.qtypes)
    if d.task == "arithmetic":
        m.update(ops=list(d.ops), max_operand=d.max_operand)
    return m


def generate(cfg, split: str, n: int, images: Path, exclude: set[str] | None = None) -> list[Record]:
    """Run the configured generator for one split ('train' or 'eval')."""
    d = cfg.data
    if d.task == "shapes_vqa":
        return synthetic.shapes_vqa(n, d.seed, images, d.image_size, qtypes=d.qtypes,
                                    max_objects=d.max_objects, split=split, exclude=exclude)
    if d.task == "shapes_caption":
        return synthetic.shapes_caption(n, d.seed, images, d.image_size, max_objects=d.max_objects,
                                        split=split, exclude=exclude)
    return synthetic.arithmetic(n, d.seed, ops=d.ops, max_operand=d.max_operand, split=split, exclude=exclude)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on folder/.lock (several ranks may load the same run at once)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VlrlcdError(f"cannot create the data folder {folder}: {e.strerror}; check run_dir") from None
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock
        yield
        return
    with open(folder / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cached(folder: Path, manifest: dict) -> tuple[list[Record], list[Record]] | None:
    try:
        if json.loads((folder / "manifest.json").read_text(encoding="utf-8")) != manifest:
            return None
        train, held = read_jsonl(folder / "train.jsonl"), read_jsonl(folder / "eval.jsonl")
    except (OSError, ValueError, VlrlcdError):
        return None
    if any(r.image is not None and not _own_image(r.image, folder) for r in train + held):
        return None
    return train, held


def _own_image(image: str, folder: Path) -> bool:
    """A synthetic record's image is a file the generator wrote under the data folder (not one an edited
    train.jsonl points at elsewhere)."""
    p = Path(image)
    return p.is_file() and p.resolve().is_relative_to(folder.resolve())


def _generate_all(cfg, folder: Path, manifest: dict) -> None:
    """Both splits, JSONL and PNGs; the manifest is written last, so a crash means regenerate."""
    (folder / "manifest.json").unlink(missing_ok=True)
    images = folder / "images"
    if images.exists():
        shutil.rmtree(images)
    train = generate(cfg, "train", cfg.data.train_size, images)
    held = generate(cfg, "eval", cfg.data.eval_size, images, {synthetic.record_key(r) for r in train})
    write_jsonl(train, folder / "train.jsonl")
    write_jsonl(held, folder / "eval.jsonl")
    write_json(folder / "manifest.json", manifest)


def _load_synthetic(cfg) -> Splits:
    folder = data_dir(cfg)
    manifest = _manifest(cfg)
    with _locked(folder):
        cached = _cached(folder, manifest)
        if cached is not None:
            return Splits(*cached, notes=[f"synthetic {cfg.data.task} data read from {folder}"])
        try:
            _generate_all(cfg, folder, manifest)
        except OSError as e:
            raise VlrlcdError(f"cannot write synthetic data under {folder}: {e.strerror or e}") from None
        # read back so a first run returns exactly what later runs will (absolute image paths)
        train, held = read_jsonl(folder / "train.jsonl"), read_jsonl(folder / "eval.jsonl")
    note = f"generated synthetic {cfg.data.task} data in {folder} ({len(train)} train, {len(held)} eval)"
    return Splits(train, held, notes=[note])


# ------------------------------------------------------------------------------------- files


def read_split(cfg, split: str) -> SplitSource | None:
    """Read data.train_path ('train') or data.eval_path ('eval') into entries; None when unset."""
    d = cfg.data
    path = d.train_path if split == "train" else d.eval_path
    if path is None:
        return None
    kind = source_kind(path)
    if d.format == "text" and kind in ("jsonl", "json"):
        kind = "text"
    table = read_source(path, kind, d.train_split if split == "train" else d.eval_split)
    if d.format == "auto":
        fmt, why = detect_format(table, d.columns)
        how = f"detected format '{fmt}': {why}"
    else:
        fmt, how = d.format, f"format '{d.format}' (data.format)"
    p = Path(path)
    base = p if p.is_dir() else p.parent if p.exists() else Path.cwd()
    ctx = Context(
        source=path, base=base.absolute(),
        image_root=Path(d.image_root).expanduser().absolute() if d.image_root else None,
        extract_dir=data_dir(cfg) / "extracted", stem=f"{split}-{p.stem or p.name}", cfg=d,
    )
    entries = to_entries(table, fmt, ctx)
    note = f"{split}: {path}: {how}; {len(entries)} records"
    return SplitSource(split, path, fmt, note, entries)


def _write_skipped(path: Path, problems: list[tuple[str, Problem]]) -> None:
    with atomic_open(path) as f:
        for split, p in problems:
            f.write(json.dumps({"split": split, **p.to_json()}, ensure_ascii=True) + "\n")


def file_splits(cfg, notes: list[str]) -> Iterator[tuple[str, SplitSource]]:
    """(split, source) for data.train_path and, when set, data.eval_path; appends each source's note."""
    if not cfg.data.train_path:
        raise VlrlcdError("data.task is 'file' but data.train_path is not set")
    for split in ("train", "eval"):
        src = read_split(cfg, split)
        if src is None:
            notes.append("eval: data.eval_path is not set; the held-out split is empty")
            continue
        notes.append(src.note)
        yield split, src


def _load_files(cfg) -> Splits:
    d = cfg.data
    seen: dict[str, str] = {}
    cache: dict[str, str | None] = {}
    records: dict[str, list[Record]] = {"train": [], "eval": []}
    problems: list[tuple[str, Problem]] = []
    notes: list[str] = []
    for split, src in file_splits(cfg, notes):
        good, bad = validate_entries(src.entries, d, seen, stop_at_first=d.on_error == "raise", image_cache=cache)
        if bad and d.on_error == "raise":
            raise VlrlcdError(
                f"{bad[0].message()} -- fix it or set data.on_error=skip "
                "(`vlrlcd data check CONFIG` lists every bad record)"
            )
        records[split] = good
        problems += [(split, p) for p in bad]
    folder = data_dir(cfg)
    skipped = folder / "skipped.jsonl"
    if problems:
        with _locked(folder):
            _write_skipped(skipped, problems)
        notes.append(f"skipped {len(problems)} bad records; each with its reason in {skipped}")
    elif skipped.exists():
        skipped.unlink()
    if not records["train"]:
        extra = f" ({len(problems)} skipped, see {skipped})" if problems else ""
        raise VlrlcdError(f"{d.train_path}: no valid training records{extra}")
    return Splits(records["train"], records["eval"], len(problems), notes)


def load_splits(cfg) -> Splits:
    """Train and held-out records for cfg.data (synthetic generated once, or read and validated)."""
    if cfg.data.task == "file":
        return _load_files(cfg)
    return _load_synthetic(cfg)
