"""The results as markdown tables (printed, and written beside results.json)."""

from __future__ import annotations


def _f(x, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def step_table(rows: list[dict]) -> str:
    head = ("| student | prompt tokens (image) | K | vlrlcd s/step | TRL s/step | vlrlcd / TRL median "
            "| IQR | min–max | vision images / prompt / step: vlrlcd | TRL |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        if "error" in r or "skipped" in r:
            lines.append(f"| {r['name']} | – | {r.get('k', '–')} | {r.get('error') or r.get('skipped')} | | | | | | |")
            continue
        image = f" ({r['image_tokens']})" if r["image_tokens"] else ""
        vis_o = _f(r["ours_vision_per_prompt"], 1) if r["image_tokens"] else "–"
        vis_t = _f(r["trl_vision_per_prompt"], 1) if r["image_tokens"] else "–"
        lines.append(
            f"| {r['name']} | {r['prompt_tokens']}{image} | {r['k']} | {_f(r['ours_s'])} | {_f(r['trl_s'])} "
            f"| **{_f(r['ratio_median'])}** | {_f(r['ratio_q1'])}–{_f(r['ratio_q3'])} "
            f"| {_f(r['ratio_min'])}–{_f(r['ratio_max'])} | {vis_o} | {vis_t} |"
        )
    return "\n".join(lines)


def memory_table(m: dict) -> str:
    if "error" in m:
        return f"memory: {m['error']}"
    a, b = m["fp32"], m["4bit"]
    af, bf = m.get("fp32_fixed_mmap"), m.get("4bit_fixed_mmap")
    st = m.get("settings", {})

    def row(label: str, x: dict | None, y: dict | None, key: str, digits: int = 0) -> str:
        if not x or not y or x.get(key) is None or y.get(key) is None:
            return f"| {label} | – | – | – |"
        vx, vy = x[key], y[key]
        vx, vy = (vx[-1], vy[-1]) if isinstance(vx, list) else (vx, vy)
        return f"| {label} | {_f(vx, digits)} | {_f(vy, digits)} | {_f(vy / vx) if vx else '–'} |"

    where = f" (K={st['k']}, {st['batch']} prompts, {st['max_new_tokens']} new tokens)" if st else ""
    lines = [
        f"| one LDL-GRPO step{where}, {a['params'] / 1e6:.0f}M-parameter text student | fp32 + LoRA "
        "| 4-bit + LoRA | 4-bit / fp32 |",
        "|---|---|---|---|",
        row("student weights in memory (MB)", a, b, "weight_mb"),
        row("peak RSS during the step (MB)", a, b, "step_peak_rss_mb"),
        row("… above the imported runtime (MB)", a, b, "step_peak_above_runtime_mb"),
        row("peak RSS during the step, fixed malloc mmap threshold (MB)", af, bf, "step_peak_rss_mb"),
        row("… above the imported runtime (MB)", af, bf, "step_peak_above_runtime_mb"),
        row("peak RSS while loading (MB)", a, b, "load_peak_rss_mb"),
        row("step seconds", a, b, "step_s", 1),
    ]
    return "\n".join(lines)


def teacher_table(t: dict) -> str:
    if "error" in t:
        return f"teacher calls: {t['error']}"
    n, k = t["n_prompts"], t["k"]
    a, b = t["ldl_grpo"], t["judge_grpo"]
    return "\n".join([
        f"| teacher calls, N = {n} prompts, K = {k}, one epoch | LDL-GRPO | teacher-as-judge (judge_grpo) | ratio |",
        "|---|---|---|---|",
        f"| anchors (once per prompt, stored) | {a['anchor_calls']} | {b['anchor_calls']} | |",
        f"| during RL | {a['rl_calls']} | {b['rl_calls']} (N·K = {n * k}) | |",
        f"| method's teacher cost | **{a['total']}** (N) | **{b['rl_calls']}** judgements (N·K) | **{_f(t['ratio'])}** |",
        f"| a re-run over the same prompts (anchors) | {a['rerun_anchor_calls']} | {b['rerun_anchor_calls']} | |",
    ])


def eval_table(e: dict) -> str:
    """Held-out greedy evaluation, batched against one prompt at a time (bench/eval_speed.py)."""
    if "error" in e:
        return f"eval speed: {e['error']}"
    return "\n".join([
        f"Greedy evaluation on the demo student ({e['n']} held-out prompts, max {e['max_new_tokens']} new tokens), "
        f"one prompt at a time (A) against batch {e['batch']} (B), alternated, {e['reps']} pairs:",
        "| seconds per prompt, A | seconds per prompt, B | speed-up A/B median [min, max] | same answers |",
        "|---|---|---|---|",
        f"| {e['one_ms'] / 1e3:.4f} | {e['batched_ms'] / 1e3:.4f} | {e['speedup_median']:.2f}x "
        f"[{e['speedup_min']:.2f}, {e['speedup_max']:.2f}] | {'yes' if e['same_answers'] else 'NO'} |"])


def report(results: dict) -> str:
    parts = [f"machine: {results['machine']['line']}", f"command: {results['command']}", "",
             step_table(results["step_time"])]
    if "memory" in results:
        parts += ["", memory_table(results["memory"])]
    if "teacher_calls" in results:
        parts += ["", teacher_table(results["teacher_calls"])]
    if "eval_speed" in results:
        parts += ["", eval_table(results["eval_speed"])]
    parts += ["", f"total wall time: {results['wall_s']:.0f} s"]
    return "\n".join(parts)
