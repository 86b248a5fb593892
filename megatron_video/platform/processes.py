"""The worker processes of a launch and the helper processes they start.

Two guarantees a long job on a shared cluster needs from its processes:

- **Workers die with their launcher.** torchrun starts every worker in a session of its own, so a
  launcher killed with SIGKILL (an OOM killer, a scheduler's hard kill) leaves workers that keep
  training and writing checkpoints. `exit_with_launcher()` starts a watchdog thread that ends the
  worker within about half a second of its parent's death.
- **Checkpoint writer helpers survive a forwarded signal.** Megatron core's dist-checkpoint writer
  keeps a `multiprocessing` manager process (spawned, so with default signal handlers) in the
  worker's process group for its results queue. torchrun forwards SIGTERM to that whole group, the
  manager dies, and the save the signal asked for fails. `shield_checkpoint_writer()` creates that
  queue up front in a manager that ignores the pre-emption signals (and also exits with its parent).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterable

logger = logging.getLogger(__name__)

_POLL_SECONDS = 0.5
_watched_parent: int | None = None
_writer_manager = None


def launched_by_torchrun() -> bool:
    """Whether this process is a worker started by torchrun (torch.distributed.run)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(_POLL_SECONDS)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)


def exit_with_launcher(force: bool = False) -> bool:
    """Kill this process (SIGKILL) soon after its parent dies; returns whether the watchdog runs.

    Only for torchrun workers unless `force` (a worker run directly from a shell is left alone).
    Idempotent: one watchdog thread per process.
    """
    global _watched_parent
    if not (force or launched_by_torchrun()):
        return False
    if _watched_parent is None:
        _watched_parent = os.getppid()
        threading.Thread(
            target=_watch_parent, args=(_watched_parent,), name="exit-with-launcher", daemon=True
        ).start()
    return True


def _ignore_signals_and_follow_parent(signal_numbers: tuple[int, ...]) -> None:
    """Initializer of the shielded manager process (runs in the spawned child)."""
    for number in signal_numbers:
        signal.signal(number, signal.SIG_IGN)
    exit_with_launcher(force=True)


def shield_checkpoint_writer(signals: Iterable[int]) -> None:
    """Give Megatron's dist-checkpoint writer a results queue whose manager ignores `signals`.

    Call before the first checkpoint save. Idempotent. Raises RuntimeError naming the installed
    megatron-core when its writer no longer keeps the queue where this expects it.
    """
    global _writer_manager
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from torch import multiprocessing as mp

    from megatron_video.platform.megatron_cpu import installed_megatron_core_version

    if not hasattr(filesystem_async, "_results_queue"):
        raise RuntimeError(
            f"megatron-core {installed_megatron_core_version()} keeps no module-level results queue in "
            "dist_checkpointing.strategies.filesystem_async; its checkpoint writer cannot be shielded "
            "from pre-emption signals (install the megatron-core version in constraints.txt)"
        )
    if _writer_manager is not None:
        return
    from multiprocessing.managers import SyncManager

    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(_ignore_signals_and_follow_parent, (tuple(int(s) for s in signals),))
    _writer_manager = manager
    filesystem_async._results_queue = manager.Queue()
