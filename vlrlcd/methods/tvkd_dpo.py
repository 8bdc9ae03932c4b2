"""tvkd_dpo (arXiv 2509.16965; `train.tvkd_dpo.*`, plus `train.dpo.beta`): DPO on the ranking's pairs whose
rewards subtract (1 − γ_s)·Σ_t V_T(s_{t+1}), the token values of a local white-box teacher that shares the
student's tokenizer. The teacher is loaded at the first step and its values are computed once per
(prompt, response), kept in ctx.cache (per process, not checkpointed)."""

from __future__ import annotations

import torch

from vlrlcd.adapters.base import StudentAdapter
from vlrlcd.errors import VlrlcdError
from vlrlcd.methods.base import LossOut, Method, Passes
from vlrlcd.methods.dpo import no_pair, pair_batch, ranked_pairs
from vlrlcd.objectives.tvkd import topk_with_rest, tvkd_dpo_loss, tvkd_values
from vlrlcd.training.rollout import Group


def load_tvkd_teacher(cfg, student: StudentAdapter) -> StudentAdapter:
    """The white-box teacher (frozen, no adapter) behind the StudentAdapter interface; its tokenizer must
    be the student's (same vocabulary), since its values are read at the student's response tokens."""
    from vlrlcd.adapters.config import StudentConfig
    from vlrlcd.adapters.loader import load_base

    path = cfg.tvkd_dpo.require()
    dtype = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(
        student.model.get_output_embeddings().weight.dtype, "float32")
    model, processor, tokenizer, family = load_base(
        StudentConfig(name_or_path=path, quantization=cfg.tvkd_dpo.teacher_quantization, compute_dtype=dtype))
    if tokenizer.get_vocab() != student.tokenizer.get_vocab():
        raise VlrlcdError(
            f"train.tvkd_dpo.teacher {path}: its tokenizer differs from the student's ({len(tokenizer)} vs "
            f"{len(student.tokenizer)} tokens or different ids); TVKD reads the teacher's values at the "
            "student's tokens, so use a teacher of the same model family / tokenizer"
        )
    if student.is_vision and not family.vision:
        raise VlrlcdError(f"train.tvkd_dpo.teacher {path} is a text-only model but the student sees images; "
                          "use a vision-language teacher of the student's family")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return StudentAdapter(model, processor, tokenizer, family, path)


@torch.no_grad()
def teacher_token_values(teacher: StudentAdapter, group: Group, responses: list[list[int]], cfg) -> list[torch.Tensor]:
    """V_T(s_{t+1}) at each response token (the teacher's top-k next-token log-probs after y_≤t, plus
    the rest bucket), one forward of the teacher over all responses on its shared prefix."""
    prefix = teacher.prefix(group.record.prompt, group.record.image)
    logits, _ = teacher.continuation_logits(prefix, responses)   # right positions for every family (Qwen mrope)
    top, rest = topk_with_rest(logits, cfg.tvkd_dpo.topk)
    values = tvkd_values(top, rest, cfg.tvkd_dpo.alpha, cfg.tvkd_dpo.beta_t).float().cpu()
    return [values[i, : len(r)] for i, r in enumerate(responses)]


def cached_token_values(student: StudentAdapter, group: Group, responses: list[list[int]], cfg,
                        ctx) -> list[torch.Tensor]:
    """Teacher values per response, computed once per (prompt, response) and kept in ctx.cache."""
    if ctx.cache.get("tvkd_teacher_path") != cfg.tvkd_dpo.teacher:
        ctx.cache["tvkd_teacher"] = load_tvkd_teacher(cfg, student)
        ctx.cache["tvkd_teacher_path"] = cfg.tvkd_dpo.teacher
        ctx.cache["tvkd_values"] = {}
    memo: dict = ctx.cache["tvkd_values"]
    keys = [(group.record.id, group.record.prompt, tuple(r)) for r in responses]
    todo = [i for i, k in enumerate(keys) if k not in memo]
    if todo:
        values = teacher_token_values(ctx.cache["tvkd_teacher"], group, [responses[i] for i in todo], cfg)
        for i, v in zip(todo, values):
            memo[keys[i]] = v
        ctx.state["tvkd_teacher_passes"] = ctx.state.get("tvkd_teacher_passes", 0) + 1
        ctx.state["tvkd_values_computed"] = ctx.state.get("tvkd_values_computed", 0) + len(todo)
    return [memo[k] for k in keys]


class TvkdDpo(Method):
    sections = ("dpo", "tvkd_dpo")

    def passes(self, cfg) -> tuple[str, ...]:
        return ()

    def setup(self, ctx, cfg, tcfg, run_dir) -> None:
        tcfg.tvkd_dpo.require()   # fail before the stage: the teacher itself is loaded at the first step

    def group_loss(self, student, group, passes: Passes, cfg, ctx) -> LossOut:
        cfg.tvkd_dpo.require()
        pairs = ranked_pairs(group, ctx.ranking)
        if not pairs:
            return no_pair(student, group)
        pb = pair_batch(student, group, pairs)
        values = cached_token_values(student, group, pb.responses, cfg, ctx)
        V = torch.zeros_like(pb.mask)
        for i, v in enumerate(values):
            V[i, : len(v)] = v.to(V)
        c, r = pb.chosen, pb.rejected
        loss, m = tvkd_dpo_loss(pb.policy[c], pb.policy[r], pb.ref[c], pb.ref[r], V[c], V[r], pb.mask[c], pb.mask[r],
                                cfg.dpo.beta, cfg.tvkd_dpo.gamma_s)
        return loss, {**m, "tokens": float(pb.mask.sum())}
