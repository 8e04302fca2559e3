"""One live training run per run directory.

While a run trains, global rank 0 holds an exclusive `flock` on `<run dir>/.dstrain.lock`. The lock belongs
to the open file, which the process holds, so the kernel drops it when the process ends in any way: a clean
exit, a crash, SIGKILL, a preempted or requeued job. Nothing is left that blocks the rerun: the file itself
stays behind, inert, and the next run simply takes the lock on it again. The file says who holds the lock
(host, pid, SLURM job id, start time, command), so that a refusal can name the holder.

Training (`hold_run_dir`, entered in `dstrain.trainer.train` right after the process group exists): rank 0
tries the lock without waiting; the outcome (None, or the refusal's message) is broadcast to every rank in
one collective, so all ranks refuse together with RunDirInUse, a ConfigError (exit code 2), before any model
is built, and none waits for a rank 0 that already left. Each run of a Hydra multirun locks its own
directory and releases it when it returns.

Submitting (`check_run_dir_free`, from `dstrain submit` with a run.name): refused while a live process holds
the lock (probed with a shared, non-blocking flock on the existing file; nothing is created), or while a
pending or running SLURM job was submitted for the same run directory. `dstrain submit` marks its jobs with
`--comment=dstrain:<run dir>` (`job_comment`), which `squeue -o %k` shows.

Limits: flock reaches other machines only where the shared file system passes it on (NFS does; Lustre
only when mounted with `flock`, not `localflock`). Where the file system refuses flock altogether, training
warns and runs unlocked. A process forked (not exec'd) by rank 0 shares its lock while it lives.
"""

import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import List, Optional, Tuple

from dstrain.errors import ConfigError, SlurmError

log = logging.getLogger("dstrain")

LOCK_FILE = ".dstrain.lock"
COMMENT_PREFIX = "dstrain:"
# How long rank 0 keeps trying before it calls the directory taken: covers `dstrain submit`'s probe, which
# holds a shared lock for an instant; a real holder holds for the whole run.
ACQUIRE_WAIT_S = 2.0
# errno values of a file system that cannot flock (some NFS setups, Lustre without -o flock).
UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
# squeue states after which a job no longer trains; anything else squeue lists is live.
ENDED_STATES = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
                "PREEMPTED", "TIMEOUT"}


class RunDirInUse(ConfigError):
    """Another live run (or a pending or running SLURM job) uses the run directory."""

    decided_together = True


# ------------------------------------------------------------------------------------------ the lock


class RunLock:
    """The flock on `<run_dir>/.dstrain.lock`, held by this process: `acquire()` raises RunDirInUse when
    another process holds it; `release()` (or the process ending) lets go."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: Optional[int] = None

    def acquire(self, wait_s: float = ACQUIRE_WAIT_S) -> bool:
        """Take the lock; False (with a warning) where the file system cannot lock at all."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Python's descriptors are not inherited across exec, so a subprocess never holds the lock.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                holder = read_holder(self.path)
                os.close(fd)
                raise RunDirInUse(
                    f"the run directory {self.run_dir} is in use by another live training run "
                    f"({describe(holder)}): wait for it to end, or choose another run.name"
                ) from None
            except OSError as error:
                os.close(fd)
                if error.errno not in UNSUPPORTED:
                    raise
                log.warning("cannot lock %s (%s): the file system does not support flock; nothing stops a "
                            "second run from training in this directory at the same time", self.path, error)
                return False
        # Whatever an earlier holder wrote is stale: it no longer holds the lock.
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder_record()) + "\n").encode(), 0)
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is None:
            return
        # Emptied first: a file with a record is one whose holder may be alive.
        os.ftruncate(self._fd, 0)
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


class hold_run_dir:
    """`with hold_run_dir(run_dir, rank):` in every rank, right after the process group exists: rank 0 takes
    the lock, and every rank raises RunDirInUse if rank 0 could not. One broadcast; no rank waits alone."""

    def __init__(self, run_dir: Path, rank: int):
        self.lock = RunLock(run_dir) if rank == 0 else None

    def __enter__(self):
        import torch.distributed as dist

        refusal = [None]
        if self.lock is not None:
            try:
                self.lock.acquire()
            except RunDirInUse as error:
                refusal = [str(error)]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(refusal, src=0)
        if refusal[0] is not None:
            raise RunDirInUse(refusal[0])
        return self

    def __exit__(self, *exc):
        if self.lock is not None:
            self.lock.release()


def holder_record() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "started": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
    }


def read_holder(path: Path) -> Optional[dict]:
    """The record of whoever holds (or last held) the lock at path; None when empty or unreadable."""
    for attempt in range(3):
        try:
            text = Path(path).read_text()
            return json.loads(text) if text.strip() else None
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            # Read while the holder was writing it.
            time.sleep(0.1)
    return None


def describe(holder: Optional[dict]) -> str:
    if not holder:
        return "holder unknown: the lock file has no record yet"
    parts = [f"host {holder.get('host')}", f"pid {holder.get('pid')}"]
    if holder.get("slurm_job_id"):
        parts.append(f"SLURM job {holder['slurm_job_id']}")
    parts.append(f"since {holder.get('started')}")
    command = str(holder.get("command") or "")
    parts.append(f"command: {command if len(command) <= 200 else command[:197] + '...'}")
    return ", ".join(parts)


def live_holder(run_dir: Path) -> Optional[dict]:
    """The holder's record if a live process holds the lock on run_dir, else None. Creates nothing: without
    a lock file nobody can hold it. Probes with a shared lock, which an exclusive holder refuses."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return read_holder(path) or {}
    except OSError as error:
        if error.errno not in UNSUPPORTED:
            raise
        return None
    finally:
        os.close(fd)
    return None


# ------------------------------------------------------------------------------------ dstrain submit


def job_comment(run_dir: Path) -> str:
    """What `dstrain submit` puts in a job's --comment, so that the next submit finds the job."""
    return f"{COMMENT_PREFIX}{run_dir}"


def live_jobs_for(squeue_output: str, run_dir: Path) -> List[Tuple[str, str]]:
    """(job id, state) of each live job in `squeue -h -o %i|%T|%k` output submitted for run_dir."""
    jobs = []
    for line in squeue_output.splitlines():
        parts = line.strip().split("|", 2)
        if len(parts) == 3 and parts[2] == job_comment(run_dir) and parts[1] not in ENDED_STATES:
            jobs.append((parts[0], parts[1]))
    return jobs


def check_run_dir_free(run_dir: Path, squeue: Optional[str]) -> None:
    """Raise RunDirInUse when a live SLURM job (squeue: the path of squeue, or None to skip that check) was
    submitted for run_dir, or a live process holds its lock. The job comes first: its id is the better lead."""
    if squeue is not None:
        import subprocess

        done = subprocess.run([squeue, "-h", "-o", "%i|%T|%k"], capture_output=True, text=True)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines()
            raise SlurmError(f"squeue failed: {lines[-1] if lines else f'exit code {done.returncode}'}")
        jobs = live_jobs_for(done.stdout, run_dir)
        if jobs:
            listed = ", ".join(f"job {job_id} ({state})" for job_id, state in jobs)
            ids = " ".join(job_id for job_id, _ in jobs)
            raise RunDirInUse(
                f"{listed} already trains in the run directory {run_dir}: scancel {ids}, or choose another "
                f"run.name"
            )
    holder = live_holder(run_dir)
    if holder is not None:
        raise RunDirInUse(
            f"the run directory {run_dir} is in use by a live training run ({describe(holder)}): wait for it "
            f"to end, or choose another run.name"
        )
