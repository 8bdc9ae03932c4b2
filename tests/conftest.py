"""Suite-wide settings: one intra-op thread for the tiny models (in this process and every subprocess a
test starts), so parallel subprocesses never oversubscribe the 2 CI cores and CPU results do not depend on
the thread count."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    """A test is one process unless it launches more itself: never inherit a launcher's WORLD_SIZE."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
