"""Where a step's time goes, for both trainers: cProfile cumulative seconds of each phase and the number of
language-model forward calls, measured on one step after a warm-up step.

    python -m bench.profile llava 4 [--image-size 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import tempfile

import torch

# (label, file suffix, function name): phases of one step, matched in the cProfile table.
OURS_PHASES = [
    ("rollout: sample K", "vlrlcd/adapters/base.py", "sample_batch"),
    ("rollout: score K+1 (ranking, all groups batched)", "vlrlcd/ranking/scorers.py", "self_likelihood_batch"),
    ("loss: policy + reference log-probs (all groups batched)", "vlrlcd/training/steps.py", "batched_passes"),
    ("loss: group losses from their slices", "vlrlcd/methods/ldl_grpo.py", "group_loss"),
    ("vision tower", "vlrlcd/adapters/base.py", "image_features"),
    ("backward", "torch/autograd/graph.py", "_engine_run_backward"),
    ("optimizer step (+ gradient sum over processes)", "vlrlcd/training/common.py", "finish_step"),
]
TRL_PHASES = [
    ("generate (HF generate, B*K rows)", "trl/trainer/grpo_trainer.py", "_generate_single_turn"),
    ("reward (same scorer)", "trl/trainer/grpo_trainer.py", "_calculate_rewards"),
    ("reference + policy log-probs", "trl/trainer/grpo_trainer.py", "_get_per_token_logps_and_entropies"),
    ("backward", "torch/autograd/graph.py", "_engine_run_backward"),
    ("optimizer step", "torch/optim/optimizer.py", "wrapper"),
]


def phase_seconds(stats: pstats.Stats, phases: list[tuple[str, str, str]]) -> dict[str, float]:
    """Cumulative seconds per phase (summed over matching functions; recursion counted once by cProfile)."""
    out = {label: 0.0 for label, _, _ in phases}
    for (path, _, func), (_, _, _, cum, _) in stats.stats.items():
        for label, suffix, name in phases:
            if func == name and path.endswith(suffix):
                out[label] += cum
    return {k: round(v, 4) for k, v in out.items()}


class ForwardCounter:
    """Counts calls of the transformers *ForCausalLM / *ForConditionalGeneration module under any peft wrapper
    (one per model call, whoever makes it: our loops, `generate`, TRL)."""

    def __init__(self, model: torch.nn.Module):
        target = None
        for module in model.modules():
            name = type(module).__name__
            if not name.startswith("Peft") and (name.endswith("ForCausalLM") or name.endswith("ForConditionalGeneration")):
                target = module
                break
        self.calls = 0
        self._h = target.register_forward_pre_hook(self._hook) if target is not None else None

    def _hook(self, *_):
        self.calls += 1

    def remove(self):
        if self._h is not None:
            self._h.remove()


def profile_row(arch: str, k: int, image_size: int = 64, batch: int = 4, max_new_tokens: int = 16) -> dict:
    """Profile one vlrlcd step and one TRL step (each after one warm-up step) on the same workload."""
    from transformers import TrainerCallback

    from bench import step_time
    from bench.models import build
    from vlrlcd.adapters.config import TinyConfig

    spec = step_time.RowSpec(arch, k, batch=batch, max_new_tokens=max_new_tokens, warmup=1, reps=1)
    report: dict = {"arch": arch, "k": k, "image_size": image_size, "batch": batch, "max_new_tokens": max_new_tokens}
    with tempfile.TemporaryDirectory() as d:
        tiny = TinyConfig(image_size=image_size, patch_size=8) if arch == "llava" else None
        w = build(arch, d, batch, tiny_config=tiny)
        ours = step_time.OursStep(w, spec)
        ours()
        fwd = ForwardCounter(ours.student.model)
        prof = cProfile.Profile()
        prof.enable()
        seconds = ours()
        prof.disable()
        fwd.remove()
        st = pstats.Stats(prof)
        report["ours"] = {"seconds": round(seconds, 4), "model_calls": fwd.calls,
                          "python_calls": st.total_calls, "phases": phase_seconds(st, OURS_PHASES)}

        holder: dict = {}

        class Profile(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if state.global_step == 1:
                    holder["fwd"] = ForwardCounter(kw["model"])
                    holder["prof"] = cProfile.Profile()
                    holder["prof"].enable()

            def on_step_end(self, args, state, control, **kw):
                if state.global_step == 2:
                    holder["prof"].disable()
                    holder["fwd"].remove()

        trainer = step_time.trl_trainer(w, spec, d, [Profile()])
        trainer.train()
        st = pstats.Stats(holder["prof"])
        report["trl"] = {"seconds": round(st.total_tt, 4), "model_calls": holder["fwd"].calls,
                         "python_calls": st.total_calls, "phases": phase_seconds(st, TRL_PHASES)}
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    p.add_argument("arch", choices=["llava", "qwen2_vl", "text"])
    p.add_argument("k", type=int)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(json.dumps(profile_row(a.arch, a.k, a.image_size, a.batch, a.max_new_tokens), indent=1))


if __name__ == "__main__":
    main()
