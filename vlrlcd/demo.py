"""`vlrlcd demo`: the whole method on CPU on embedded defaults, nothing downloaded.

synthetic task -> oracle-teacher anchors (stored) -> SFT of a tiny student -> K candidates per prompt ->
ranking core -> stage II -> held-out evaluation beside the task's chance level -> summary table and report.

Three tasks, one API (`--task`): shapes VQA (exact match, a tiny LLaVA), shapes captions (objects named with
the right colour, a tiny LLaVA) and arithmetic (exact match, a tiny text student); each has its recipe in
vlrlcd/configs/.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from vlrlcd.config import Config, apply_overrides, from_dict
from vlrlcd.errors import VlrlcdError
from vlrlcd.summary import format_table

# Each task's embedded recipe (vlrlcd/configs/).
RECIPES = {"vqa": "demo.yaml", "captions": "demo_captions.yaml", "text": "demo_text.yaml"}
TASKS = tuple(RECIPES)
# --quick: smaller data and a shorter SFT per task (a 2-layer LLaVA at twice the learning rate), so that a run
# takes about a minute on one thread and SFT still ends well above chance; stage II takes 4 small steps
# (tests/test_demo.py holds every task to that).
_QUICK_RL = ["train.rl_steps=4", "train.batch_size=4", "train.k=4"]
QUICK = {
    "vqa": ["data.train_size=256", "data.eval_size=128", "student.tiny.pretrain_examples=1024",
            "student.tiny.num_layers=2", "train.sft_epochs=10", "train.sft_lr=0.004", "train.sft_copy_pairs=1",
            *_QUICK_RL],
    "captions": ["data.train_size=256", "data.eval_size=64", "student.tiny.pretrain_examples=2048",
                 "student.tiny.num_layers=2", "train.sft_epochs=10", "train.sft_lr=0.004",
                 "train.sft_copy_pairs=1", *_QUICK_RL],
    "text": ["data.train_size=256", "data.eval_size=128", "train.sft_epochs=48", *_QUICK_RL],
}
# Stage II methods the demo compares, all from the same SFT start (README, Methods).
METHODS = ("sft2", "single_pair_dpo", "anchor_rank_dpo", "ldl_grpo")


def recipe(task: str) -> dict:
    """The embedded recipe of a demo task, as a raw nested dict."""
    import yaml

    if task not in RECIPES:
        raise VlrlcdError(f"unknown demo task '{task}'; choose one of {', '.join(TASKS)}")
    text = resources.files("vlrlcd").joinpath(f"configs/{RECIPES[task]}").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def demo_config(out: str | Path, seed: int = 0, quick: bool = False, overrides: list[str] | None = None,
                task: str = "vqa") -> Config:
    """A task's embedded demo recipe with the output directory, seed, --quick sizes and overrides applied."""
    raw = recipe(task)
    extra = (QUICK[task] if quick else []) + [f"run_dir={out}", f"seed={seed}", f"data.seed={seed}",
                                              f"teacher.seed={seed}"] + list(overrides or [])
    return from_dict(Config, apply_overrides(raw, extra))


def run_demo(out: str | Path = "runs/demo", seed: int = 0, quick: bool = False,
             overrides: list[str] | None = None, progress: bool = True, task: str = "vqa",
             jobs: int | None = None) -> dict:
    """Run one demo task end to end (`run.run_methods`); writes OUT/summary.json and the report, prints the
    table beside the chance level, and returns the summary as written. The stage-II methods train `jobs` at a
    time (default `stage_pool.auto_jobs`: one per free core), with the numbers of a sequential run."""
    from vlrlcd.run import run_methods
    from vlrlcd.stage_pool import auto_jobs

    cfg = demo_config(out, seed, quick, overrides, task)
    methods = ["ldl_grpo"] if quick else list(METHODS)
    summary = run_methods(cfg, methods, progress=progress, task=task, quick=quick,
                          jobs=auto_jobs(len(methods)) if jobs is None else jobs).to_json()   # as written
    print(format_table(summary), flush=True)
    print(f"chance level ({task}: the best input-blind constant answer per question type, chosen on the "
          f"training split): {summary['chance']:.3f}" if summary["chance"] is not None else "chance level: -",
          flush=True)
    if summary["anchor_train_score"] is not None:
        sft = summary["methods"]["sft"]
        train_key = next((k for k in sft if k.startswith("train_") and isinstance(sft[k], float)), None)
        beside = f"; SFT's greedy answers there: {sft[train_key]:.3f}" if train_key else ""
        print(f"teacher anchors on the training prompts (the most stage II can get from agreeing with them): "
              f"{summary['anchor_train_score']:.3f}{beside}", flush=True)
    from vlrlcd.evaluation.report import write_report

    print(f"report: {write_report(cfg.run_dir)}", flush=True)
    return summary
