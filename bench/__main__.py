"""`python -m bench` (= `make bench`): vlrlcd vs TRL side by side in one run; table printed and written to
bench/results.json (and results.md). `--quick` is a smoke run of the same machinery in about a minute."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent


def machine(threads: int) -> dict:
    import peft
    import torch
    import transformers
    import trl

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": threads, "os": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__, "peft": peft.__version__, "load_average": [round(x, 2) for x in os.getloadavg()]}
    info["line"] = (f"{cpu}, {info['cores']} cores, torch threads {threads}, fp32, Python {info['python']}, "
                    f"torch {info['torch']}, transformers {info['transformers']}, trl {info['trl']}, "
                    f"peft {info['peft']}; load average at start {info['load_average'][0]}")
    return info


def parse(argv: list[str] | None) -> argparse.Namespace:
    from bench.models import CONFIGS, DEFAULT_CONFIGS

    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: small sizes, 1 repetition, ~1 minute")
    p.add_argument("--configs", default=None, help=f"comma list of {', '.join(CONFIGS)} "
                                                   f"(default {','.join(DEFAULT_CONFIGS)})")
    p.add_argument("--ks", default=None, help="comma list of K (default 4,8,16)")
    p.add_argument("--batch", type=int, default=None, help="prompts per step (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="max completion length (default 16)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up pairs dropped (default 1)")
    p.add_argument("--reps", type=int, default=None, help="measured A/B pairs per row (default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see bench/README.md)")
    p.add_argument("--budget-s", type=float, default=1000,
                   help="start no further step-time row after this many seconds (default 1000: make bench < 20 min)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-teacher", action="store_true")
    p.add_argument("--no-eval", action="store_true", help="skip the batched-evaluation row (bench/eval_speed.py)")
    p.add_argument("--out", default=None, help="results JSON (default bench/results.json; --quick: a temp file)")
    a = p.parse_args(argv)
    quick = a.quick
    a.configs = (a.configs or ("llava,text" if quick else ",".join(DEFAULT_CONFIGS))).split(",")
    for c in a.configs:
        if c not in CONFIGS:
            p.error(f"unknown config {c}; one of {', '.join(CONFIGS)}")
    a.ks = [int(k) for k in (a.ks or ("2" if quick else "4,8,16")).split(",")]
    a.batch = a.batch or (2 if quick else 4)
    a.max_new_tokens = a.max_new_tokens or (4 if quick else 16)
    a.warmup = a.warmup if a.warmup is not None else (0 if quick else 1)
    a.reps = a.reps or (1 if quick else 5)
    return a


def main(argv: list[str] | None = None) -> dict:
    a = parse(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    import torch
    import transformers

    from bench import memory, step_time, teacher_calls
    from bench.models import CONFIGS, build, build_text_100m, build_text_small
    from bench.table import report

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    cmd = "python -m bench" + ("" if argv is None and len(sys.argv) <= 1 else " " + shlex.join(argv if argv is not None else sys.argv[1:]))
    results: dict = {"command": cmd, "machine": machine(a.threads),
                     "settings": {"batch": a.batch, "max_new_tokens": a.max_new_tokens, "warmup": a.warmup,
                                  "reps": a.reps, "ks": a.ks, "lora_r": 16, "beta": 0.05, "dtype": "float32"},
                     "step_time": []}
    log = lambda msg: print(f"[bench {time.perf_counter() - t0:6.0f}s] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="vlrlcd-bench-") as work:
        # Fixed-cost parts first, so the time budget can only cut step-time rows (the last, largest ones).
        if not a.no_teacher:
            n, k = (2, 2) if a.quick else (8, 4)
            results["teacher_calls"] = teacher_calls.count_calls(n, k, batch=2 if a.quick else 4,
                                                                 max_new_tokens=4 if a.quick else 8, work_dir=work)
            log(f"teacher calls: {json.dumps(results['teacher_calls'])}")
        if not a.no_memory:
            log("memory: building the text student")
            try:
                path = build_text_small(work) if a.quick else build_text_100m(work)
                results["memory"] = {
                    name: memory.run_isolated(path, q, max_new_tokens=8 if not a.quick else 4, threads=a.threads,
                                              env=env)
                    for name, (q, env) in memory.settings().items()}
                results["memory"]["settings"] = {"k": 4, "batch": 2, "max_new_tokens": 8 if not a.quick else 4,
                                                 "fixed_mmap_env": memory.FIXED_MMAP_THRESHOLD}
            except Exception as e:
                results["memory"] = {"error": f"{type(e).__name__}: {str(e)[-500:]}"}
            log(f"memory: {json.dumps(results['memory'])[:400]}")
        if not a.no_eval:
            from bench import eval_speed

            try:
                student, records, max_new = eval_speed.demo_student(Path(work), None, 32 if a.quick else 128)
                results["eval_speed"] = eval_speed.measure(student, records, max_new, 32, 1 if a.quick else 3)
                del student
            except Exception as e:
                results["eval_speed"] = {"error": f"{type(e).__name__}: {str(e)[-500:]}"}
            log(f"eval speed: {json.dumps(results['eval_speed'])[:300]}")
        for name in a.configs:
            arch, tiny = CONFIGS[name]
            try:
                w = build(arch, work, a.batch, tiny_config=tiny, name=name)
            except Exception as e:  # e.g. a builder not there yet: the row says so, the rest still runs
                results["step_time"].append({"name": name, "error": f"{type(e).__name__}: {e}"})
                log(f"{name}: {type(e).__name__}: {e}")
                continue
            for k in a.ks:
                if time.perf_counter() - t0 > a.budget_s:
                    results["step_time"].append({"name": name, "k": k, "skipped": "time budget"})
                    log(f"{name} K={k}: skipped (--budget-s {a.budget_s:.0f} spent)")
                    continue
                spec = step_time.RowSpec(arch, k, batch=a.batch, max_new_tokens=a.max_new_tokens, warmup=a.warmup,
                                         reps=a.reps)
                row = {"name": name, **step_time.run_row(w, spec, work).summary()}
                results["step_time"].append(row)
                log(f"{name} K={k}: vlrlcd {row['ours_s']:.2f}s TRL {row['trl_s']:.2f}s ratio "
                    f"{row['ratio_median']:.2f} [{row['ratio_min']:.2f}, {row['ratio_max']:.2f}] vision/prompt "
                    f"{row['ours_vision_per_prompt']} vs {row['trl_vision_per_prompt']}")
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    results["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    text = report(results)
    print(text, flush=True)
    out = Path(a.out) if a.out else (Path(tempfile.gettempdir()) / "vlrlcd-bench-quick.json" if a.quick
                                     else HERE / "results.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(text + "\n", encoding="utf-8")
    log(f"wrote {out} and {out.with_suffix('.md')}")
    return results


if __name__ == "__main__":
    main()
