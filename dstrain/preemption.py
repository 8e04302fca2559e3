"""Stop cleanly when the cluster says the job is about to end.

SLURM (`--signal=B:USR1@<seconds>`) and most schedulers send SIGUSR1 or SIGTERM some time before they kill a
job. The handler only raises a flag; the training loop shares the flag with every rank at the next step
boundary, so all ranks stop after the same step, save one checkpoint together, and exit with
PREEMPTED_EXIT_CODE. A requeued job then resumes from that checkpoint.
"""

import signal

# EX_TEMPFAIL from sysexits.h: a temporary failure, and running the same command again is the fix.
PREEMPTED_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignal:
    def __init__(self):
        self.received = None
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
