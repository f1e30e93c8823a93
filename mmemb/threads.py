"""CPU threads: how many torch uses, and how its OpenMP threads wait for each other.

Why this exists: torch's CPU kernels run on an OpenMP pool of one thread per core, and GNU
OpenMP's threads busy-wait (spin) at every barrier. On a machine where other processes want the
same cores, a spinning thread burns the time slice its partner needs to reach the barrier, and
a run slows 10-30x (docs/benchmarks.md, "Threads"). So the `mmemb` command, unless told otherwise:

- sets ``OMP_WAIT_POLICY=PASSIVE`` (waiting threads sleep instead of spinning). OpenMP reads it
  once, when its runtime starts -- at ``import torch`` -- so `prime_environment` runs at the top
  of the CLI entry module, before anything imports torch;
- sets ``OMP_NUM_THREADS`` to `default_threads()`.

Each is set only when the user has not set it. ``--threads N`` (or ``MMEMB_THREADS=N``) and the
recipe key ``train.threads`` choose the count instead; the command line wins over the recipe,
the recipe over an ``OMP_NUM_THREADS`` from the environment.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping

_state: dict[str, int | None] = {"cli": None}
"""The thread count given on the command line (``--threads``/``MMEMB_THREADS``), if any."""


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a job scheduler's allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """The default torch thread count: every CPU this process may use.

    With passive waiting, a thread that loses its core to another process no longer stalls its
    partners by spinning, so using all the allowed CPUs stays fast on an idle machine and within
    about 2x on a busy one (docs/benchmarks.md, "Threads")."""
    return available_cpus()


def prime_environment(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set the OpenMP variables that must be in place before torch is imported; returns what it
    set (nothing the user had set is changed). Also silences one start-up warning, see
    `_quiet_deepspeed_cpu_notice`."""
    env = os.environ if environ is None else environ
    done: dict[str, str] = {}
    if "OMP_WAIT_POLICY" not in env:
        done["OMP_WAIT_POLICY"] = "PASSIVE"
    if "OMP_NUM_THREADS" not in env:
        done["OMP_NUM_THREADS"] = str(default_threads())
    env.update(done)
    _quiet_deepspeed_cpu_notice()
    return done


def set_threads(n: int) -> None:
    """Use `n` threads: through the environment when torch is not imported yet (its OpenMP pool
    then starts at that size), through `torch.set_num_threads` when it is."""
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)


def use_cli_threads(n: int | None) -> None:
    """``--threads``/``MMEMB_THREADS``: applied now, and it outranks the recipe's train.threads."""
    _state["cli"] = n
    if n is not None:
        set_threads(n)


def use_recipe_threads(n: int | None) -> None:
    """``train.threads`` of a recipe: applied unless the command line gave a count."""
    if n is not None and _state["cli"] is None:
        set_threads(n)


class _DropNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Setting accelerator to CPU")


def _quiet_deepspeed_cpu_notice() -> None:
    """DeepSpeed logs "[WARNING] Setting accelerator to CPU. If you have GPU or other accelerator,
    we were unable to detect it." the first time it is imported on a machine without CUDA, and
    transformers/accelerate import it while saving a model even with the torch engine. mmemb
    prints the device it uses, so this notice only adds noise; this filter drops that one
    message (nothing else) from DeepSpeed's logger, before DeepSpeed exists."""
    logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropNotice) for f in logger.filters):
        logger.addFilter(_DropNotice())
