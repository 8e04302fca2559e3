"""End a rank that makes no progress, so that a hung peer cannot hold the job (and its GPUs) forever.

A collective with a dead peer usually fails fast (the peer's sockets close), and NCCL's own watchdog aborts a
collective that outlives the process group's timeout. Gloo does not always: with a peer that is alive but
stuck (SIGSTOP, a hung file system, a deadlocked data worker), a large all-reduce was seen to wait forever
despite the timeout. So the training loop reports progress at every step, evaluation and save, and a rank
that hears nothing for trainer.collective_timeout_s logs why and exits with ExitCode.HUNG. Its peers then
fail in their next collective, and the restart resumes from the newest complete checkpoint.
"""

import logging
import os
import threading
import time

from dstrain.errors import ExitCode

log = logging.getLogger("dstrain")


class ProgressWatchdog:
    """`with ProgressWatchdog(timeout_s) as watchdog:` ... `watchdog.progress()` at least every timeout_s."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._last_progress = time.monotonic()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="dstrain-watchdog", daemon=True)

    def __enter__(self):
        self.progress()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stopped.set()
        self._thread.join()

    def progress(self) -> None:
        self._last_progress = time.monotonic()

    def _watch(self) -> None:
        while not self._stopped.wait(min(self.timeout_s / 4, 10.0)):
            silent_s = time.monotonic() - self._last_progress
            if silent_s > self.timeout_s:
                log.error(
                    "no training progress for %.0f s (trainer.collective_timeout_s=%.0f): another rank has "
                    "probably died or hung. Exiting with code %d; a restart resumes from the newest complete "
                    "checkpoint.", silent_s, self.timeout_s, ExitCode.HUNG,
                )
                logging.shutdown()
                os._exit(ExitCode.HUNG)
