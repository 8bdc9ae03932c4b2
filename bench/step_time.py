"""Seconds per RL step, vlrlcd LDL-GRPO vs TRL GRPOTrainer, measured interleaved in one process.

Both trainers start from the same saved tiny student, get the same B prompts every step, K completions per
prompt, the same max completion length, LoRA on the same modules, fp32 on CPU, the same KL weight β to the
LoRA-disabled reference, AdamW with the same learning rate and gradient clipping.

- vlrlcd (A): `vlrlcd.training.rl.rl_step`, the step `train_rl` runs: `rollout_batch` over the step's prompts
  (K samples of every prompt in one batched decode, all groups scored in one batched pass of the student's
  anchor-conditioned self-likelihood, D_x, under the run's autocast), then `losses_and_backward` (one batched
  policy and one batched reference log-prob pass over all groups, each group's ldl_grpo loss from its slice,
  one backward), then `finish_step` (the clipped optimizer step). Only the loop's logging is left out.
- TRL (B): `GRPOTrainer.train()`, timed from `on_step_begin` to `on_step_end` (generation, reward, reference
  and policy passes, backward, clip, optimizer step). Its reward function is the same scorer vlrlcd ranks
  with (self-likelihood of each completion given the anchor, minus the anchor's own), run on TRL's model:
  a reward of equal cost.

The A step runs inside TRL's `on_step_begin` callback, so the runs alternate A B A B ...; the first
`warmup` pairs are dropped. Vision-tower images are counted by forward hooks on each model.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.models import Workload
from bench.vision import VisionCounter
from vlrlcd.adapters.base import StudentAdapter
from vlrlcd.adapters.config import LoraConfig, StudentConfig
from vlrlcd.ranking.config import RankingConfig
from vlrlcd.training.config import TrainConfig


@dataclass
class RowSpec:
    arch: str
    k: int
    batch: int = 4               # prompts per step (same prompts every step, for both)
    max_new_tokens: int = 16     # max completion length
    warmup: int = 1
    reps: int = 5
    beta: float = 0.05
    lr: float = 2e-4
    seed: int = 0


@dataclass
class RowResult:
    spec: RowSpec
    ours_s: list[float] = field(default_factory=list)
    trl_s: list[float] = field(default_factory=list)
    ours_images: list[int] = field(default_factory=list)
    trl_images: list[int] = field(default_factory=list)
    ours_tokens: list[int] = field(default_factory=list)   # completion tokens sampled per step
    trl_tokens: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    image_tokens: int = 0

    def summary(self) -> dict:
        s = self.spec
        ratios = [a / b for a, b in zip(self.ours_s, self.trl_s)]
        q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
        per_prompt = lambda xs: statistics.mean(xs) / s.batch if xs else None  # noqa: E731
        return {
            "arch": s.arch, "k": s.k, "batch": s.batch, "max_new_tokens": s.max_new_tokens, "reps": len(ratios),
            "prompt_tokens": self.prompt_tokens, "image_tokens": self.image_tokens,
            "ours_s": statistics.median(self.ours_s), "trl_s": statistics.median(self.trl_s),
            "ratio_median": statistics.median(ratios), "ratio_q1": q[0], "ratio_q3": q[2],
            "ratio_min": min(ratios), "ratio_max": max(ratios), "ratios": [round(r, 4) for r in ratios],
            "ours_step_s": [round(x, 4) for x in self.ours_s], "trl_step_s": [round(x, 4) for x in self.trl_s],
            "ours_vision_per_prompt": per_prompt(self.ours_images), "trl_vision_per_prompt": per_prompt(self.trl_images),
            "ours_completion_tokens": statistics.mean(self.ours_tokens) if self.ours_tokens else None,
            "trl_completion_tokens": statistics.mean(self.trl_tokens) if self.trl_tokens else None,
        }


def student_config(w: Workload, quantization: str = "none") -> StudentConfig:
    return StudentConfig(name_or_path=str(w.path), quantization=quantization,
                         lora=LoraConfig(r=16, alpha=32, dropout=0.0))


def train_config(spec: RowSpec) -> TrainConfig:
    return TrainConfig(objective="ldl_grpo", k=spec.k, batch_size=spec.batch, beta=spec.beta, lr=spec.lr,
                       temperature=1.0, grad_clip=1.0, rl_steps=spec.warmup + spec.reps)


class OursStep:
    """`vlrlcd.training.rl.rl_step` (the step train_rl runs, without its logging) on a fixed batch."""

    def __init__(self, w: Workload, spec: RowSpec, quantization: str = "none"):
        from vlrlcd.adapters.loader import load_student
        from vlrlcd.training.rl import rl_setup

        self.w, self.spec = w, spec
        self.student = load_student(student_config(w, quantization))
        self.run = rl_setup(self.student, train_config(spec), RankingConfig(), spec.max_new_tokens, seed=spec.seed)
        self.batch = w.records[: spec.batch]
        self.step_index = 0
        self.last_tokens = 0

    def __call__(self) -> float:
        from vlrlcd.training.rl import rl_step

        self.student.inputs_cache.clear()   # the fixed batch stands for new prompts: TRL processes them every step
        t0 = time.perf_counter()
        result = rl_step(self.run, self.step_index, self.batch, [self.w.anchors[r.id] for r in self.batch])
        self.step_index += 1
        self.last_tokens = sum(len(c) for g in result.groups for c in g.candidates)
        return time.perf_counter() - t0


def _trl_dataset(w: Workload, spec: RowSpec):
    from datasets import Dataset, Features, Image, Value

    rows = []
    for r in w.records[: spec.batch]:
        if w.arch == "text":
            prompt = [{"role": "user", "content": r.prompt}]
        else:
            prompt = [{"role": "user", "content": [{"type": "image", "text": None},
                                                   {"type": "text", "text": r.prompt}]}]
        row = {"prompt": prompt, "rid": r.id, "question": r.prompt, "anchor": w.anchors[r.id]}
        if r.image is not None:
            row["image"] = r.image
            row["image_path"] = r.image
        rows.append(row)
    ds = Dataset.from_list(rows)
    if w.arch != "text":
        ds = ds.cast_column("image", Image())
    return ds


def self_likelihood_reward(holder: dict):
    """TRL reward of equal cost to vlrlcd's ranking: r_k = g(x, a, y_k) − g(x, a, a) with vlrlcd's scorer,
    one scoring pass per prompt over its K completions (the student is TRL's own model)."""
    from vlrlcd.ranking.scorers import self_likelihood

    def reward(prompts, completions, completion_ids, rid, question, anchor, image_path=None, **_):
        student: StudentAdapter = holder["student"]
        groups: dict[str, list[int]] = {}
        for j, key in enumerate(rid):
            groups.setdefault(key, []).append(j)
        out = [0.0] * len(rid)
        for key, idx in groups.items():
            j0 = idx[0]
            cands = [list(completion_ids[j]) or [student.eos_ids[0]] for j in idx]
            img = image_path[j0] if image_path is not None else None
            s = self_likelihood(student, question[j0], img, anchor[j0], cands)
            for j, v in zip(idx, (s.candidates - s.anchor).tolist()):
                out[j] = v
        return out

    reward.__name__ = "self_likelihood_margin"
    return reward


def trl_trainer(w: Workload, spec: RowSpec, work_dir: str | Path, callbacks: list):
    """TRL's GRPOTrainer on the same base checkpoint, LoRA modules, prompts, K, lengths, β and optimizer
    settings (TRL's own defaults that differ from ours and cost time are turned off: gradient checkpointing)."""
    import transformers
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from vlrlcd.adapters.loader import load_base, lora_config

    scfg = student_config(w)
    base, processor, tokenizer, family = load_base(scfg)
    holder: dict = {}
    args = GRPOConfig(
        output_dir=str(Path(work_dir) / "trl"), use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        num_generations=spec.k, max_completion_length=spec.max_new_tokens,
        per_device_train_batch_size=spec.batch * spec.k, gradient_accumulation_steps=1, steps_per_generation=1,
        max_steps=spec.warmup + spec.reps, learning_rate=spec.lr, max_grad_norm=1.0, beta=spec.beta,
        temperature=1.0, report_to="none", save_strategy="no", logging_steps=10**6, disable_tqdm=True,
        log_completions=False, seed=spec.seed, dataloader_num_workers=0,
    )
    transformers.logging.set_verbosity_error()
    trainer = GRPOTrainer(
        model=base, reward_funcs=[self_likelihood_reward(holder)], args=args, train_dataset=_trl_dataset(w, spec),
        processing_class=processor if processor is not None else tokenizer, peft_config=lora_config(scfg, family),
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)
    holder["student"] = StudentAdapter(trainer.model, processor, tokenizer, family, str(w.path))
    return trainer


def run_row(w: Workload, spec: RowSpec, work_dir: str | Path) -> RowResult:
    """Build both trainers on `w`, run warmup + reps interleaved steps, return the timings and counts."""
    from transformers import TrainerCallback

    from vlrlcd.training.common import seed_everything

    seed_everything(spec.seed)
    result = RowResult(spec)
    ours = OursStep(w, spec)
    ours_vision = VisionCounter(ours.student.model)
    p = ours.student.prefix(w.records[0].prompt, w.records[0].image)
    result.prompt_tokens = int(p.input_ids.shape[1])
    img_id = getattr(ours.student.model.config, "image_token_id", None)
    result.image_tokens = int((p.input_ids == img_id).sum()) if img_id is not None else 0
    counters: dict = {}

    class Interleave(TrainerCallback):
        """A (our step) at TRL's on_step_begin, then B (TRL's step) until on_step_end."""

        def on_step_begin(self, args, state, control, **kw):
            i0 = ours_vision.images
            a = ours()
            self.keep = state.global_step >= spec.warmup
            if self.keep:
                result.ours_s.append(a)
                result.ours_images.append(ours_vision.images - i0)
                result.ours_tokens.append(ours.last_tokens)
            self.i0 = counters["trl"].images
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            b = time.perf_counter() - self.t0
            if self.keep:
                result.trl_s.append(b)
                result.trl_images.append(counters["trl"].images - self.i0)
                lens = trainer._metrics["train"].get("completions/mean_length") or [0]
                result.trl_tokens.append(round(lens[-1] * spec.batch * spec.k))

    trainer = trl_trainer(w, spec, work_dir, [Interleave()])
    counters["trl"] = VisionCounter(trainer.model)
    try:
        trainer.train()
    finally:
        ours_vision.remove()
        counters["trl"].remove()
    return result


if __name__ == "__main__":  # quick manual check: python -m bench.step_time llava 4
    import json
    import sys

    from bench.models import build

    from vlrlcd.adapters.config import TinyConfig

    arch, k = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
    image_size = int(sys.argv[4]) if len(sys.argv) > 4 else 64
    with tempfile.TemporaryDirectory() as d:
        spec = RowSpec(arch, k)
        tiny = TinyConfig(image_size=image_size, patch_size=8) if arch == "llava" else None
        w = build(arch, d, spec.batch, tiny_config=tiny)
        r = run_row(w, spec, d)
    print(json.dumps(r.summary(), indent=1))
