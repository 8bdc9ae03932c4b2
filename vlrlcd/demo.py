"""`vlrlcd demo`: the whole method on CPU on embedded defaults, nothing downloaded.

synthetic shapes VQA -> oracle-teacher anchors (stored) -> SFT of a tiny LLaVA student -> K candidates
per prompt -> ranking core -> LDL-GRPO -> held-out evaluation -> summary table and report.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from vlrlcd.config import Config, apply_overrides, from_dict
from vlrlcd.pipeline import format_table, prepare, run_rl, run_sft, write_summary

QUICK = [
    "data.train_size=48", "data.eval_size=32", "student.tiny.pretrain_examples=256", "train.sft_epochs=3",
    "train.rl_steps=4", "train.batch_size=4", "train.k=4", "student.tiny.num_layers=2",
]
# Stage II methods the demo compares, all from the same SFT start (DESIGN.md's methods table).
METHODS = ("sft2", "single_pair_dpo", "anchor_rank_dpo", "ldl_grpo")


def demo_config(out: str | Path, seed: int = 0, quick: bool = False, overrides: list[str] | None = None) -> Config:
    """The embedded demo recipe with the output directory, seed, --quick sizes and overrides applied."""
    import yaml

    raw = yaml.safe_load(resources.files("vlrlcd").joinpath("configs/demo.yaml").read_text(encoding="utf-8"))
    extra = (QUICK if quick else []) + [f"run_dir={out}", f"seed={seed}", f"data.seed={seed}",
                                        f"teacher.seed={seed}"] + list(overrides or [])
    return from_dict(Config, apply_overrides(raw, extra))


def run_demo(out: str | Path = "runs/demo", seed: int = 0, quick: bool = False,
             overrides: list[str] | None = None, progress: bool = True) -> dict:
    """Run the demo end to end; writes OUT/summary.json (and the report) and returns the summary."""
    t0 = time.time()
    cfg = demo_config(out, seed, quick, overrides)
    prep = prepare(cfg, progress)
    sft_adapter, sft_metrics = run_sft(prep, progress=progress)
    methods = {"sft": sft_metrics}
    for objective in (("ldl_grpo",) if quick else METHODS):
        _, methods[objective] = run_rl(prep, sft_adapter, objective, progress=progress)
    summary = {
        "methods": methods,
        "teacher_calls": prep.teacher_calls,
        "anchors_stored": prep.anchors_stored,
        "train_prompts": len(prep.train),
        "distinct_train_prompts": prep.distinct_prompts,
        "eval_prompts": len(prep.eval),
        "seed": seed,
        "quick": quick,
        "seconds": round(time.time() - t0, 1),
    }
    write_summary(cfg.run_dir, summary)
    print(format_table(summary), flush=True)
    try:
        from vlrlcd.evaluation.report import write_report

        print(f"report: {write_report(cfg.run_dir)}", flush=True)
    except ImportError:  # pragma: no cover - the report module ships with the package
        pass
    return summary
