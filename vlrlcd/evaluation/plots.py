"""Training curves of a run: RUN/curves.png with loss, mean margin, KL and the held-out metric."""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vlrlcd.errors import VlrlcdError
from vlrlcd.files import atomic_open
from vlrlcd.evaluation.rundir import method_names, read_json, read_rows

CURVE_KEYS = (("loss", "loss"), ("margin_mean", "mean margin r"), ("kl", "KL to SFT policy"),
              ("diag_right", "share of samples right (train prompts)"),
              ("diag_auroc", "AUROC of r_k, right vs wrong (train prompts)"))


def _number(v) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def global_steps(rows: list[dict]) -> list[float]:
    """x positions: `step` within a stage, the later stage shifted past the earlier one's last step
    (SFT steps 1..10 then RL steps 1..5 -> 1..15); rows without a step count on from the last."""
    xs: list[float] = []
    offset, last, stage = 0.0, 0.0, None
    for r in rows:
        if stage is not None and r.get("stage") != stage:
            offset = last
        stage = r.get("stage")
        s = _number(r.get("step"))
        x = offset + s if s is not None else last + 1
        xs.append(x)
        last = max(last, x)
    return xs


def held_out(run_dir: Path, method: str, summary: dict | None) -> tuple[str, float] | None:
    """(metric name, value) from RUN/<method>/eval.json, else from summary.json's methods table."""
    ev, _ = read_json(run_dir / method / "eval.json")
    if ev is not None and _number(ev.get("value")) is not None:
        return str(ev.get("metric", "metric")), float(ev["value"])
    row = ((summary or {}).get("methods") or {}).get(method)
    if isinstance(row, dict):
        for k in ("accuracy", "exact_match", "caption_attributes", "value", "win_rate"):
            if _number(row.get(k)) is not None:
                return k, float(row[k])
    return None


def write_curves(run_dir: str | Path) -> Path:
    """Draw RUN/curves.png (Agg, no pyplot state): one line per method for loss, mean margin, KL and the
    ranking diagnostics (training/diagnostics.py) against the optimizer step (dashed: SFT stage), and bars of the held-out metric per method.
    Missing pieces show as "no data" in their panel."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise VlrlcdError(f"run directory {run_dir} does not exist; train first (vlrlcd train CONFIG)")
    summary, _ = read_json(run_dir / "summary.json")
    methods = method_names(run_dir, summary)
    fig = Figure(figsize=(15, 7.5), dpi=90, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3).ravel()
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    rows_by_method = {m: read_rows(run_dir / m / "metrics.jsonl").rows for m in methods}

    for ax, (key, title) in zip(axes[:len(CURVE_KEYS)], CURVE_KEYS):
        drawn = False
        for m in methods:
            rows = rows_by_method[m]
            xs = global_steps(rows)
            for stage, style in (("sft", "--"), (None, "-")):
                pts = [(x, _number(r.get(key))) for x, r in zip(xs, rows)
                       if (r.get("stage") == "sft") == (stage == "sft")]
                pts = [(x, y) for x, y in pts if y is not None]
                if not pts:
                    continue
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=colours[m],
                        marker="." if len(pts) < 30 else None,
                        label=m)
                drawn = True
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        if drawn:
            handles, labels = ax.get_legend_handles_labels()
            uniq = dict(zip(labels, handles))
            ax.legend(uniq.values(), uniq.keys(), fontsize=8)
            ax.grid(alpha=0.3)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")

    ax = axes[len(CURVE_KEYS)]
    vals = [(m, held_out(run_dir, m, summary)) for m in methods]
    vals = [(m, v) for m, v in vals if v is not None]
    if vals:
        names = sorted({v[0] for _, v in vals})
        ax.bar(range(len(vals)), [v[1] for _, v in vals], color=[colours[m] for m, _ in vals])
        ax.set_xticks(range(len(vals)), [m for m, _ in vals], rotation=20, fontsize=8)
        for i, (_, v) in enumerate(vals):
            ax.text(i, v[1], f"{v[1]:.3g}", ha="center", va="bottom", fontsize=8)
        ax.set_title("held-out " + " / ".join(names))
        ax.grid(alpha=0.3, axis="y")
    else:
        ax.set_title("held-out metric")
        ax.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=ax.transAxes,
                color="gray")
    fig.suptitle(f"vlrlcd run {run_dir.name} (dashed: SFT stage)")
    out = run_dir / "curves.png"
    with atomic_open(out, "wb", fsync=False) as f:
        fig.savefig(f, format="png")
    return out
