"""Stop cleanly when the cluster says the job is about to end.

SLURM (`--signal=USR1@<seconds>`) and most schedulers send SIGUSR1 or SIGTERM some time before they kill a
job. The handler only raises a flag; the training loop shares the flag with every rank at the next step
boundary, so all ranks stop after the same step, save one checkpoint together, and exit with
ExitCode.PREEMPTED. A requeued job then resumes from that checkpoint.

If the step boundary and the save do not come within the grace period (a very long step, a slow file
system), the process exits anyway with the same code and no new checkpoint: the last complete one stays,
and a save cut short is never loaded. Leaving on our own terms beats being SIGKILLed at an unknown point.
"""

import logging
import os
import signal
import threading

from dstrain.errors import ExitCode

log = logging.getLogger("dstrain")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignal:
    """Install with `with StopSignal(grace_s) as stop:`; the previous handlers come back on exit."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.received = None
        self._previous = {}
        self._deadline = None

    def __enter__(self):
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        if self._deadline is not None:
            self._deadline.cancel()
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            return
        self.received = signal.Signals(signum).name
        self._deadline = threading.Timer(self.grace_s, self._out_of_time)
        self._deadline.daemon = True
        self._deadline.start()

    def _out_of_time(self) -> None:
        log.error(
            "%s arrived %.0f s ago (trainer.stop_grace_s) and the step boundary and save have not finished; "
            "exiting with code %d without a new checkpoint. The restart resumes from the newest complete one.",
            self.received, self.grace_s, ExitCode.PREEMPTED,
        )
        logging.shutdown()
        os._exit(ExitCode.PREEMPTED)
