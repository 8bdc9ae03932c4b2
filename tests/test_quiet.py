"""What a new user sees: `vlrlcd train` on a tiny recipe and the default quick demo print no warning, no
deprecation notice, no third-party "failed to load" line and no traceback, with Python's default warning
filters (nothing hidden by PYTHONWARNINGS or pytest's filters)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "tiny_text_arithmetic.yaml"
NOISE = re.compile(r"Warning|WARNING|warn\(|Failed to load|deprecated|Deprecat|Traceback")


def _run(*args: str, cwd: Path) -> str:
    """`vlrlcd ARGS` in a fresh process as a user runs it (one thread, Python's default warning filters);
    its stdout + stderr."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "DS_ACCELERATOR")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    res = subprocess.run([sys.executable, "-m", "vlrlcd.cli", *args], capture_output=True, text=True, env=env,
                         cwd=cwd, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    return out


def _assert_quiet(out: str) -> None:
    noisy = [line for line in out.splitlines() if NOISE.search(line)]
    assert not noisy, "warning lines in the output:\n" + "\n".join(noisy[:20])


def test_train_on_a_tiny_recipe_prints_no_warning(tmp_path):
    out = _run("train", str(RECIPE), f"run_dir={tmp_path / 'run'}", "--no-progress", cwd=tmp_path)
    _assert_quiet(out)
    assert out.splitlines()[0] == "threads: 1 (OMP_NUM_THREADS=1)"
    assert "teacher calls this run" in out


@pytest.mark.timeout(300)  # the default quick demo, as `make demo ARGS=--quick` runs it: about 20-60 s on CPU
def test_quick_demo_prints_no_warning(tmp_path):
    out = _run("demo", "--quick", "--no-progress", "--out", str(tmp_path / "demo"), cwd=tmp_path)
    _assert_quiet(out)
    assert "report:" in out


def test_the_silencers_drop_their_one_message_only():
    """adapters/quiet.py drops exactly the two known third-party lines; anything else those loggers say shows.
    The records are collected by a handler on each logger itself (the filters sit on the loggers), so what
    other tests did to propagation or to the root logger's handlers cannot change the count."""
    import logging

    import vlrlcd.adapters  # noqa: F401  (installs the filters)

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.messages: list[str] = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    loggers = [logging.getLogger(name) for name in ("bitsandbytes.backends.cpu.ops", "DeepSpeed")]
    handlers = [Collect() for _ in loggers]
    levels = [lg.level for lg in loggers]
    try:
        for lg, h in zip(loggers, handlers):
            lg.addHandler(h)
            lg.setLevel(logging.WARNING)
        loggers[0].warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure "
                           "...", "No module named 'kernels'")
        loggers[1].warning("Setting accelerator to CPU. If you have GPU or other accelerator, ...")
        loggers[0].warning("some other bitsandbytes problem")
        loggers[1].warning("some other DeepSpeed problem")
    finally:
        for lg, h, lv in zip(loggers, handlers, levels):
            lg.removeHandler(h)
            lg.setLevel(lv)
    assert handlers[0].messages == ["some other bitsandbytes problem"]
    assert handlers[1].messages == ["some other DeepSpeed problem"]
