"""`vlrlcd report` on a run directory it cannot write: one error line saying what to do, no traceback, nothing
rendered first. The command runs in a real process without write permission (under root, which ignores
permission bits, with CAP_DAC_OVERRIDE and CAP_FOWNER dropped by setpriv)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tree(root: Path, dir_mode: int, file_mode: int) -> None:
    for p in [root, *root.rglob("*")]:
        p.chmod(dir_mode if p.is_dir() else file_mode)


def _without_override() -> list[str]:
    """A command prefix under which the run directory's permission bits hold."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: permission bits cannot be enforced")
    caps = "-dac_override,-fowner"
    return [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}"]


def test_report_on_a_read_only_run_directory_is_one_line(tmp_path):
    run = tmp_path / "run"
    (run / "sft").mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"methods": {"sft": {"accuracy": 0.5, "n": 2}}}))
    (run / "sft" / "metrics.jsonl").write_text(json.dumps({"stage": "sft", "step": 1, "loss": 1.0}) + "\n")
    _tree(run, 0o555, 0o444)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLCONFIGDIR": str(tmp_path / "mpl"), "PYTHONWARNINGS": "ignore"}
    try:
        res = subprocess.run([*_without_override(), sys.executable, "-m", "vlrlcd.cli", "report", str(run)],
                             capture_output=True, text=True, cwd=ROOT, env=env, timeout=180)
    finally:
        _tree(run, stat.S_IRWXU, 0o644)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"cannot write {run / 'report.html'}" in lines[0], res.stderr
    assert "copy it elsewhere" in lines[0]
    assert sorted(p.name for p in run.iterdir()) == ["sft", "summary.json"]
