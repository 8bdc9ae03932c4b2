"""The command line: bad input gives a one-line error naming the problem, never a traceback."""

import os
import subprocess
import sys

import pytest

from vlrlcd.cli import main


def _run(args, tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "vlrlcd.cli", *args], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=120)


@pytest.mark.parametrize("args,needle", [
    (["demo", "--quick", "train.lrr=1"], "did you mean 'train.lr'"),
    (["demo", "--quick", "train.k=many"], "'train.k' expects an integer"),
    (["demo", "--quick", "--out", "/proc/forbidden/run"], "cannot write to run directory"),
])
def test_demo_bad_input_is_one_line(tmp_path, args, needle):
    res = _run(args, tmp_path)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], res.stderr


def test_config_errors_in_process(tmp_path, capsys):
    assert main(["anchors", str(tmp_path / "missing.yaml")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "does not exist" in err
