"""Exit codes and the errors that map to them: one table for the trainer, the `dstrain` commands and the
job scripts (launch/slurm renders PREEMPTED into its template).

Each error type carries the exit code a job script should see, so the entry points need one `except`."""

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    # Anything unexpected, including a peer that died (its collectives fail).
    ERROR = 1
    # The config, a named checkpoint or the data cannot work as given: fix it; requeueing would not help.
    CONFIG = 2
    # A NaN/inf loss or gradient norm that trainer.nonfinite says to stop on.
    DIVERGED = 3
    # No progress for trainer.collective_timeout_s: a peer probably hung (dstrain.watchdog).
    HUNG = 4
    # EX_TEMPFAIL from sysexits.h: stopped by a signal after saving; run the same command again.
    PREEMPTED = 75


class DstrainError(Exception):
    """A failure dstrain explains in one line. `kind` starts that line; `exit_code` ends the process."""

    kind = "error"
    exit_code = ExitCode.ERROR
    # Raised on every rank from one collective decision (so rank 0 alone need say it).
    decided_together = False


class ConfigError(DstrainError, ValueError):
    """A config that cannot work. The message names the key and the fix."""

    kind = "config error"
    exit_code = ExitCode.CONFIG


class DataError(DstrainError, ValueError):
    """Training data that cannot be read: the message names the file, the line and the field."""

    kind = "data error"
    exit_code = ExitCode.CONFIG


class CheckpointError(DstrainError):
    """A checkpoint that cannot be used as asked: missing, damaged, or from another model."""

    kind = "checkpoint error"
    exit_code = ExitCode.CONFIG


class SlurmError(DstrainError):
    """A SLURM command is missing or failed (sbatch, sinfo, scontrol): nothing was submitted."""

    kind = "slurm error"
    exit_code = ExitCode.CONFIG


class TrainingDiverged(DstrainError):
    """A NaN/inf loss or gradient norm that trainer.nonfinite says to stop on."""

    kind = "training diverged"
    exit_code = ExitCode.DIVERGED
    decided_together = True
