"""`vlrlcd` command line: parses, loads a config, calls one function per sub-command."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from vlrlcd.errors import VlrlcdError
from vlrlcd.threads import apply_thread_policy


def _config(args):
    from vlrlcd.config import load_config

    return load_config(args.config, args.overrides)


def cmd_demo(args) -> int:
    from vlrlcd.demo import run_demo

    run_demo(args.out, args.seed, args.quick, args.overrides, progress=not args.no_progress, task=args.task,
             jobs=args.jobs)
    return 0


def cmd_anchors(args) -> int:
    from vlrlcd.teacher.runner import EXIT_INCOMPLETE, run_anchors

    summary = run_anchors(_config(args), progress=not args.no_progress)
    return 0 if summary.complete else EXIT_INCOMPLETE  # prompts left without an anchor: the summary says why


def cmd_train(args) -> int:
    from vlrlcd.run import run_methods
    from vlrlcd.summary import format_table
    from vlrlcd.training.distributed import setup_distributed
    from vlrlcd.training.interrupts import TrainingInterrupted

    cfg = _config(args)
    dist = setup_distributed(cfg.train.mixed_precision)
    try:
        summary = run_methods(cfg, [cfg.train.objective], dist, args.resume, progress=not args.no_progress,
                              restart=args.restart_stage)
    except TrainingInterrupted as e:
        return _interrupted(e, ["vlrlcd train", args.config, *args.overrides, "--resume"], dist)
    finally:
        dist.close()
    if dist.is_main:
        print(format_table(summary.to_json()))
    return 0


def _interrupted(e, again: list[str], dist) -> int:
    """Say where an interrupted run stopped and the command that continues it; the exit code of a Ctrl-C."""
    if dist.is_main:
        launcher = " (under the same torchrun / accelerate launch)" if dist.multi else ""
        print(f"interrupted: {e.stage} stopped after step {e.step}; checkpoint saved in {e.checkpoint}\n"
              f"continue with{launcher}: {' '.join(again)}", file=sys.stderr)
    return 130


def cmd_eval(args) -> int:
    import json

    from vlrlcd.adapters.loader import load_student
    from vlrlcd.datasets.load import load_splits
    from vlrlcd.evaluation.evaluate import evaluate
    from vlrlcd.files import write_json
    from vlrlcd.student_base import built_student_config

    cfg = _config(args)
    student = load_student(built_student_config(cfg), adapter=args.adapter, trainable=False)
    records = load_splits(cfg).eval
    if not records:
        raise VlrlcdError("the held-out split is empty: set data.eval_path or data.eval_size")
    out = Path(args.out) if args.out else Path(args.adapter).parent
    res = evaluate(student, records, cfg.eval.max_new_tokens, cfg.eval.metric, out, progress=not args.no_progress,
                   batch_size=cfg.eval.batch_size)
    result = res.to_json()
    if args.judge:
        result.update(judge_eval(cfg, records, [p["prediction"] for p in res.predictions]))
        write_json(out / "eval.json", result, indent=2)
    print(json.dumps(result))
    print(f"wrote {out / 'eval.json'} and {out / 'predictions.jsonl'}")
    return 0


def judge_eval(cfg, records, predictions) -> dict:
    """Teacher-judged win rate and length-controlled win rate against the reference answers (or the
    stored anchors where a record has none); judgements are stored, so an evaluation is never paid twice."""
    from vlrlcd.evaluation.metrics import judge_predictions, win_rates
    from vlrlcd.teacher.runner import STORE_NAME, CachedJudge
    from vlrlcd.teacher.store import AnchorStore

    with AnchorStore(Path(cfg.run_dir) / STORE_NAME) as store:
        anchors = store.anchors_for(records, cfg.teacher)
        refs = [r.reference if r.reference is not None else anchors.get(r.id) for r in records]
        keep = [i for i, ref in enumerate(refs) if ref is not None]
        if not keep:
            raise VlrlcdError("no held-out record has a reference or a stored anchor to judge against")
        judge = CachedJudge(cfg.teacher, store)
        recs, preds, refs = [records[i] for i in keep], [predictions[i] for i in keep], [refs[i] for i in keep]
        scores = judge_predictions(recs, preds, refs, judge)
    return {**win_rates(scores, preds, refs), "judge_calls": judge.calls}


def cmd_compare(args) -> int:
    from vlrlcd.compare import format_compare, parse_objectives, run_compare
    from vlrlcd.stage_pool import auto_jobs
    from vlrlcd.training.distributed import setup_distributed
    from vlrlcd.training.interrupts import TrainingInterrupted

    cfg = _config(args)
    dist = setup_distributed(cfg.train.mixed_precision)
    try:
        jobs = auto_jobs(len(parse_objectives(args.objectives)), dist) if args.jobs is None else args.jobs
        result = run_compare(cfg, args.objectives, progress=not args.no_progress, resume=args.resume,
                             restart=args.restart_stage, dist=dist, jobs=jobs)
    except TrainingInterrupted as e:
        again = ["vlrlcd compare", args.config, *args.overrides, "--objectives", args.objectives, "--resume"]
        return _interrupted(e, again, dist)
    finally:
        dist.close()
    if dist.is_main:
        print(format_compare(result))
        print(f"wrote {Path(cfg.run_dir) / 'compare.csv'} and {Path(cfg.run_dir) / 'compare.json'}")
    return 0


def cmd_report(args) -> int:
    from vlrlcd.evaluation.report import write_report

    run = Path(args.run_dir)
    if not run.is_dir():
        raise VlrlcdError(f"{run} is not a run directory")
    print(write_report(run))
    return 0


def cmd_data_check(args) -> int:
    from vlrlcd.datasets.validate import check_data

    summary = check_data(_config(args))
    print(summary)
    return 0 if getattr(summary, "ok", True) else 1


def cmd_plan(args) -> int:
    from vlrlcd.plan import Shapes, format_plan, parse_size, plan_config, plan_json

    cfg = _config(args)
    budget = parse_size(args.gpu_memory)
    try:
        w, h = (int(x) for x in args.image_size.lower().split("x"))
    except ValueError:
        raise VlrlcdError(f"--image-size '{args.image_size}': give WIDTHxHEIGHT in pixels, e.g. 640x480") from None
    shapes = Shapes(prompt_tokens=args.prompt_tokens, response_tokens=cfg.student.max_new_tokens)
    plan, peers = plan_config(cfg, shapes, (w, h), args.image_tokens)
    print(plan_json(plan, peers, budget) if args.json else format_plan(plan, peers, budget))
    return 0


def _jobs(value: str) -> int | None:
    if value == "auto":
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"'{value}': give a number of methods >= 1, or auto")
    return n


def _jobs_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", type=_jobs, default=None, metavar="N",
                        help="stage-II methods trained at once, one process each, with the numbers of a "
                             "sequential run (default auto: one per free CPU core at torch's thread count; 1 "
                             "with a CUDA device or under torchrun / accelerate)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlrlcd", description="RL capability distillation for small VLM / text students")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="the end-to-end CPU demo on embedded defaults")
    d.add_argument("--task", default="vqa", choices=("vqa", "captions", "text"),
                   help="shapes VQA (default; exact match), shapes captions (objects named with the right colour) "
                        "or arithmetic with a tiny text student (exact match)")
    d.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quick", action="store_true", help="a smaller run (under 2 minutes)")
    d.add_argument("--no-progress", action="store_true")
    _jobs_argument(d)
    d.add_argument("overrides", nargs="*", help="key.sub=value overrides of the demo recipe")
    d.set_defaults(func=cmd_demo)

    def with_config(sp):
        sp.add_argument("config", help="a YAML recipe (see configs/)")
        sp.add_argument("overrides", nargs="*", help="key.sub=value overrides")
        sp.add_argument("--no-progress", action="store_true")
        return sp

    with_config(sub.add_parser("anchors", help="ask the teacher once per prompt and store the answers")).set_defaults(func=cmd_anchors)
    t = with_config(sub.add_parser("train", help="SFT then the configured RL objective"))
    t.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint (finished stages are reused; pass the same "
                        "config and overrides)")
    t.add_argument("--restart-stage", metavar="STAGE", default=None,
                   help="with --resume (implied): train STAGE again (sft: and every stage after it)")
    t.set_defaults(func=cmd_train)
    e = with_config(sub.add_parser("eval", help="evaluate an adapter on the held-out split"))
    e.add_argument("--adapter", required=True, help="a saved adapter directory")
    e.add_argument("--out", default=None, help="where eval.json goes (default: beside the adapter)")
    e.add_argument("--judge", action="store_true",
                   help="also ask the teacher to judge each prediction against the reference (stored, paid once)")
    e.set_defaults(func=cmd_eval)
    c = with_config(sub.add_parser("compare", help="several stage-II objectives from one SFT start: one table"))
    c.add_argument("--objectives", required=True,
                   help="comma-separated, e.g. sft2,single_pair_dpo,anchor_rank_dpo,ldl_grpo")
    c.add_argument("--resume", action="store_true", help="reuse finished stages, continue unfinished ones")
    c.add_argument("--restart-stage", metavar="STAGE", default=None,
                   help="with --resume (implied): train STAGE again (sft: and every objective)")
    _jobs_argument(c)
    c.set_defaults(func=cmd_compare)
    r = sub.add_parser("report", help="write RUN_DIR/report.html")
    r.add_argument("run_dir")
    r.set_defaults(func=cmd_report)
    pl = with_config(sub.add_parser("plan", help="where peak GPU memory goes in one RL step, before anything is loaded"))
    pl.add_argument("--gpu-memory", default="24GB", help="the card to plan for (default 24GB)")
    pl.add_argument("--prompt-tokens", type=int, default=48, help="text tokens per prompt, chat template included")
    pl.add_argument("--image-tokens", type=int, default=None, help="image tokens per prompt (default: from the config)")
    pl.add_argument("--image-size", default="640x480", help="WIDTHxHEIGHT of the images (Qwen2-VL / Qwen2.5-VL)")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.set_defaults(func=cmd_plan)
    data = sub.add_parser("data", help="data tools")
    dsub = data.add_subparsers(dest="data_command", required=True)
    with_config(dsub.add_parser("check", help="validate every record and print a summary")).set_defaults(func=cmd_data_check)
    return p


def _quiet_deepspeed() -> None:
    """transformers imports DeepSpeed whenever it is installed; on a machine without a GPU, DeepSpeed then
    warns on every command that it fell back to the CPU. Tell it so up front (a launcher's choice wins)."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_deepspeed()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also come after options (`vlrlcd train CONFIG --resume train.lr=1e-4`)
    bad = [x for x in extra if x.startswith("-") or "=" not in x]
    if bad or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    apply_thread_policy(announce=args.command not in ("report", "data", "plan"))  # the policy: vlrlcd/threads.py
    try:
        return args.func(args)
    except VlrlcdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
