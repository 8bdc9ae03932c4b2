"""`vlrlcd data check CONFIG`: validate every record of the configured data and summarise."""

from __future__ import annotations

from dataclasses import dataclass, field

from vlrlcd.datasets.checks import validate_entries
from vlrlcd.datasets.load import data_dir, file_splits, load_splits
from vlrlcd.datasets.records import Entry, Problem


@dataclass
class SplitCheck:
    split: str
    source: str
    format: str
    records: int
    valid: int
    with_image: int
    with_reference: int
    problems: list[Problem] = field(default_factory=list)

    def unusable(self) -> str | None:
        """Why a run could not use this split at all (a training split without one valid record), else None."""
        if self.split != "train" or self.valid:
            return None
        if not self.records:
            return f"the training split {self.source} holds no records; a run needs at least one"
        return f"none of the {self.records} training records in {self.source} is valid; a run would stop"


@dataclass
class DataCheckSummary:
    task: str
    on_error: str
    splits: list[SplitCheck]
    notes: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[Problem]:
        return [p for s in self.splits for p in s.problems]

    @property
    def unusable(self) -> list[str]:
        return [u for s in self.splits if (u := s.unusable()) is not None]

    @property
    def ok(self) -> bool:
        return not self.problems and not self.unusable

    def format(self, max_listed: int = 20) -> str:
        lines = [f"data check: task {self.task}, on_error={self.on_error}"]
        lines += [f"  {n}" for n in self.notes]
        for s in self.splits:
            lines.append(
                f"  {s.split:<5} {s.source} [{s.format}]: {s.records} records, {s.valid} valid "
                f"({s.with_image} with image, {s.with_reference} with reference), {len(s.problems)} bad"
            )
        probs = self.problems
        if probs:
            lines.append(f"bad records ({len(probs)}):")
            lines += [f"  {p.message()}" for p in probs[:max_listed]]
            if len(probs) > max_listed:
                lines.append(f"  ... and {len(probs) - max_listed} more")
        if self.unusable:
            lines.append(f"result: not usable: {'; '.join(self.unusable)}")
        elif probs:
            what = ("a run would stop at the first one; fix them or set data.on_error=skip"
                    if self.on_error == "raise" else "a run would skip them and list them in skipped.jsonl")
            lines.append(f"result: {len(probs)} bad records; {what}")
        else:
            lines.append("result: OK, every record is valid")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _split_check(split: str, source: str, fmt: str, entries: list[Entry], cfg, seen, cache) -> SplitCheck:
    good, bad = validate_entries(entries, cfg.data, seen, image_cache=cache)
    return SplitCheck(
        split, source, fmt, len(entries), len(good),
        sum(r.image is not None for r in good), sum(r.reference is not None for r in good), bad,
    )


def check_data(cfg) -> DataCheckSummary:
    """Read and validate every record (all problems listed, whatever data.on_error says); no teacher, no model."""
    seen: dict[str, str] = {}
    cache: dict[str, str | None] = {}
    splits, notes = [], []
    if cfg.data.task != "file":
        loaded = load_splits(cfg)
        notes += loaded.notes
        folder = data_dir(cfg)
        for split, recs in (("train", loaded.train), ("eval", loaded.eval)):
            path = folder / f"{split}.jsonl"
            entries = [Entry(f"{path}:{i + 1}", record=r) for i, r in enumerate(recs)]
            splits.append(_split_check(split, str(path), cfg.data.task, entries, cfg, seen, cache))
    else:
        for split, src in file_splits(cfg, notes):
            splits.append(_split_check(split, src.source, src.format, src.entries, cfg, seen, cache))
    return DataCheckSummary(cfg.data.task, cfg.data.on_error, splits, notes)
