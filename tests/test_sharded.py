"""Sharded bases through accelerate's own config files: FSDP (configs/accelerate/fsdp_cpu.yaml) and DeepSpeed
ZeRO-3 (deepspeed_zero3_cpu.yaml). Two CPU processes shard the tiny student's frozen decoder weights, run SFT
and LDL-GRPO in lockstep, and match one process. Plus the lockstep pieces on one process: decoding until every
process is done, the always-run continuation pass, the same passes for every kind of group under every
objective, the full-sequence log-probs under activation checkpointing, and the settings and refusals."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from test_distributed import RUN as DDP_RUN
from test_distributed import max_abs_diff, rollout_ids, tensors, twin_run_dir
from test_steps_common import MAX_NEW, Forwards, build, records, sft_adapter

from vlrlcd import cli
from vlrlcd.adapters.config import StudentConfig
from vlrlcd.adapters.loader import load_student
from vlrlcd.errors import VlrlcdError
from vlrlcd.methods import get_method, names
from vlrlcd.methods.config import TvkdDpoConfig
from vlrlcd.ranking.config import RankingConfig
from vlrlcd.training import checkpoint as ckpt
from vlrlcd.training import sharding
from vlrlcd.training.config import TrainConfig
from vlrlcd.training.distributed import Dist, setup_distributed
from vlrlcd.training.rl import losses_and_backward, train_rl
from vlrlcd.training.rollout import rollout, rollout_batch, sample_generator
from vlrlcd.training.steps import StepContext, group_loss

ROOT = Path(__file__).resolve().parents[1]

# test_distributed's run with 2 decoder layers to shard, 4 prompts per RL step (2 per process) and SFT batches
# of 3 items in 2 micro-batches: rank 0 runs 2, rank 1 one real and one zero-weight pass
RUN = {**DDP_RUN, "data": {**DDP_RUN["data"], "eval_size": 3},
       "student": {**DDP_RUN["student"], "tiny": {**DDP_RUN["student"]["tiny"], "num_layers": 2}},
       "train": {**DDP_RUN["train"], "grad_accum": 2, "batch_size": 4}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(path: Path, run_dir: Path) -> Path:
    path.write_text(yaml.safe_dump({**RUN, "run_dir": str(run_dir)}), encoding="utf-8")
    return path


LAUNCHERS = {"fsdp": ("fsdp_cpu.yaml", "fsdp: 2 decoder layers sharded over 2 processes"),
             "zero3": ("deepspeed_zero3_cpu.yaml", "deepspeed zero-3: the decoder stack partitioned over 2 processes")}


@pytest.fixture(scope="module", params=sorted(LAUNCHERS))
def sharded_run(request, tmp_path_factory):
    """`accelerate launch --config_file configs/accelerate/<launcher> -m vlrlcd.cli train` from scratch."""
    if request.param == "zero3":
        pytest.importorskip("deepspeed", reason="the deepspeed extra (in the dev extra) is not installed")
    root = tmp_path_factory.mktemp(request.param)
    run = root / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs/accelerate" / LAUNCHERS[request.param][0]), "--main_process_port", str(_free_port()),
           "-m", "vlrlcd.cli", "train", str(_config(root / "run.yaml", run)), "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return request.param, root, run, proc


def test_sharded_base_runs_in_lockstep_and_matches_one_process(sharded_run):
    kind, root, run, proc = sharded_run
    lines = [x for x in proc.stderr.splitlines() if x.startswith(LAUNCHERS[kind][1])]
    assert len(lines) == 2  # the SFT and the RL student
    for line in lines:
        held, total = (int(x.replace(",", "")) for x in line.split("holds ")[1].split(" weights")[0].split(" of "))
        assert held < total  # process 0 keeps only its part of the frozen decoder weights
    for stage in ("sft", "ldl_grpo"):
        metas = [ckpt.read_meta(p) for p in ckpt.list_checkpoints(run / stage)]
        assert metas and all(m["world"] == 2 for m in metas)
        for m in metas:  # the replicated LoRA weights stay identical on both processes
            assert m["rank_digests"][0] == m["rank_digests"][1]
    ids = rollout_ids(run / "ldl_grpo")
    for step, by_rank in ids.items():
        assert len(by_rank[0]) == 2 and len(by_rank[1]) == 2 and not set(by_rank[0]) & set(by_rank[1])
    preds = (run / "sft" / "predictions.jsonl").read_text().splitlines()
    assert len(preds) == 3  # the sharded evaluation answered every held-out prompt once

    single = twin_run_dir(run, root / "single")
    cfg = _config(root / "single.yaml", single)
    assert cli.main(["train", str(cfg), "train.objective=sft", "--no-progress"]) == 0
    # FSDP: 2e-7 here. ZeRO-3's hooks change the summation order of a few activation gradients (1e-7
    # relative), which AdamW amplifies on near-zero gradient entries over the 3 SFT steps at lr 0.01 (2e-5)
    # float32 reductions in another order: 1.05e-5 with the pinned versions (fsdp SFT); rollouts still match exactly
    assert max_abs_diff(tensors(run / "sft"), tensors(single / "sft")) < (5e-5 if kind == "fsdp" else 1e-4)
    ones = [json.loads(x)["prediction"] for x in (single / "sft" / "predictions.jsonl").read_text().splitlines()]
    assert ones == [json.loads(x)["prediction"] for x in preds]
    shutil.rmtree(single / "sft")
    shutil.copytree(run / "sft", single / "sft")  # RL from the same start
    assert cli.main(["train", str(cfg), "--no-progress", "--resume"]) == 0
    assert max_abs_diff(tensors(run / "ldl_grpo"), tensors(single / "ldl_grpo")) < 5e-5
    texts = lambda d: sorted(json.dumps(json.loads(x)["candidates"])  # noqa: E731
                             for x in (d / "ldl_grpo" / "rollouts.jsonl").read_text().splitlines())
    assert texts(run) == texts(single)


# ------------------------------------------------------------------ one process
@pytest.fixture(scope="module")
def text_student(tmp_path_factory):
    root = tmp_path_factory.mktemp("lockstep")
    base = build("text", root / "base")
    ref = sft_adapter(base, root / "sft")
    return load_student(StudentConfig(name_or_path=str(base)), adapter=ref, reference=ref), root


def test_lockstep_decoding_runs_until_every_process_is_done(text_student):
    student, _ = text_student
    prefix = student.prefix("What is 3 + 4?")
    counter = Forwards(student)
    try:
        alone = student.sample(prefix, 3, 6, 1.0, torch.Generator().manual_seed(1))
        n_alone = counter.calls
        student.lockstep = lambda done: False  # another process is never done
        counter.calls = 0
        together = student.sample(prefix, 3, 6, 1.0, torch.Generator().manual_seed(1))
        assert together == alone  # the extra steps only feed padding to finished rows
        assert counter.calls == 6 >= n_alone  # one prefix pass + 5 decode steps: up to the limit
        seen = []
        student.lockstep = lambda done: seen.append(done) or done  # alone again, through the hook
        assert student.sample(prefix, 3, 6, 1.0, torch.Generator().manual_seed(1)) == alone
        assert seen and seen[-1] is (len(seen) < 5)
    finally:
        student.lockstep = None
        counter.handle.remove()


def test_lockstep_always_runs_the_continuation_pass(text_student):
    student, _ = text_student
    prefix = student.prefix("Name a colour.")
    one = [[student.eos_ids[0]], [5]]
    counter = Forwards(student)
    try:
        with torch.no_grad():
            plain = student.token_logprobs(prefix, one)
            assert counter.calls == 1
            student.lockstep = lambda done: done
            counter.calls = 0
            locked = student.token_logprobs(prefix, one)
            assert counter.calls == 2  # the same pass count as any longer response
    finally:
        student.lockstep = None
        counter.handle.remove()
    assert torch.equal(plain.logp, locked.logp) and torch.equal(plain.mask, locked.mask)


def test_no_pair_in_lockstep_still_runs_the_pair_passes_with_weight_zero(text_student, tmp_path):
    student, _ = text_student
    recs, anchors = records("text", tmp_path)
    cfg, rcfg = TrainConfig(objective="single_pair_dpo", k=1), RankingConfig()
    g = rollout(student, recs[0], anchors[recs[0].id], cfg, rcfg, MAX_NEW, sample_generator(0, 0, 0))
    g.candidates = [student.encode_response(g.anchor)]  # the sample is the anchor: no pair
    g.texts = [g.anchor]
    ctx = StepContext(step=0, total_steps=1, ranking=rcfg)
    loss, m = group_loss(student, g, cfg, ctx)
    assert m["pairs"] == 0 and loss.grad_fn is None  # one process: no pass at all
    student.lockstep = lambda done: done
    try:
        loss, m = group_loss(student, g, cfg, ctx)
    finally:
        student.lockstep = None
    assert m["pairs"] == 0 and float(loss.detach()) == 0.0 and loss.grad_fn is not None
    student.model.zero_grad()
    loss.backward()
    grads = [p.grad for p in student.trainable_parameters() if p.grad is not None]
    assert grads and all(float(x.abs().max()) == 0.0 for x in grads)
    student.model.zero_grad(set_to_none=True)


def test_checkpointed_logprobs_take_the_full_sequence_path_and_agree(text_student):
    from vlrlcd.training.common import activation_checkpointing

    student, _ = text_student
    prefix = student.prefix("What is 3 + 4?")
    responses = [[7, 8, student.eos_ids[0]], [9, student.eos_ids[0]]]
    student.model.train()
    try:
        cached = student.token_logprobs(prefix, responses)
        with activation_checkpointing(student.model, True):
            assert student.checkpointing
            full = student.token_logprobs(prefix, responses)
            full.logp.sum().backward()  # recomputed in backward, through the LoRA weights
        assert not student.checkpointing
    finally:
        student.model.eval()
        student.model.zero_grad(set_to_none=True)
    assert torch.allclose(cached.logp, full.logp, atol=1e-5) and torch.equal(cached.mask, full.mask)


def test_fsdp_settings_come_from_the_accelerate_launch_environment(monkeypatch):
    monkeypatch.delenv("FSDP_SHARDING_STRATEGY", raising=False)
    for raw, reshard in (("true", True), ("false", False), ("FULL_SHARD", True), ("SHARD_GRAD_OP", False)):
        monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", raw)
        assert sharding.settings_from_env().reshard_after_forward is reshard
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    assert sharding.settings_from_env().offload_params
    for raw, words in (("NO_SHARD", "ddp_gpu.yaml"), ("HYBRID_SHARD", "hybrid"), ("maybe", "not understood")):
        monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", raw)
        with pytest.raises(VlrlcdError, match=words):
            sharding.settings_from_env()


def test_deepspeed_config_is_made_concrete_for_a_hooks_only_engine():
    user = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto",
            "steps_per_print": float("inf"), "bf16": {"enabled": "auto"},
            "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}, "reduce_bucket_size": 7}}
    cfg = sharding._deepspeed_config(user, world=4, hidden=64)
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["steps_per_print"]) == (4, 1, 10**9)
    assert "gradient_clipping" not in cfg and cfg["bf16"] == {"enabled": False} and cfg["fp16"] == {"enabled": False}
    zero = cfg["zero_optimization"]
    assert zero["offload_param"] == {"device": "cpu"} and zero["reduce_bucket_size"] == 7  # the user's stay
    assert zero["stage3_param_persistence_threshold"] == 640 and zero["stage3_prefetch_bucket_size"] == 3686
    assert zero["memory_efficient_linear"] is False
    assert user["zero_optimization"] == {"stage": 3, "offload_param": {"device": "cpu"}, "reduce_bucket_size": 7}


def test_deepspeed_stages_below_3_run_data_parallel(monkeypatch, capsys):
    pytest.importorskip("deepspeed")
    for k, v in {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
                 "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "1"}.items():
        monkeypatch.setenv(k, v)
    assert sharding.zero_settings_from_env().stage == 2
    dist = setup_distributed()
    assert dist.zero3 is None and not dist.sharded


def test_decoder_layers_are_the_language_model_s_only(tmp_path):
    base = build("llava", tmp_path / "llava")
    student = load_student(StudentConfig(name_or_path=str(base)))
    layers = sharding.decoder_layers(student.model)
    names = {n for n, m in student.model.named_modules() if any(m is x for x in layers)}
    assert names and all("language_model" in n and "vision" not in n for n in names)


def test_fsdp_needs_a_batch_every_process_can_share_equally(text_student, tmp_path):
    student, _ = text_student
    recs, anchors = records("text", tmp_path)
    dist = Dist(rank=0, world=3, fsdp=sharding.FSDPSettings())
    with pytest.raises(VlrlcdError, match="multiple of the 3"):
        train_rl(student, recs, anchors, TrainConfig(rl_steps=1, batch_size=4), RankingConfig(), MAX_NEW,
                 tmp_path / "rl", dist=dist)


class _Judge:
    """A stand-in teacher judge: 1.0 for the anchor, 0.0 otherwise; or fails like a dead endpoint."""

    calls = 0

    def __init__(self, fail: bool):
        self.fail = fail

    def __call__(self, record, text, anchor) -> float:
        from vlrlcd.teacher.base import TeacherCallError

        if self.fail:
            raise TeacherCallError("server_error", "503 after retries", retryable=True)
        return float(text == anchor)


def _passes(student, fn) -> list[bool]:
    """Whether gradient was on, for every forward of the student's language model while `fn` runs."""
    seen: list[bool] = []
    handle = student.model.get_base_model().register_forward_pre_hook(
        lambda *_: seen.append(torch.is_grad_enabled()))
    try:
        fn()
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("objective", sorted(names()))
def test_every_objective_makes_the_same_passes_for_every_kind_of_group(objective, text_student, tmp_path):
    """The lockstep invariant behind FSDP: with `lockstep` set, the sequence of forwards (and the backward)
    of one prompt's rollout and loss does not depend on the prompt or on the group (verifiable reference or
    not, a group with no preference pair, a judge that failed)."""
    student, root = text_student
    recs, anchors = records("text", tmp_path)
    cfg = TrainConfig(objective=objective, k=3, tvkd_dpo=TvkdDpoConfig(teacher=str(root / "base")))
    rcfg = RankingConfig()
    student.lockstep = lambda done: done
    try:
        groups, rollout_passes = [], []
        for i, rec in enumerate(recs):
            box = {}
            rollout_passes.append(_passes(student, lambda: box.update(g=rollout(
                student, rec, anchors[rec.id], cfg, rcfg, MAX_NEW, sample_generator(0, 0, i)))))
            groups.append((box["g"], False))
        tie = groups[1][0]  # every candidate is the anchor: no pair, a flat ranking
        tie = type(tie)(tie.record, tie.anchor, tie.prefix, [student.encode_response(tie.anchor)] * len(tie.candidates),
                        [tie.anchor] * len(tie.candidates), tie.scores, torch.zeros_like(tie.margins),
                        torch.full_like(tie.target, 1.0 / max(1, tie.target.numel())))
        groups += [(tie, False), (groups[0][0], True)]
        loss_passes = []
        for group, judge_fails in groups:
            ctx = StepContext(step=0, total_steps=1, ranking=rcfg, judge=_Judge(judge_fails))
            box = {}
            student.model.train()
            loss_passes.append(_passes(student, lambda: box.update(out=group_loss(student, group, cfg, ctx))))
            loss = box["out"][0]
            assert loss.requires_grad and loss.grad_fn is not None  # the backward passes run too
            loss.backward()
            student.model.zero_grad(set_to_none=True)
            student.model.eval()
            for c in ctx.closers:
                c()
    finally:
        student.lockstep = None
        student.model.eval()
    assert all(p == rollout_passes[0] for p in rollout_passes), rollout_passes
    assert all(p == loss_passes[0] for p in loss_passes), loss_passes
    assert any(loss_passes[0])  # the loss goes through the model with gradient


@pytest.mark.parametrize("objective", sorted(names()))
def test_every_step_of_the_loop_makes_the_same_passes_whatever_its_groups(objective, text_student, tmp_path):
    """The lockstep invariant at the loop's level, where a step's log-prob passes are batched across its groups
    (rollout_batch, then losses_and_backward): a step whose groups are all verifiable, all unverifiable, all
    without a preference pair, or all judge-failed makes the same forwards (and as many backwards) as any other."""
    student, root = text_student
    recs, anchors = records("text", tmp_path)
    cfg = TrainConfig(objective=objective, k=3, tvkd_dpo=TvkdDpoConfig(teacher=str(root / "base")))
    rcfg = RankingConfig()
    sharded = Dist(rank=0, world=2, fsdp=sharding.FSDPSettings())
    param = student.trainable_parameters()[0]
    cache: dict = {}  # one tvkd teacher for every step
    student.lockstep = lambda done: done
    try:
        def step_rollout(batch):
            student.model.eval()
            return rollout_batch(student, batch, [anchors[r.id] for r in batch], cfg, rcfg, MAX_NEW,
                                 [sample_generator(0, 0, i) for i in range(len(batch))])

        rollout_passes, box = [], {}
        for batch in ([recs[0], recs[1]], [recs[0], recs[0]], [recs[1], recs[1]]):
            rollout_passes.append(_passes(student, lambda: box.update(groups=step_rollout(batch))))
        verifiable, plain = step_rollout(recs)
        tie = replace(plain, candidates=[student.encode_response(plain.anchor)] * len(plain.candidates),
                      texts=[plain.anchor] * len(plain.candidates), margins=torch.zeros_like(plain.margins),
                      target=torch.full_like(plain.target, 1.0 / max(1, plain.target.numel())))
        steps = {"mixed": ([verifiable, plain], False), "verifiable": ([verifiable, verifiable], False),
                 "unverifiable": ([plain, plain], False), "no pair": ([tie, tie], False),
                 "judge failed": ([verifiable, plain], True), "no pair, judge failed": ([tie, plain], True)}
        seen = {}
        for name, (groups, judge_fails) in steps.items():
            ctx = StepContext(step=0, total_steps=1, ranking=rcfg, judge=_Judge(judge_fails), cache=cache)
            groups = [replace(g) for g in groups]
            backwards: list[int] = []
            hook = param.register_hook(lambda grad: backwards.append(1))
            student.model.train()
            try:
                forwards = _passes(student, lambda: losses_and_backward(student, groups, get_method(objective), cfg,
                                                                        ctx, 2, sharded))
            finally:
                hook.remove()
                student.model.zero_grad(set_to_none=True)
                student.model.eval()
            seen[name] = (forwards, len(backwards))
    finally:
        student.lockstep = None
        student.model.eval()
    assert all(p == rollout_passes[0] for p in rollout_passes), rollout_passes
    first = next(iter(seen.values()))
    assert all(v == first for v in seen.values()), seen
    assert any(first[0]) and first[1] >= 1  # the loss goes through the model with gradient, and backward runs


def test_zero3_refuses_a_trainable_copy_of_a_partitioned_module():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    sharding.check_zero3_adapters(model)  # plain trainable weights are fine
    model[0].weight.ds_id = 3  # what a modules_to_save copy of a ZeRO-3 module looks like
    with pytest.raises(VlrlcdError, match="modules_to_save"):
        sharding.check_zero3_adapters(model)
