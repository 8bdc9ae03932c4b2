"""bench/seeds_table.py: the README's multi-seed table from summary.json files."""

import json

from bench.seeds_table import held_out_metric, table


def _run(path, seed, sft, ldl, lo, hi):
    path.mkdir()
    methods = {"sft": {"accuracy": sft, "train_accuracy": 0.9, "n": 4, "seconds": 1},
               "ldl_grpo": {"accuracy": ldl, "n": 4, "seconds": 1, "diff_vs_sft": ldl - sft, "diff_low": lo,
                            "diff_high": hi, "diff_n": 4}}
    (path / "summary.json").write_text(json.dumps({"methods": methods, "seed": seed, "eval_prompts": 4,
                                                   "teacher_calls": 10, "chance": 0.25}))
    return path


def test_held_out_metric_skips_training_and_bookkeeping_keys():
    assert held_out_metric({"train_accuracy": 1.0, "n": 3, "accuracy": 0.5}) == ("accuracy", 0.5)
    assert held_out_metric({"n": 3}) is None


def test_table_means_and_intervals(tmp_path):
    runs = [_run(tmp_path / "a", 0, 0.50, 0.60, 0.02, 0.18), _run(tmp_path / "b", 1, 0.40, 0.40, -0.1, 0.1)]
    out = table(runs)
    row = next(line for line in out.splitlines() if line.startswith("| ldl_grpo"))
    assert "0.600 (+0.100 [+0.020, +0.180])" in row and "**0.500**" in row and "+0.050" in row and "1/2" in row
    assert next(line for line in out.splitlines() if line.startswith("| sft")).count("**0.450**") == 1
    assert "chance level: [0.25, 0.25]" in out and "teacher calls per run: [10, 10]" in out


def test_by_qtype_scores_and_constant_share(tmp_path):
    from bench.by_qtype import method_rows, qtypes, table

    (tmp_path / "data").mkdir()
    (tmp_path / "sft").mkdir()
    recs = [("a", "color"), ("b", "color"), ("c", "count"), ("d", "color")]
    (tmp_path / "data" / "eval.jsonl").write_text("".join(json.dumps({"id": i, "meta": {"qtype": q}}) + "\n"
                                                          for i, q in recs))
    preds = [("a", "red", 1.0), ("b", "red", 0.0), ("c", "2", 1.0), ("d", "blue", 1.0)]
    (tmp_path / "sft" / "predictions.jsonl").write_text("".join(
        json.dumps({"id": i, "prediction": p, "correct": c}) + "\n" for i, p, c in preds))
    rows = method_rows(tmp_path, "sft", qtypes(tmp_path))
    assert rows["color"] == (2 / 3, 2 / 3, 3) and rows["count"] == (1.0, 1.0, 1)
    assert "| sft | 0.667 (0.67) | 1.000 (1.00) |" in table([tmp_path])
