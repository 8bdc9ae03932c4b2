"""Batched greedy evaluation vs one prompt at a time, measured interleaved in one process on the demo student.

    python -m bench.eval_speed [--run RUN_DIR] [--n 128] [--batch 32] [--reps 5] [--threads 1] [--out PATH]

The student is the demo's tiny LLaVA (vlrlcd/configs/demo.yaml), built the way `vlrlcd demo` builds it: the
demo's data, oracle anchors and tiny base pretrained on captions (`pipeline.prepare`, `student_base.build_student_base`, `pipeline.run_sft`), then
its SFT adapter, so answers end at EOS as a trained student's do (a random student runs every answer to the
token limit, which flatters batching). Without --run the demo recipe runs with --quick's data and training
sizes (about a minute) but the recipe's own architecture; --run takes a finished demo run directory instead
(its student_base-tiny-llava and sft/adapter, and its held-out prompts).

A = `StudentAdapter.generate(records, eval.max_new_tokens, batch_size=1)` (one prompt at a time: its prefix,
its vision pass, its decode), B = the same call with batch_size = --batch (prefixes built together with one
vision pass, one batched decode). They alternate A B A B ... over the same N held-out prompts; the first pair
is a warm-up and dropped. Reported: the median over pairs of the per-prompt time ratio A_i / B_i (the
speed-up) with its min-max, both times per prompt, whether every answer of B equals A's, and B's time split
into building the prefixes and decoding.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def demo_student(work: Path, run: Path | None, n: int):
    """(student with the demo's SFT adapter, in eval mode; n held-out records; max new tokens)."""
    from vlrlcd.adapters.loader import load_student
    from vlrlcd.demo import QUICK, demo_config
    from vlrlcd.pipeline import prepare, run_sft
    from vlrlcd.student_base import build_student_base

    if run is not None:
        from vlrlcd.config import load_config

        cfg = load_config(str(run / "config.yaml"), [f"run_dir={run}"])
        prep = prepare(cfg, progress=False)
        adapter = run / "sft" / "adapter"
    else:  # the demo recipe at --quick's data and training sizes, its own architecture (4 layers)
        quick = [o for o in QUICK["vqa"] if not o.startswith(("student.tiny.num_layers", "train.rl"))]
        cfg = demo_config(work / "demo", quick=False, overrides=quick + [f"data.eval_size={n}"])
        prep = prepare(cfg, progress=False)
        build_student_base(prep, rebuild_stale=True)
        adapter, _ = run_sft(prep, progress=False)
    student = load_student(build_student_base(prep), adapter=adapter)
    student.model.eval()
    records = prep.eval[:n]
    if len(records) < n:
        print(f"note: the run has {len(records)} held-out prompts, fewer than --n {n}", file=sys.stderr)
    return student, records, cfg.eval.max_new_tokens


def split_batched(student, records, max_new_tokens: int, batch: int) -> dict[str, float]:
    """B's seconds per prompt in building prefixes and in decoding (the two halves of `generate`)."""
    import torch

    build = decode = 0.0
    with torch.no_grad():
        for start in range(0, len(records), batch):
            chunk = records[start:start + batch]
            t0 = time.perf_counter()
            prefixes = student.prefixes([r.prompt for r in chunk], [r.image for r in chunk])
            t1 = time.perf_counter()
            student.sample_batch(prefixes, 1, max_new_tokens, temperature=0.0)
            decode += time.perf_counter() - t1
            build += t1 - t0
    return {"prefixes_ms": round(1e3 * build / len(records), 3), "decode_ms": round(1e3 * decode / len(records), 3)}


def measure(student, records, max_new_tokens: int, batch: int, reps: int, warmup: int = 1) -> dict:
    """A (batch 1) and B (batch `batch`) alternated `warmup + reps` times; per-prompt times and their ratios."""
    n = len(records)
    one, batched, same = [], [], True
    for rep in range(warmup + reps):
        t0 = time.perf_counter()
        a = student.generate(records, max_new_tokens, batch_size=1)
        t1 = time.perf_counter()
        b = student.generate(records, max_new_tokens, batch_size=batch)
        t2 = time.perf_counter()
        same = same and a == b
        if rep >= warmup:
            one.append((t1 - t0) / n)
            batched.append((t2 - t1) / n)
    ratios = [x / y for x, y in zip(one, batched)]
    return {"n": n, "batch": batch, "max_new_tokens": max_new_tokens, "reps": reps,
            "one_ms": round(1e3 * statistics.median(one), 3), "batched_ms": round(1e3 * statistics.median(batched), 3),
            "speedup_median": round(statistics.median(ratios), 2), "speedup_min": round(min(ratios), 2),
            "speedup_max": round(max(ratios), 2), "same_answers": same,
            "answer_tokens_mean": round(sum(len(student.tokenizer(x)["input_ids"]) for x in a) / n, 2),
            **split_batched(student, records, max_new_tokens, batch)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.eval_speed", description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=None, help="a finished demo run directory (default: build one)")
    p.add_argument("--n", type=int, default=128, help="held-out prompts (default 128)")
    p.add_argument("--batch", type=int, default=32, help="eval.batch_size of B (default 32)")
    p.add_argument("--reps", type=int, default=5, help="measured A/B pairs (default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    a = p.parse_args(argv)
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix="vlrlcd-eval-speed-") as work:
        t0 = time.perf_counter()
        student, records, max_new = demo_student(Path(work), a.run, a.n)
        built = time.perf_counter() - t0
        res = measure(student, records, max_new, a.batch, a.reps)
    res.update(student=str(a.run) if a.run else "demo recipe, --quick sizes, built here", build_s=round(built, 1),
               threads=a.threads)
    print(f"eval speed ({res['student']}): one at a time {res['one_ms']:.2f} ms/prompt, batch {a.batch} "
          f"{res['batched_ms']:.2f} ms/prompt (prefixes {res['prefixes_ms']:.2f} + decode {res['decode_ms']:.2f}); "
          f"speed-up {res['speedup_median']:.2f}x [{res['speedup_min']:.2f}, {res['speedup_max']:.2f}] over "
          f"{a.reps} pairs, N {res['n']}, same answers: {res['same_answers']}", flush=True)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    return res


if __name__ == "__main__":
    main()
