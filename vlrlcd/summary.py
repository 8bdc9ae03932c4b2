"""RUN/summary.json: one schema for `vlrlcd train`, `demo` and `compare` (what `report`, the demo's table
and bench/seeds_table.py read). `methods` maps each finished method to its held-out metrics as its stage
returned them ({metric: value, "n", "train_<metric>"?, "seconds"}), plus its paired bootstrap difference
against SFT (diff_vs_sft, diff_low, diff_high, diff_n) where both predictions files exist."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from vlrlcd.files import write_json


@dataclass
class Summary:
    """What one run of `run.run_methods` produced."""

    methods: dict[str, dict]               # method -> held-out metrics (finished methods only)
    teacher_calls: int                     # teacher calls made by this run
    anchors_stored: int
    anchor_calls: int                      # what the anchors cost: one call per distinct prompt with an anchor
    train_prompts: int
    distinct_train_prompts: int
    eval_prompts: int
    chance: float | None                   # held-out chance level of the task (evaluation/chance.py)
    anchor_train_score: float | None       # the anchors' own score on the training prompts
    seed: int
    seconds: float = 0.0                   # wall time of the run
    processes: int = 1
    errors: dict[str, str] = field(default_factory=dict)  # method -> the user error that stopped it
    task: str | None = None                # the demo task (None outside `vlrlcd demo`)
    quick: bool | None = None              # `vlrlcd demo --quick`
    paired_bootstrap: dict | None = None   # how the differences against SFT were computed (write_summary)

    def to_json(self) -> dict:
        return asdict(self)

    def write(self, run_dir: str | Path) -> dict:
        """Write RUN/summary.json (with the differences against SFT); returns what was written."""
        written = self.to_json()
        write_summary(run_dir, written)
        self.methods, self.paired_bootstrap = written["methods"], written["paired_bootstrap"]
        return written


def write_summary(run_dir: str | Path, summary: dict) -> Path:
    """Write RUN/summary.json. Every method other than sft whose RUN/<method>/predictions.jsonl and
    RUN/sft/predictions.jsonl both exist gets (in `summary`, in place) its paired bootstrap difference
    against SFT on the prompts both answered: diff_vs_sft, diff_low, diff_high (95% interval), diff_n."""
    from vlrlcd.evaluation.stats import DIFF_KEYS, LEVEL, REFERENCE, RESAMPLES, SEED, diff_entry, diff_vs_reference

    methods = summary.get("methods") if isinstance(summary.get("methods"), dict) else {}
    for name, entry in methods.items():
        if not isinstance(entry, dict) or name == REFERENCE:
            continue
        for k in DIFF_KEYS:  # never keep a difference from files that are gone
            entry.pop(k, None)
        d = diff_vs_reference(run_dir, name)
        if d is not None:
            entry.update(diff_entry(d))
    summary["paired_bootstrap"] = {"reference": REFERENCE, "resamples": RESAMPLES, "seed": SEED, "level": LEVEL}
    path = Path(run_dir) / "summary.json"
    write_json(path, summary, indent=2)
    return path


def format_table(summary: dict) -> str:
    """The summary as a small text table: one row per method, with its difference to SFT and the paired
    bootstrap 95% interval where `write_summary` computed one."""
    from vlrlcd.evaluation.stats import DIFF_KEYS, entry_diff

    methods = summary.get("methods", {})
    metric_names = sorted({k for m in methods.values() for k in m if k not in ("n", "seconds", *DIFF_KEYS)})
    diffs = {name: entry_diff(m) for name, m in methods.items()}
    with_diff = any(diffs.values())
    header = ["method"] + metric_names + (["Δ vs SFT [95% CI]"] if with_diff else []) + ["seconds"]

    def num(v, fmt: str) -> str:
        return fmt.format(v) if isinstance(v, (int, float)) else "-"

    rows = [[name] + [num(m.get(k), "{:.3f}") for k in metric_names] + ([diffs[name] or "-"] if with_diff else [])
            + [num(m.get("seconds"), "{:.0f}")] for name, m in methods.items()]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))
    out = [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    if with_diff:
        boot = summary.get("paired_bootstrap", {})
        out.append(f"Δ vs SFT: mean per-prompt score difference on the held-out prompts both answered, "
                   f"paired bootstrap {boot.get('resamples', '?')} resamples (seed {boot.get('seed', '?')})")
    out.append(f"teacher calls this run: {summary.get('teacher_calls')}  |  train prompts: "
               f"{summary.get('train_prompts')}  |  held-out prompts: {summary.get('eval_prompts')}  |  "
               f"{summary.get('seconds', 0):.0f}s")
    return "\n".join(out)
