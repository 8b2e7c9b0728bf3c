"""Preemption: SIGUSR1 / SIGTERM set a flag; the loop finishes its step, saves, exits 75.

Why a flag and not work in the handler: a handler runs between two bytecodes,
possibly inside a collective; saving there would deadlock or write a torn
checkpoint. SLURM sends SIGUSR1 (``--signal``) before the time limit and SIGTERM
on preemption; the loop polls ``requested`` at each sync point (every
``logging.every_steps`` steps at most, ``pretrain.step_window``) and ranks agree on
it in that point's all-reduce, so every rank stops after the same step.

Both ``main()``s install the flag before anything heavy is imported, so a signal
during start-up is recorded too; the loop then exits 75 before its first step,
without a checkpoint (the requeued run resumes from the previous one).

Exit status 75 (``EX_TEMPFAIL`` in sysexits.h) tells launchers "saved cleanly,
requeue me"; any other non-zero status is a real failure and is not requeued.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Optional

EXIT_PREEMPTED = 75
EXIT_CONFIG = 2
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionFlag:
    """Installs handlers for ``STOP_SIGNALS`` that record the first signal received."""

    def __init__(self) -> None:
        self.signal: Optional[int] = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signal is None:
            self.signal = signum

    def install(self) -> "PreemptionFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def __enter__(self) -> "PreemptionFlag":
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def describe(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else "none"
