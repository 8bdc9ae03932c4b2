"""How many CPU threads torch computes with, chosen once per command (`vlrlcd/cli.py:main`).

The policy, in order:

1. `OMP_NUM_THREADS` (or `MKL_NUM_THREADS`) set: respected; torch has read it already.
2. `torch.set_num_threads(n)` called by the program that runs `main` (after importing vlrlcd): respected.
3. A CUDA device present: torch's own default (one thread per physical core); the GPU does the compute and
   the CPU threads only feed it.
4. Otherwise (a CPU run): **one thread**. OpenMP threads spin-wait for each other, so when they outnumber the
   free cores (another job on the machine, several runs side by side) the tiny demo models slow down 15-30×;
   one thread never collapses, and for the demo's tiny models it is as fast as more. A real model on CPU
   runs faster on more cores, when they are free: set `OMP_NUM_THREADS` to the number you can spare.

The choice is printed once per process, on one line, e.g. `threads: 1 (OMP_NUM_THREADS unset; set it to use
more)`; under torchrun / accelerate only the first process prints it.
"""

from __future__ import annotations

import os

import torch

_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
CPU_DEFAULT = 1

# the count when vlrlcd was imported, then the one this module last left: a different count later means the
# program running vlrlcd set it itself
_last_count = torch.get_num_threads()
_announced = False


def choose_threads(environ=None, cuda: bool | None = None) -> tuple[int | None, str]:
    """(threads to set, or None to keep torch's current count; why), by the policy above."""
    environ = os.environ if environ is None else environ
    for var in _ENV_VARS:
        value = environ.get(var, "").strip()
        if value:
            return None, f"{var}={value}"
    if torch.get_num_threads() != _last_count:
        return None, "set by torch.set_num_threads"
    if torch.cuda.is_available() if cuda is None else cuda:
        return None, "torch's default with a CUDA device; OMP_NUM_THREADS sets it"
    return CPU_DEFAULT, "OMP_NUM_THREADS unset; set it to use more"


def apply_thread_policy(announce: bool = True) -> int:
    """Set torch's intra-op thread count by the policy and print it (once per process, first process only);
    returns the count."""
    global _last_count, _announced
    n, why = choose_threads()
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)
    n = _last_count = torch.get_num_threads()
    if announce and not _announced and os.environ.get("RANK", "0") == "0":
        print(f"threads: {n} ({why})", flush=True)
        _announced = True
    return n
