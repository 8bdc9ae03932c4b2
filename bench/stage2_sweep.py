"""Stage-II sweeps from one SFT start: `python -m bench.stage2_sweep [--task T] --seed S --out DIR --name NAME key=value ...`.

Prepares the demo recipe (with `--task`), reuses DIR's finished SFT stage (trains it once), runs stage II with
the overrides into DIR/sweep/NAME, then greedy-evaluates SFT and the new policy on the held-out split and
on training prompts, and prints one JSON line: held-out scores with the paired bootstrap interval of the
difference, training-prompt greedy scores, and the ranking diagnostics (first vs last quarter of stage II).
For measuring the method only: the overrides must not touch stage I (its adapter is reused).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def greedy_scores(student, records, max_new_tokens: int, batch: int = 32) -> list[float]:
    """Greedy answers (batched decode) scored with each record's metric."""
    from vlrlcd.evaluation.metrics import score_record

    student.model.eval()
    out: list[float] = []
    for i in range(0, len(records), batch):
        chunk = records[i:i + batch]
        prefixes = [student.prefix(r.prompt, r.image) for r in chunk]
        seqs = student.sample_batch(prefixes, 1, max_new_tokens, 0.0)
        out += [score_record(r, student.decode(s[0])) for r, s in zip(chunk, seqs)]
    return out


def paired(a: list[float], b: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """mean(b − a) and its percentile bootstrap 95% interval over resampled prompts."""
    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(1)
    return float(d.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def quarter_means(rows: list[dict], key: str) -> tuple[float | None, float | None]:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    if not vals:
        return None, None
    q = max(1, len(vals) // 4)
    return round(float(np.mean(vals[:q])), 3), round(float(np.mean(vals[-q:])), 3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--out", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--task", default="vqa", help="the demo task whose recipe to use (vqa | captions | text)")
    ap.add_argument("--train-eval", type=int, default=256, help="training prompts to greedy-evaluate")
    ap.add_argument("--oracle-anchors", action="store_true",
                    help="diagnostic only: stage II ranks against each training record's reference instead of its "
                         "stored anchor (separates the anchors' noise from the objective; never a method)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from vlrlcd.adapters.loader import load_student
    from vlrlcd.demo import demo_config
    from vlrlcd.pipeline import prepare, run_sft, stage_record
    from vlrlcd.run import build_base
    from vlrlcd.student_base import built_student_config
    from vlrlcd.training.rl import train_rl
    from vlrlcd.training.steps import make_context

    t0 = time.time()
    cfg = demo_config(args.out, args.seed, False, args.overrides, task=args.task)
    prep = prepare(cfg, progress=False)
    build_base(prep, None, fresh=stage_record(Path(cfg.run_dir) / "sft") is None)
    sft_adapter, _ = run_sft(prep, progress=False, resume=True)
    out = Path(args.out) / "sweep" / args.name
    scfg = built_student_config(cfg)
    cache = Path(args.out) / "sweep" / "sft_scores.json"
    base = json.loads(cache.read_text()) if cache.exists() else None
    if base is None or len(base["eval"]) != len(prep.eval):
        sft = load_student(scfg, adapter=sft_adapter)
        base = {"eval": greedy_scores(sft, prep.eval, cfg.eval.max_new_tokens),
                "train": greedy_scores(sft, prep.train[: args.train_eval], cfg.eval.max_new_tokens)}
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(base))
        del sft
    student = load_student(scfg, adapter=sft_adapter, reference=sft_adapter)
    ctx = make_context(cfg, cfg.train)
    t1 = time.time()
    anchors = ({r.id: r.reference for r in prep.train if r.reference} if args.oracle_anchors else prep.anchors)
    rows = train_rl(student, prep.train, anchors, cfg.train, cfg.ranking, cfg.student.max_new_tokens, out,
                    cfg.seed, prep.teacher_calls, progress=False, ctx=ctx)
    rl_seconds = time.time() - t1
    ev = greedy_scores(student, prep.eval, cfg.eval.max_new_tokens)
    tr = greedy_scores(student, prep.train[: args.train_eval], cfg.eval.max_new_tokens)
    d, lo, hi = paired(base["eval"], ev)
    res = {"name": args.name, "seed": args.seed, "overrides": args.overrides,
           **({"oracle_anchors": True} if args.oracle_anchors else {}),
           "sft": round(float(np.mean(base["eval"])), 4), "rl": round(float(np.mean(ev)), 4),
           "diff": round(d, 4), "ci": [round(lo, 4), round(hi, 4)],
           "train_sft": round(float(np.mean(base["train"])), 4), "train_rl": round(float(np.mean(tr)), 4),
           **{k: quarter_means(rows, k) for k in ("diag_right", "diag_d_right", "diag_auroc", "kl", "loss")},
           "rl_seconds": round(rl_seconds, 1), "seconds": round(time.time() - t0, 1)}
    line = json.dumps(res)
    print(line, flush=True)
    with open(Path(args.out) / "sweep" / "results.jsonl", "a", encoding="utf-8") as f:
        f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
