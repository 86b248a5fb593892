"""Pre-emption: a signal from the scheduler becomes "finish the step, save, exit 0".

Schedulers announce a pre-emption with a signal: Slurm and Kubernetes send SIGTERM (to the launcher,
to every process, or both), a user presses Ctrl-C (SIGINT), a job script forwards SIGUSR1 ahead of
the time limit. `PreemptionSignals` turns each configured signal into a flag; the training loop asks
`agreed()` (a MAX all-reduce, so every rank decides the same) after each step, saves the step it
reached, and raises `Preempted`, which the entry scripts turn into exit code 0. A signal that
arrives during a save is honoured right after it, without saving the same step twice.

Timing: torchrun forwards SIGTERM / SIGINT (and SIGUSR1 when TORCHELASTIC_SIGNALS_TO_HANDLE names
it) to its workers and kills them 30 s later, so the step in flight plus one save must fit in that
window; for larger models send the signal to the workers directly, earlier.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from megatron_video.platform.processes import shield_checkpoint_writer


class Preempted(Exception):
    """The run stopped on a pre-emption signal after saving the step it reached."""

    def __init__(self, signal_name: str, step: int, save_dir: str | None):
        self.signal_name, self.step, self.save_dir = signal_name, step, save_dir
        where = f" in {save_dir}" if save_dir else ""
        super().__init__(
            f"{signal_name}: saved step {step}{where} and stopped; run the same command again to resume"
        )


class PreemptionSignals:
    """Handlers for the pre-emption signals while a stage runs (restore() puts the old ones back).

    Also shields the checkpoint writer's helper process from the same signals, so that the save a
    signal asks for is not broken by the signal itself.
    """

    def __init__(self, numbers: list[signal.Signals]):
        self.numbers = list(numbers)
        self.received: signal.Signals | None = None
        self._previous = {number: signal.signal(number, self._handle) for number in self.numbers}
        shield_checkpoint_writer(self.numbers)

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signal.Signals(signum)

    @property
    def requested(self) -> bool:
        """Whether this process received one of the signals."""
        return self.received is not None

    def agreed(self) -> bool:
        """True on every rank if any rank received a signal (collective when distributed)."""
        flag = torch.tensor([1.0 if self.requested else 0.0])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    @property
    def name(self) -> str:
        """The received signal's name ('a pre-emption signal' when another rank got it)."""
        return self.received.name if self.received is not None else "a pre-emption signal"

    def restore(self) -> None:
        """Reinstate the handlers that were there before."""
        for number, previous in self._previous.items():
            signal.signal(number, previous)
