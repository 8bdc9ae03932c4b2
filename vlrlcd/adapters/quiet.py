"""Narrow silencers for third-party libraries that warn about themselves on every run, whatever the user
asked for. Each drops exactly one message, by logger and text, and says why; anything else those loggers
print still shows. Installed once, when `vlrlcd.adapters` is first imported (before peft, bitsandbytes or
DeepSpeed can be): logging filters outlive pytest's per-test reset of warning filters."""

from __future__ import annotations

import logging

# (logger name, start of the one message dropped). Loggers are created here if the library has not yet
# been imported; the library's own `logging.getLogger(name)` then returns the same object, filter included.
_DROPPED = (
    # peft imports bitsandbytes whenever it is installed, even with no quantization asked for; on a CPU with
    # AVX512-bf16, bitsandbytes then logs that the optional `kernels` package is missing. It falls back to its
    # own CPU kernel, so nothing is wrong, and the line would show on every command.
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    # transformers imports DeepSpeed whenever it is installed; on a machine without a GPU DeepSpeed then says
    # it fell back to the CPU, on every command (the CLI also sets DS_ACCELERATOR=cpu there for the same reason).
    ("DeepSpeed", "Setting accelerator to CPU."),
)


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_libraries() -> None:
    """Install the filters (idempotent)."""
    for name, prefix in _DROPPED:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropMessage(prefix))
