"""Config: YAML into dataclasses, dotted overrides, errors that name the key."""

import pytest

from vlrlcd.config import Config, apply_overrides, from_dict, load_config
from vlrlcd.errors import VlrlcdError


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 0.001\n  k: 4\nstudent:\n  lora: {r: 8}\n")
    cfg = load_config(p, ["train.k=6", "ranking.tau=0.25", "student.lora.alpha=16", "data.task=arithmetic"])
    assert isinstance(cfg, Config)
    assert cfg.train.lr == 0.001 and cfg.train.k == 6
    assert cfg.ranking.tau == 0.25 and cfg.student.lora.r == 8 and cfg.student.lora.alpha == 16
    assert cfg.data.task == "arithmetic"


def test_int_accepts_integral_float_and_float_accepts_int():
    cfg = from_dict(Config, {"train": {"k": 4.0, "lr": 1}})
    assert cfg.train.k == 4 and isinstance(cfg.train.k, int)
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


def test_unknown_key_names_closest():
    with pytest.raises(VlrlcdError, match=r"unknown config key 'train.lrr'.*did you mean 'train.lr'"):
        load_config(None, ["train.lrr=0.1"])
    with pytest.raises(VlrlcdError, match=r"'trian'.*did you mean 'train'"):
        from_dict(Config, {"trian": {}})


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("ranking:\n  temperture: 1.0\n")
    with pytest.raises(VlrlcdError, match="ranking.temperture"):
        load_config(p)


def test_non_numeric_override():
    with pytest.raises(VlrlcdError, match=r"'train.lr' expects a number, got 'fast'"):
        load_config(None, ["train.lr=fast"])
    with pytest.raises(VlrlcdError, match=r"'train.k' expects an integer"):
        load_config(None, ["train.k=2.5"])


def test_bad_values_and_forms():
    with pytest.raises(VlrlcdError, match="not of the form"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(VlrlcdError, match="train.objective"):
        load_config(None, ["train.objective=magic"])
    with pytest.raises(VlrlcdError, match="ranking.tau"):
        load_config(None, ["ranking.tau=0"])
    with pytest.raises(VlrlcdError, match="is not a section"):
        load_config(None, ["seed.x=1"])


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(VlrlcdError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(VlrlcdError, match="not valid YAML"):
        load_config(bad)


def test_method_sections_and_the_flat_keys_they_replace(tmp_path):
    """A method's keys live in train.<section>.*; every flat key of earlier versions is refused in one line
    that names its new key, from an override and from a recipe alike."""
    from vlrlcd.training.config import TrainConfig

    p = tmp_path / "c.yaml"
    p.write_text("train:\n  objective: tvkd_dpo\n  tvkd_dpo: {teacher: /models/t, topk: 8}\n  grpo: {loss_type: bnpo}\n")
    cfg = load_config(p, ["train.rlsd.lambda0=0.5", "train.dpo.beta=0.2", "train.self_ppo.eps=0.1"])
    t = cfg.train
    assert (t.tvkd_dpo.teacher, t.tvkd_dpo.topk, t.grpo.loss_type) == ("/models/t", 8, "bnpo")
    assert (t.rlsd.lambda0, t.dpo.beta, t.self_ppo.eps) == (0.5, 0.2, 0.1)
    assert len(TrainConfig.RENAMED) == 16
    for old, new in TrainConfig.RENAMED.items():
        with pytest.raises(VlrlcdError) as e:
            load_config(None, [f"train.{old}=1"])
        assert str(e.value) == (f"config key 'train.{old}' is now 'train.{new}'; rename it in the recipe or the "
                                "override")
        value = {"grpo.loss_type": "bnpo", "grpo.scale_rewards": "false", "tvkd_dpo.teacher_quantization": "4bit",
                 "rlsd.decay_steps": "3", "tvkd_dpo.topk": "3"}.get(new, "0.5")
        load_config(None, [f"train.{new}={value}"])  # the new key exists
    p.write_text("train:\n  tvkd_alpha: 2.0\n")
    with pytest.raises(VlrlcdError, match=r"^config key 'train.tvkd_alpha' is now 'train.tvkd_dpo.alpha'"):
        load_config(p)
    with pytest.raises(VlrlcdError, match=r"train.grpo.loss_type 'ppo' is not one of"):
        load_config(None, ["train.grpo.loss_type=ppo"])
    with pytest.raises(VlrlcdError, match=r"train.ldl_grpo.form 'sideways' is not one of forward, reverse"):
        load_config(None, ["train.ldl_grpo.form=sideways"])
    assert load_config(None, ["train.ldl_grpo.form=reverse"]).train.ldl_grpo.form == "reverse"
    with pytest.raises(VlrlcdError, match=r"train.ldl_grpo.entropy"):
        load_config(None, ["train.ldl_grpo.entropy=1.5"])


def _old_run_config(tmp_path, **removed):
    """RUN/config.yaml as an earlier version saved it: every key, the removed ones among them."""
    import yaml

    from vlrlcd.config import to_dict

    d = to_dict(Config())
    for dotted, value in removed.items():
        section, key = dotted.split("__")
        d[section][key] = value
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False), encoding="utf-8")
    return p


def test_a_removed_key_at_its_old_default_loads_with_one_note(tmp_path, capsys, monkeypatch):
    import vlrlcd.config as config

    monkeypatch.setattr(config, "_noted", set())
    p = _old_run_config(tmp_path, teacher__call_in_training=False)
    assert load_config(p) == load_config(None)
    assert load_config(p, ["teacher.call_in_training=false"]) == load_config(None)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("note: ignoring config key 'teacher.call_in_training: false' (removed")
    assert "vlrlcd anchors CONFIG" in err[0]


def test_a_removed_key_asking_for_something_is_a_one_line_error(tmp_path, capsys):
    from vlrlcd.cli import main

    p = _old_run_config(tmp_path, teacher__call_in_training=True)
    with pytest.raises(VlrlcdError, match=r"config key 'teacher.call_in_training' was removed \(training never "
                                          r"calls the teacher.*\); delete it from the config"):
        load_config(p)
    with pytest.raises(VlrlcdError, match="'teacher.call_in_training' was removed"):
        load_config(None, ["teacher.call_in_training=true"])
    assert main(["anchors", str(p)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: config key 'teacher.call_in_training' was removed")


def test_train_log_every_is_removed(tmp_path, monkeypatch):
    import vlrlcd.config as config

    monkeypatch.setattr(config, "_noted", set())
    assert load_config(_old_run_config(tmp_path, train__log_every=1)) == load_config(None)
    with pytest.raises(VlrlcdError, match="'train.log_every' was removed"):
        load_config(None, ["train.log_every=10"])


def test_torch_free_copies_of_objective_names_match_the_objectives():
    """methods/config.py keeps torch-free copies of the names the objectives accept; they must not drift."""
    from vlrlcd.methods.config import GRPO_LOSS_TYPES, LDL_FORMS
    from vlrlcd.objectives.common import LOSS_TYPES
    from vlrlcd.objectives.ldl_grpo import LDL_FORMS as OBJECTIVE_LDL_FORMS

    assert GRPO_LOSS_TYPES == LOSS_TYPES and LDL_FORMS == OBJECTIVE_LDL_FORMS
