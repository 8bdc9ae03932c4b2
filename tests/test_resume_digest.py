"""`--resume` reuses or continues a stage only when everything that determines it is unchanged (config keys it
reads, student, data, anchors, the stage it starts from); otherwise one error line names the keys that changed
and says what to do. `--restart-stage` trains a stage (and, for sft, every later one) again. The digest is
stable across processes and leaves out what cannot change a stage's result."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vlrlcd import cli
from vlrlcd.config import load_config
from vlrlcd.pipeline import INPUTS_FILE, STAGE_FILE, stage_config_inputs
from vlrlcd.training.digest import changed_keys, digest_of

ROOT = Path(__file__).resolve().parents[1]

RUN = {
    "seed": 0,
    "data": {"task": "arithmetic", "train_size": 4, "eval_size": 2, "max_operand": 9},
    "teacher": {"backend": "oracle"},
    "student": {"name_or_path": "tiny-text", "max_new_tokens": 3, "lora": {"r": 4, "alpha": 8},
                "tiny": {"vocab_size": 300, "hidden_size": 32, "num_layers": 1, "num_heads": 2,
                         "intermediate_size": 64}},
    "train": {"objective": "ldl_grpo", "sft_epochs": 1, "sft_batch_size": 2, "sft_lr": 0.01, "rl_steps": 2,
              "batch_size": 2, "k": 2, "lr": 0.01, "tensorboard": False},
    "eval": {"max_new_tokens": 3, "train_prompts": 0},
}


def write_config(path: Path, run_dir: Path) -> Path:
    path.write_text(yaml.safe_dump({**RUN, "run_dir": str(run_dir)}), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One finished run (sft, then ldl_grpo); every test resumes a copy of it."""
    root = tmp_path_factory.mktemp("digest")
    run = root / "run"
    assert cli.main(["train", str(write_config(root / "c.yaml", run)), "--no-progress"]) == 0
    return run


@pytest.fixture
def run(trained, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    copy = tmp_path / "copy"  # another run_dir: it is not part of any digest
    shutil.copytree(trained, copy)
    return copy


def train(run: Path, *args: str) -> int:
    return cli.main(["train", str(write_config(run.parent / "c.yaml", run)), "--no-progress", *args])


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error:")]


def snapshot(run: Path) -> dict[str, bytes]:
    names = ["config.yaml"] + [f"{s}/{f}" for s in ("sft", "ldl_grpo")
                               for f in (STAGE_FILE, INPUTS_FILE, "metrics.jsonl", "adapter/adapter_model.safetensors")]
    return {n: (run / n).read_bytes() for n in names}


@pytest.mark.parametrize("override,needles", [
    ("train.lr=0.02", ["ldl_grpo:", "train.lr 0.01 -> 0.02", "--restart-stage ldl_grpo", "new run_dir"]),
    ("train.rl_steps=3", ["ldl_grpo:", "train.rl_steps 2 -> 3", "--restart-stage ldl_grpo"]),
    ("student.name_or_path=tiny-llava", ["sft:", "student.name_or_path tiny-text -> tiny-llava",
                                         "--restart-stage sft to train it and the stages after it"]),
    ("student.quantization=4bit", ["sft:", "student.quantization none -> 4bit", "--restart-stage sft"]),
    ("data.train_size=6", ["sft:", "data.train_size 4 -> 6"]),
])
def test_a_changed_setting_stops_resume_with_one_line_naming_it(run, capsys, override, needles):
    before = snapshot(run)
    capsys.readouterr()
    assert train(run, "--resume", override) == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and all(n in lines[0] for n in needles), lines
    assert snapshot(run) == before  # nothing written: config.yaml still describes the trained run


def test_changed_anchors_are_named_after_the_data_is_loaded(run, capsys):
    """teacher.error_rate is not read by a stage, but it changes the anchors SFT trains on."""
    capsys.readouterr()
    assert train(run, "--resume", "teacher.error_rate=1.0") == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "sft:" in lines[0] and "anchors changed" in lines[0], lines


def test_settings_that_cannot_change_a_result_reuse_it_and_eval_settings_re_evaluate(run, capsys):
    before = snapshot(run)
    capsys.readouterr()
    assert train(run, "--resume", "train.save_every=1", "train.keep_checkpoints=5", "train.group_chunk=1",
                 "train.grad_accum=2", "train.max_bad_steps=9", "train.tvkd_dpo.alpha=3.0", "teacher.concurrency=1") == 0
    out = capsys.readouterr().out
    assert "sft: finished by an earlier run" in out and "ldl_grpo: finished by an earlier run" in out
    after = snapshot(run)
    assert {k: v for k, v in after.items() if k != "config.yaml"} == {k: v for k, v in before.items()
                                                                      if k != "config.yaml"}
    # a new evaluation setting: the adapters are reused and evaluated again, nothing is trained
    assert train(run, "--resume", "eval.max_new_tokens=2") == 0
    out = capsys.readouterr().out
    assert "sft: finished by an earlier run; evaluating" in out and "eval.max_new_tokens 3 -> 2" in out
    for stage in ("sft", "ldl_grpo"):
        for f in ("metrics.jsonl", "adapter/adapter_model.safetensors"):
            assert (run / stage / f).read_bytes() == before[f"{stage}/{f}"]
        assert json.loads((run / stage / STAGE_FILE).read_text())["eval_inputs"]["eval.max_new_tokens"] == 2
    assert train(run, "--resume", "eval.max_new_tokens=2") == 0
    assert "evaluating" not in capsys.readouterr().out


def test_restart_stage_trains_that_stage_again_and_sft_every_stage(run, capsys):
    sft_before = (run / "sft" / "adapter" / "adapter_model.safetensors").read_bytes()
    capsys.readouterr()
    assert train(run, "--restart-stage", "ldl_grpo", "train.lr=0.02") == 0  # --resume is implied
    out = capsys.readouterr().out
    assert "sft: finished by an earlier run" in out and "ldl_grpo: finished" not in out
    assert json.loads((run / "ldl_grpo" / STAGE_FILE).read_text())["inputs"]["train.lr"] == 0.02
    assert (run / "sft" / "adapter" / "adapter_model.safetensors").read_bytes() == sft_before
    assert train(run, "--resume", "train.lr=0.02") == 0
    assert "ldl_grpo: finished by an earlier run" in capsys.readouterr().out
    # sft again: the ldl_grpo stage on top of it is trained again too
    assert train(run, "--restart-stage", "sft", "train.lr=0.02", "train.sft_lr=0.02") == 0
    out = capsys.readouterr().out
    assert "finished by an earlier run" not in out
    assert (run / "sft" / "adapter" / "adapter_model.safetensors").read_bytes() != sft_before
    assert json.loads((run / "sft" / STAGE_FILE).read_text())["inputs"]["train.sft_lr"] == 0.02
    assert train(run, "--restart-stage", "ldl") == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "not a stage of this run; its stages are sft, ldl_grpo" in lines[0]


def test_a_later_stage_is_never_reused_on_top_of_a_changed_earlier_one(run, capsys):
    # stage I alone trained again with another learning rate (a fresh run of objective sft in the same run_dir)
    assert train(run, "train.objective=sft", "train.sft_lr=0.02") == 0
    capsys.readouterr()
    # resuming the full recipe: sft is reused, but ldl_grpo was trained from the old sft adapter
    assert train(run, "--resume", "train.sft_lr=0.02") == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "ldl_grpo:" in lines[0] and "start (the adapter this stage starts from) changed" in lines[0], lines
    assert "--restart-stage ldl_grpo" in lines[0]


def test_an_unfinished_stage_with_changed_settings_is_not_continued(run, capsys):
    (run / "ldl_grpo" / STAGE_FILE).unlink()  # as if killed after its last checkpoint: inputs.json remains
    assert train(run, "--resume", "train.lr=0.05") == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "train.lr 0.01 -> 0.05" in lines[0]
    assert train(run, "--resume") == 0  # the same settings: continued from its final checkpoint
    assert "resuming after step 2" in capsys.readouterr().err


def test_a_stage_that_kept_nothing_starts_over_with_the_new_settings(run, capsys):
    """Started but killed before its first checkpoint: nothing would be reused, so there is nothing to refuse."""
    from vlrlcd.training.checkpoint import clear_checkpoints

    (run / "ldl_grpo" / STAGE_FILE).unlink()
    clear_checkpoints(run / "ldl_grpo")
    capsys.readouterr()
    assert train(run, "--resume", "train.lr=0.05") == 0
    assert "sft: finished by an earlier run" in capsys.readouterr().out
    assert json.loads((run / "ldl_grpo" / STAGE_FILE).read_text())["inputs"]["train.lr"] == 0.05


def test_a_stage_without_a_record_of_its_settings_is_not_trusted(run, capsys):
    rec = json.loads((run / "sft" / STAGE_FILE).read_text())
    (run / "sft" / STAGE_FILE).write_text(json.dumps({"done": True, "start": rec["start"], "metrics": {}}))
    (run / "sft" / INPUTS_FILE).unlink()
    capsys.readouterr()
    assert train(run, "--resume") == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "no record of the settings" in lines[0] and "--restart-stage sft" in lines[0]


def test_compare_resume_checks_each_objective(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run")
    args = ["compare", str(cfg), "--objectives", "sft2", "--no-progress"]
    assert cli.main(args) == 0
    capsys.readouterr()
    assert cli.main(args + ["--resume", "train.lr=0.03"]) == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "sft2:" in lines[0] and "train.lr 0.01 -> 0.03" in lines[0]
    assert cli.main(args + ["--restart-stage", "sft2", "train.lr=0.03"]) == 0
    out = capsys.readouterr().out
    assert "sft: finished by an earlier run" in out and "sft2: finished" not in out


# ------------------------------------------------------------------ the digest itself

def _cfg(*overrides: str):
    return load_config(None, ["student.name_or_path=tiny-text", *overrides])


def test_inputs_leave_out_what_cannot_change_a_result():
    base = {s: stage_config_inputs(_cfg(), s) for s in ("sft", "ldl_grpo", "tvkd_dpo", "judge_grpo")}
    same = ["run_dir=/elsewhere", "train.save_every=3", "train.tensorboard=false", "train.keep_checkpoints=1",
            "eval.max_new_tokens=99", "eval.batch_size=1", "teacher.timeout_s=5", "data.eval_size=7"]
    for s, inputs in base.items():
        assert stage_config_inputs(_cfg(*same), s) == inputs, s
    assert "train.lr" not in base["sft"] and "train.sft_lr" not in base["ldl_grpo"]
    assert "student.max_new_tokens" not in base["sft"] and "student.max_new_tokens" in base["ldl_grpo"]
    # an objective's own keys count for that objective only
    assert stage_config_inputs(_cfg("train.tvkd_dpo.alpha=2"), "ldl_grpo") == base["ldl_grpo"]
    assert changed_keys(base["tvkd_dpo"], stage_config_inputs(_cfg("train.tvkd_dpo.alpha=2"), "tvkd_dpo")) == [
        "train.tvkd_dpo.alpha"]
    # judge_grpo asks the teacher during the stage: what it answers with counts, how it is reached does not
    assert changed_keys(base["judge_grpo"], stage_config_inputs(_cfg("teacher.model=other"), "judge_grpo")) == ["teacher.model"]
    assert stage_config_inputs(_cfg("teacher.model=other"), "ldl_grpo") == base["ldl_grpo"]


def test_a_method_section_counts_for_the_methods_that_read_it():
    """train.<section>.* (Method.sections): the GRPO family's keys for anchor_grpo, judge_grpo and rlsd, the
    DPO family's for the DPO methods, a method's own section for it alone; sft2 reads no ranking key."""
    methods = ("ldl_grpo", "sft2", "single_pair_dpo", "anchor_rank_dpo", "anchor_grpo", "judge_grpo", "self_ppo",
               "rlsd", "tvkd_dpo")
    base = {m: stage_config_inputs(_cfg(), m) for m in methods}
    readers = {"train.grpo.eps_low=0.3": {"anchor_grpo", "judge_grpo", "rlsd"},
               "train.dpo.beta=0.3": {"single_pair_dpo", "anchor_rank_dpo", "tvkd_dpo"},
               "train.rlsd.lambda0=0.5": {"rlsd"}, "train.self_ppo.eps=0.1": {"self_ppo"},
               "train.ldl_grpo.nll=0.5": {"ldl_grpo"}, "train.ldl_grpo.form=reverse": {"ldl_grpo"},
               "ranking.tau=0.25": set(methods) - {"sft2"}}
    for override, users in readers.items():
        key = override.split("=")[0]
        for m in methods:
            want = [key] if m in users else []
            assert changed_keys(base[m], stage_config_inputs(_cfg(override), m)) == want, (override, m)


def test_digest_is_stable_across_processes_and_key_order():
    assert digest_of({"a": 1, "b": [1.5, None]}) == digest_of({"b": [1.5, None], "a": 1})
    assert digest_of({"a": 1}) != digest_of({"a": 1.5})
    code = ("from vlrlcd.config import load_config; from vlrlcd.pipeline import stage_config_inputs; "
            "from vlrlcd.training.digest import digest_of; "
            "print(digest_of(stage_config_inputs(load_config(None, ['student.name_or_path=tiny-text']), 'ldl_grpo')))")
    outs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        outs.add(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                                timeout=120).stdout.strip())
    assert outs == {digest_of(stage_config_inputs(_cfg(), "ldl_grpo"))}


def test_a_key_added_later_counts_only_once_it_is_on():
    """student.tiny.tower_pretrain_epochs and pretrain_sides came after runs were recorded: off (0, false) they
    are left out, so those runs still resume; set, each counts for stage I and stage II alike."""
    for stage in ("sft", "ldl_grpo"):
        off = stage_config_inputs(_cfg("student.name_or_path=tiny-llava"), stage)
        assert not any("tower_pretrain" in k or "pretrain_sides" in k for k in off)
        for key, value in (("tower_pretrain_epochs", "1"), ("pretrain_sides", "true")):
            on = stage_config_inputs(_cfg("student.name_or_path=tiny-llava", f"student.tiny.{key}={value}"), stage)
            assert changed_keys(off, on) == [f"student.tiny.{key}"], stage


def test_ldl_grpo_form_counts_only_once_it_is_reverse():
    """train.ldl_grpo.form and .entropy came after runs were recorded: at forward and 0 (the method before them)
    they are left out of the stage-II digest, so those runs still resume; set, each counts."""
    off = stage_config_inputs(_cfg(), "ldl_grpo")
    assert "train.ldl_grpo.form" not in off and "train.ldl_grpo.entropy" not in off and "train.ldl_grpo.nll" in off
    on = stage_config_inputs(_cfg("train.ldl_grpo.form=reverse"), "ldl_grpo")
    assert changed_keys(off, on) == ["train.ldl_grpo.form"]
    both = stage_config_inputs(_cfg("train.ldl_grpo.form=reverse", "train.ldl_grpo.entropy=1"), "ldl_grpo")
    assert changed_keys(on, both) == ["train.ldl_grpo.entropy"]
