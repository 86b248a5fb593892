"""Checkpoints written beside training: Megatron core's asynchronous dist-checkpoint save.

A periodic save of a large model blocks every rank while ~100 GB are written. With
`training.checkpoint.async_save` the save only snapshots the state (on GPUs a device-to-host copy; on
CPU the fork of the writer process is the snapshot) and returns; a forked process per rank writes
the files while training continues. The loop polls once per step (one small all-reduce); when every
rank's writer has finished, the queue finalizes the save on all ranks together: torch's metadata,
then our flush, checksums, `checkpoint_meta.json` and the atomic publish of the folder and `latest`
(checkpoint.py). Until then `latest` names the previous checkpoint, so a crash during the write
leaves it in place. One save is in flight at a time: a new save first waits for the last one.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


class BackgroundSaves:
    """The queue of checkpoint saves in flight on this rank (every method is collective)."""

    def __init__(self):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self._queue = AsyncCallsQueue(persistent=False)
        self._iterations: dict[int, int] = {}

    def schedule(self, request, iteration: int) -> None:
        """Start writing `request` (an AsyncRequest of dist_checkpointing.save) in the background."""
        self._iterations[self._queue.schedule_async_request(request)] = iteration

    @property
    def in_flight(self) -> list[int]:
        """Iterations whose checkpoint is being written."""
        return sorted(self._iterations.values())

    def poll(self) -> list[int]:
        """Publish every save whose writers have finished on all ranks; return their iterations.

        A save that failed on any rank raises here, on every rank (the previous checkpoint stays).
        """
        return self._finalize(blocking=False)

    def wait(self) -> list[int]:
        """Block until every save in flight is written and published; return their iterations."""
        return self._finalize(blocking=True)

    def _finalize(self, blocking: bool) -> list[int]:
        if not self._iterations:
            return []
        done = self._queue.maybe_finalize_async_calls(blocking=blocking)
        return [self._iterations.pop(index) for index in done]
