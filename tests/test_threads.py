"""The CPU thread policy (vlrlcd/threads.py): OMP_NUM_THREADS or an explicit torch.set_num_threads wins;
otherwise one thread on CPU, torch's default with a CUDA device; one line says which, once."""

import os
import subprocess
import sys

import pytest
import torch

from vlrlcd import threads


@pytest.fixture
def keep_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_an_environment_variable_wins():
    assert threads.choose_threads({"OMP_NUM_THREADS": "3"}, cuda=False) == (None, "OMP_NUM_THREADS=3")
    assert threads.choose_threads({"MKL_NUM_THREADS": "2"}, cuda=True) == (None, "MKL_NUM_THREADS=2")


def test_unset_means_one_thread_on_cpu_and_the_default_with_cuda(monkeypatch):
    monkeypatch.setattr(threads, "_last_count", torch.get_num_threads())  # nobody changed it since
    assert threads.choose_threads({}, cuda=False) == (1, "OMP_NUM_THREADS unset; set it to use more")
    n, why = threads.choose_threads({}, cuda=True)
    assert n is None and "CUDA" in why


def test_an_explicit_set_num_threads_wins(monkeypatch):
    monkeypatch.setattr(threads, "_last_count", torch.get_num_threads() + 1)  # as if the program changed it
    assert threads.choose_threads({}, cuda=False) == (None, "set by torch.set_num_threads")


def test_apply_sets_one_thread_and_prints_one_line_once(monkeypatch, capsys, keep_torch_threads):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    torch.set_num_threads(2)
    monkeypatch.setattr(threads, "_last_count", 2)  # 2 is the count torch started with
    monkeypatch.setattr(threads, "_announced", False)
    assert threads.apply_thread_policy() == 1 and torch.get_num_threads() == 1
    assert threads.apply_thread_policy() == 1  # a second command in the same process: same choice, no line
    assert capsys.readouterr().out == "threads: 1 (OMP_NUM_THREADS unset; set it to use more)\n"
    torch.set_num_threads(2)  # the program sets its own count between two commands: kept
    assert threads.apply_thread_policy() == 2


def test_only_the_first_process_prints(monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(threads, "_announced", False)
    threads.apply_thread_policy()
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("omp,line,count", [
    (None, "threads: 1 (OMP_NUM_THREADS unset; set it to use more)", 1),
    ("2", "threads: 2 (OMP_NUM_THREADS=2)", 2),
])
def test_the_command_line_applies_the_policy(tmp_path, omp, line, count):
    """A fresh process through cli.main, without a GPU: the line first, then torch computes with that count."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RANK")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    if omp is not None:
        env["OMP_NUM_THREADS"] = omp
    code = ("import torch; from vlrlcd.cli import main; "
            f"rc = main(['anchors', {str(tmp_path / 'missing.yaml')!r}]); print(rc, torch.get_num_threads())")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.stdout.splitlines() == [line, f"1 {count}"], res.stdout + res.stderr
