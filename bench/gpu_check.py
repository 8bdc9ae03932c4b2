"""GPU check (about 5 minutes on one CUDA GPU): tiny random students of each family, in bf16 and in 4-bit
(nf4 QLoRA), run real RL steps of `vlrlcd.training.rl.train_rl`; for each, the median step time against TRL's
`GRPOTrainer` on the same student, prompts, K, lengths, LoRA and β, and `torch.cuda.max_memory_allocated`
during the steps against `vlrlcd plan`'s peak for exactly that run.

    python -m bench.gpu_check [--families text,llava,llava_next,qwen2_vl,qwen2_5_vl] [--k 8] [--out FILE]

Without a CUDA device it prints "skipped: no CUDA device" and exits 0. The students are larger than the CPU
tests' (hidden 256, 4 layers) so that activations, not cuBLAS workspaces, make the peak; allocations that
exist before the step and are not the student's (workspaces) are subtracted from the measured peak.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

FAMILIES = ("text", "llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
BUILDER = {"text": "llama", "llava": "llava", "llava_next": "llava_next", "qwen2_vl": "qwen2_vl",
           "qwen2_5_vl": "qwen2_5_vl"}


def _students_and_prompts(family: str, out: Path, n: int):
    from bench.models import corpus, prompts
    from vlrlcd.adapters.config import TinyConfig
    from vlrlcd.adapters.tiny import BUILDERS

    tiny = TinyConfig(vocab_size=4096, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=512,
                      vision_hidden_size=64, vision_layers=2, image_size=64, patch_size=8)
    records = prompts("text" if family == "text" else "vqa", n, out, tiny.image_size)
    words = corpus(records) + [f"word{i} token{i * 13} item{i * 7}" for i in range(2000)]
    return BUILDERS[BUILDER[family]](out / "model", words, tiny, seed=0), records


def _ours(path: Path, records, quantization: str, k: int, new_tokens: int, steps: int, work: Path) -> dict:
    import torch

    from bench.memory import plan_for_run
    from vlrlcd.adapters.config import LoraConfig, StudentConfig
    from vlrlcd.adapters.loader import load_student
    from vlrlcd.training.config import TrainConfig
    from vlrlcd.training.rl import train_rl
    from vlrlcd.ranking.config import RankingConfig

    scfg = StudentConfig(name_or_path=str(path), quantization=quantization, compute_dtype="bfloat16",
                         lora=LoraConfig(r=16, alpha=32, dropout=0.0))
    sft = load_student(scfg).save(work / "sft")
    torch.cuda.empty_cache()
    student = load_student(scfg, reference=sft)
    anchors = {r.id: r.reference for r in records}
    cfg = TrainConfig(rl_steps=steps, batch_size=len(records), k=k, beta=0.05, lr=2e-4, tensorboard=False)
    torch.cuda.synchronize()
    model_bytes = sum(t.numel() * t.element_size() for t in student.model.parameters())
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    rows = train_rl(student, records, anchors, cfg, RankingConfig(), max_new_tokens=new_tokens, out_dir=work / "rl",
                    progress=False)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - max(0, before - model_bytes)
    plan = plan_for_run(student, scfg, records, anchors, cfg, new_tokens, device="cuda")
    return {"step_s": statistics.median(r["seconds_per_step"] for r in rows[1:]), "max_memory_allocated": peak,
            "plan_peak": plan.peak, "plan_phase": plan.peak_phase, "plan_over_measured": round(plan.peak / peak, 3)}


def _trl(path: Path, family: str, records, quantization: str, k: int, new_tokens: int, steps: int, work: Path) -> dict:
    """TRL's GRPOTrainer on the same student (bf16 on the GPU; 4-bit through the same bitsandbytes config)."""
    import transformers
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from bench.models import Workload
    from bench.step_time import RowSpec, _trl_dataset, self_likelihood_reward
    from vlrlcd.adapters.base import StudentAdapter
    from vlrlcd.adapters.config import LoraConfig, StudentConfig
    from vlrlcd.adapters.loader import load_base, lora_config

    scfg = StudentConfig(name_or_path=str(path), quantization=quantization, compute_dtype="bfloat16",
                         lora=LoraConfig(r=16, alpha=32, dropout=0.0))
    base, processor, tokenizer, fam = load_base(scfg)
    w = Workload("text" if family == "text" else family, path, records)
    spec = RowSpec(w.arch, k, batch=len(records), max_new_tokens=new_tokens)
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            import torch

            torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    holder: dict = {}
    args = GRPOConfig(
        output_dir=str(work / "trl"), bf16=quantization == "none", gradient_checkpointing=False, num_generations=k,
        max_completion_length=new_tokens, per_device_train_batch_size=len(records) * k, gradient_accumulation_steps=1,
        steps_per_generation=1, max_steps=steps, learning_rate=2e-4, max_grad_norm=1.0, beta=0.05, temperature=1.0,
        report_to="none", save_strategy="no", logging_steps=10**6, disable_tqdm=True, log_completions=False, seed=0,
        dataloader_num_workers=0)
    transformers.logging.set_verbosity_error()
    trainer = GRPOTrainer(model=base, reward_funcs=[self_likelihood_reward(holder)], args=args,
                          train_dataset=_trl_dataset(w, spec), processing_class=processor or tokenizer,
                          peft_config=lora_config(scfg, fam), callbacks=[Timer()])
    trainer.remove_callback(PrinterCallback)
    holder["student"] = StudentAdapter(trainer.model, processor, tokenizer, fam, str(path))
    trainer.train()
    return {"trl_step_s": statistics.median(times[1:])}


def run(families: list[str], k: int, batch: int, new_tokens: int, steps: int, budget_s: float, trl: bool) -> list[dict]:
    import torch

    t_start, rows = time.time(), []
    for family in families:
        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            path, records = _students_and_prompts(family, d, batch)
            for quantization in ("none", "4bit"):
                if time.time() - t_start > budget_s:
                    rows.append({"family": family, "quantization": quantization, "skipped": "time budget"})
                    continue
                row = {"family": family, "quantization": quantization, "k": k, "batch": batch}
                work = d / quantization
                work.mkdir()
                try:
                    row.update(_ours(path, records, quantization, k, new_tokens, steps, work))
                except Exception as e:  # noqa: BLE001 - report and go on: one family must not hide the others
                    row["error"] = f"vlrlcd: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                if trl:
                    try:
                        row.update(_trl(path, family, records, quantization, k, new_tokens, steps, work))
                        if "step_s" in row:
                            row["ours_over_trl"] = round(row["step_s"] / row["trl_step_s"], 3)
                    except Exception as e:  # noqa: BLE001
                        row["trl_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                torch.cuda.empty_cache()
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| family | base | vlrlcd s/step | TRL s/step | vlrlcd / TRL | max_memory_allocated MB | plan MB | plan / measured |",
             "|---|---|---|---|---|---|---|---|"]
    f = lambda v, fmt: format(v, fmt) if isinstance(v, (int, float)) else "–"  # noqa: E731
    for r in rows:
        mb = lambda key: r[key] / 2**20 if key in r else None  # noqa: E731
        lines.append(f"| {r['family']} | {'bf16' if r['quantization'] == 'none' else '4-bit'} | {f(r.get('step_s'), '.3f')} | "
                     f"{f(r.get('trl_step_s'), '.3f')} | {f(r.get('ours_over_trl'), '.2f')} | "
                     f"{f(mb('max_memory_allocated'), '.1f')} | {f(mb('plan_peak'), '.1f')} | "
                     f"{f(r.get('plan_over_measured'), '.2f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=4, help="RL steps per row; the first is a warm-up")
    p.add_argument("--budget-s", type=float, default=270, help="no row starts after this many seconds")
    p.add_argument("--no-trl", action="store_true")
    p.add_argument("--out", default="bench/gpu_check.json")
    a = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("skipped: no CUDA device (bench/gpu_check.py measures on a GPU)")
        return 0
    families = [x for x in a.families.split(",") if x]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        p.error(f"unknown families {unknown}; choose from {','.join(FAMILIES)}")
    rows = run(families, a.k, a.batch, a.max_new_tokens, max(a.steps, 2), a.budget_s, not a.no_trl)
    Path(a.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                       "rows": rows}, indent=1), encoding="utf-8")
    print(table(rows))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
