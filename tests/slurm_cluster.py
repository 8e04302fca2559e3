"""A real, throw-away one-node SLURM cluster on loopback, started and stopped by the tests themselves.

Install the daemons once with ``bash launch/slurm/install-local-cluster.sh`` (Debian's ``slurmctld``,
``slurmd``, ``slurm-client`` and ``munge``). Then::

    from slurm_cluster import LocalSlurmCluster

    with LocalSlurmCluster() as cluster:           # skips the test if the slurm binaries are absent
        job = cluster.sbatch("--ntasks=2", "--wrap", "srun hostname")
        info = cluster.wait_job(job)              # dict of `scontrol -o show job`, e.g. info["JobState"]
        subprocess.run(["squeue"], env=cluster.env)

or, as a fixture, ``from slurm_cluster import slurm_cluster  # noqa: F401`` in a test module (or conftest).

Everything is private to one temporary state directory: a fresh MUNGE key, socket, pid and log file for
our own ``munged`` (the system munge is neither used nor touched), ``slurm.conf``, the controller's state,
slurmd's spool, the logs. SlurmctldPort/SlurmdPort are free ports picked at start, so two clusters (or a
system slurm) can coexist. ``cluster.env`` (``SLURM_CONF`` and a PATH with ``/usr/sbin``, stray ``SLURM_*``
job variables removed) is what every slurm client command must run with.

The daemons run as root (``SlurmUser=root``), so jobs run as the submitting user, root, too.

Requeue timing (why the config below restarts a requeued job within a few seconds):

* A requeued job (``scontrol requeue``, node failure, preemption, ``RequeueExit``) gets its begin time
  (``EligibleTime`` in ``scontrol show job``) set to ``now + cred_expire + 1``: slurm waits until every step credential of the previous run has
  expired. ``cred_expire`` is ``AuthInfo=cred_expire=N`` (default 120 s, minimum 5; a smaller value is
  rejected and silently replaced by 120), so this cluster sets 5.
* Once BeginTime has passed, the job still needs a scheduling pass; nothing event-driven happens when a
  begin time elapses. The main loop runs every ``sched_interval`` (default 60 s) and backfill every
  ``bf_interval`` (default 30 s), so both are set to 1 s here.

Measured on a 2-core machine: cluster up in ~0.6 s; a requeued job runs again ~6 s after
``scontrol requeue`` (27-29 s with slurm's default scheduler intervals, 121+ s with the default cred_expire).
"""

from __future__ import annotations

import atexit
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
INSTALL_SCRIPT = REPO / "launch" / "slurm" / "install-local-cluster.sh"

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
# Daemons live in /usr/sbin, which a non-login PATH may lack.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"])
# Marks every process started for one cluster (daemons, slurmstepd, jobs), so stop() can find strays.
MARKER = "DSTRAIN_SLURM_CLUSTER"
FINAL_STATES = {
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
    "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT",
}
# sun_path is 108 bytes; slurmstepd puts "<spool>/<node>_<job>.<step>" sockets in the spool dir.
MAX_STATE_DIR_LEN = 60


class SlurmClusterError(RuntimeError):
    """A daemon did not start or a slurm command failed; the message carries the daemons' log tails."""


def missing_binaries() -> list[str]:
    return [name for name in DAEMONS + CLIENTS if shutil.which(name, path=SEARCH_PATH) is None]


def skip_unless_installed() -> None:
    """pytest.skip (with the reason and the install script) when the slurm/munge binaries are absent."""
    missing = missing_binaries()
    if missing:
        pytest.skip(
            f"SLURM/MUNGE not installed (missing: {', '.join(missing)}); "
            f"install with: bash {INSTALL_SCRIPT}"
        )


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM the daemon when the test process dies, even by SIGKILL (Linux prctl)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _mem_total_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise SlurmClusterError("no MemTotal in /proc/meminfo")


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no file)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


_SHOW_FIELD = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=")


def parse_show(line: str) -> dict[str, str]:
    """Parse one line of `scontrol -o show job|node` into {key: value} (values may contain spaces)."""
    matches = list(_SHOW_FIELD.finditer(line))
    fields = {}
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(line)
        fields[match.group(1)] = line[match.end():end].strip()
    return fields


class LocalSlurmCluster:
    """One slurmctld + one slurmd (+ a private munged) on 127.0.0.1, configured for fast requeue in tests.

    Parameters (all optional):
      cpus, real_memory_mb: the node's CPUs/RealMemory (default: this machine's; more CPUs than the machine
        has are allowed, `SlurmdParameters=config_overrides`).
      cred_expire: seconds a requeued job waits before it is eligible again (slurm minimum 5).
      min_job_age: seconds a finished job stays visible to `scontrol show job` / squeue.
      kill_wait: seconds between SIGTERM and SIGKILL when a job is cancelled, preempted or times out.
      extra_conf: lines appended to slurm.conf (e.g. "RequeueExit=75").
      state_dir: where to put everything (default: a fresh short dir under /tmp); removed by stop()
        unless keep=True.
      debug: SlurmctldDebug/SlurmdDebug level.
    """

    def __init__(
        self,
        *,
        cpus: int | None = None,
        real_memory_mb: int | None = None,
        cred_expire: int = 5,
        min_job_age: int = 30,
        kill_wait: int = 5,
        extra_conf: str = "",
        state_dir: str | os.PathLike | None = None,
        keep: bool = False,
        debug: str = "info",
        start_timeout: float = 60.0,
    ):
        if cred_expire < 5:
            raise ValueError("slurm rejects AuthInfo=cred_expire below 5 (and then uses 120)")
        self.hostname = socket.gethostname().split(".")[0]
        self.cpus = cpus or os.cpu_count() or 1
        self.real_memory_mb = real_memory_mb or _mem_total_mb()
        self.cred_expire = cred_expire
        self.min_job_age = min_job_age
        self.kill_wait = kill_wait
        self.extra_conf = extra_conf
        self.keep = keep
        self.debug = debug
        self.start_timeout = start_timeout
        self._state_dir_arg = state_dir
        self.root: Path | None = None
        self.env: dict[str, str] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.ctld_port = self.slurmd_port = 0
        self._started = False

    # ------------------------------------------------------------------ paths
    @property
    def conf_path(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket"

    @property
    def jobs_dir(self) -> Path:
        """A scratch dir for job scripts and outputs (sbatch() writes there by default)."""
        return self.root / "jobs"

    def log_path(self, daemon: str) -> Path:
        return self.root / "log" / f"{daemon}.log"

    # ------------------------------------------------------------- lifecycle
    def __enter__(self) -> "LocalSlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "LocalSlurmCluster":
        skip_unless_installed()
        if os.geteuid() != 0:
            raise SlurmClusterError("LocalSlurmCluster runs slurmctld/slurmd as SlurmUser=root: run as root")
        if self._started:
            return self
        self._make_state_dir()
        self._started = True
        atexit.register(self.stop)
        try:
            self._start_munged()
            self.ctld_port, self.slurmd_port = _free_port(), _free_port()
            while self.slurmd_port == self.ctld_port:
                self.slurmd_port = _free_port()
            self._write_conf()
            self._start_daemon("slurmctld", ["slurmctld", "-D", "-f", str(self.conf_path)])
            self._wait("slurmctld to answer `scontrol ping`", self._ctld_up)
            self._start_daemon(
                "slurmd", ["slurmd", "-D", "-f", str(self.conf_path), "-N", self.hostname]
            )
            self._wait(f"node {self.hostname} to be idle in sinfo", self._node_idle)
        except BaseException as error:
            report = self.log_tails()
            self.stop()
            if isinstance(error, SlurmClusterError):
                raise SlurmClusterError(f"{error}\n{report}") from None
            raise
        return self

    def stop(self) -> None:
        """Cancel all jobs, stop slurmd/slurmctld/munged and every process they left, remove the state dir."""
        if not self._started:
            return
        self._started = False
        atexit.unregister(self.stop)
        stepds = self._stepds()
        ctld = self.procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None and self.procs.get("slurmd") is not None:
            try:
                jobs = self.run("squeue", "-h", "-o", "%i", check=False, timeout=10).stdout.split()
                if jobs:
                    self.run("scancel", *jobs, check=False, timeout=10)
                    deadline = time.monotonic() + self.kill_wait + 10
                    while time.monotonic() < deadline and self._stepds():
                        time.sleep(0.3)
            except (subprocess.TimeoutExpired, OSError):
                pass
        for name in ("slurmd", "slurmctld"):
            self._terminate(name)
        self._kill_strays()
        self._terminate("munged")
        self.procs.clear()
        # slurmstepd daemonizes (parent: init), so its zombie is reaped by init, not by us: wait for it.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in stepds):
            time.sleep(0.1)
        if self.root is not None and not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    # --------------------------------------------------------------- commands
    def run(self, *command: str, check: bool = True, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        """Run a slurm client command against this cluster; raises SlurmClusterError if check and rc != 0."""
        done = subprocess.run(
            list(command), env=self.env, capture_output=True, text=True, timeout=timeout, **kwargs
        )
        if check and done.returncode != 0:
            raise SlurmClusterError(
                f"{' '.join(command)} exited {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
            )
        return done

    def sbatch(self, *args: str, script: str | None = None, cwd: str | os.PathLike | None = None) -> int:
        """Submit (``sbatch --parsable ARGS [script file]``) and return the job id.

        ``script`` is the text of a batch script (written to jobs_dir); without it pass ``--wrap``.
        The job runs in ``cwd`` (default jobs_dir), where slurm-%j.out lands unless --output says otherwise.
        """
        cwd = Path(cwd or self.jobs_dir)
        command = ["sbatch", "--parsable", *args]
        if script is not None:
            fd, path = tempfile.mkstemp(prefix="job-", suffix=".sh", dir=self.jobs_dir)
            with os.fdopen(fd, "w") as f:
                f.write(script)
            command.append(path)
        out = self.run(*command, cwd=cwd).stdout.strip()
        return int(out.split(";")[0])

    def job(self, job_id: int) -> dict[str, str] | None:
        """`scontrol -o show job ID` as a dict (JobState, Restarts, ExitCode, EligibleTime, ...); None if purged."""
        done = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        if done.returncode != 0:
            if "Invalid job id" in done.stderr:
                return None
            raise SlurmClusterError(f"scontrol show job {job_id}: {done.stderr}\n{self.log_tails()}")
        return parse_show(done.stdout.strip().splitlines()[0])

    def wait_job(self, job_id: int, states=FINAL_STATES, timeout: float = 120, restart_count: int | None = None):
        """Poll until the job's JobState is in ``states`` (and Restarts >= restart_count); return its dict."""
        states = {states} if isinstance(states, str) else set(states)
        last = {}

        def reached():
            nonlocal last
            last = self.job(job_id) or {}
            if restart_count is not None and int(last.get("Restarts") or 0) < restart_count:
                return False
            return last.get("JobState") in states

        self._wait(f"job {job_id} to reach {sorted(states)}", reached, timeout=timeout,
                   detail=lambda: f"last: {last}")
        return last

    def signal(self, job_id: int, sig: str = "USR1", *, batch: bool = False, full: bool = False) -> None:
        """`scancel --signal=SIG`: to every step's tasks (default), only the batch shell (batch=True),
        or the batch shell and every step (full=True). The job keeps running unless the signal ends it."""
        args = [f"--signal={sig}"] + (["--batch"] if batch else []) + (["--full"] if full else [])
        self.run("scancel", *args, str(job_id))

    def requeue(self, job_id: int) -> None:
        """`scontrol requeue ID`: a running job gets SIGTERM (SIGKILL after KillWait) and goes back to
        PENDING, as does a finished one still on record; it is eligible again after cred_expire + 1 s."""
        self.run("scontrol", "requeue", str(job_id))

    def log_tails(self, lines: int = 40) -> str:
        if self.root is None:
            return ""
        parts = []
        for daemon in DAEMONS:
            for path in (self.log_path(daemon), self.root / "log" / f"{daemon}.stderr"):
                if path.exists():
                    parts.append(f"--- {path} (last {lines} lines) ---\n{_tail(path, lines)}")
        return "\n".join(parts)

    # --------------------------------------------------------------- internals
    def _make_state_dir(self) -> None:
        if self._state_dir_arg is not None:
            self.root = Path(self._state_dir_arg).resolve()
            self.root.mkdir(parents=True, exist_ok=True)
        else:
            base = tempfile.gettempdir()
            if len(base) > MAX_STATE_DIR_LEN - 25:
                base = "/tmp"
            self.root = Path(tempfile.mkdtemp(prefix="slurm-", dir=base))
        if len(str(self.root)) > MAX_STATE_DIR_LEN:
            raise SlurmClusterError(
                f"state dir {self.root} is too long for the unix sockets inside it (max {MAX_STATE_DIR_LEN})"
            )
        os.chmod(self.root, 0o755)
        for sub in ("etc", "munge", "log", "ctld", "spool", "run", "jobs"):
            (self.root / sub).mkdir(exist_ok=True)
        os.chmod(self.root / "munge", 0o711)  # munged wants clients able to reach the socket
        os.chmod(self.root / "jobs", 0o777)
        env = {
            k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_", "SINFO_", "SCONTROL_"))
        }
        env.update(PATH=SEARCH_PATH, SLURM_CONF=str(self.conf_path), **{MARKER: str(self.root)})
        self.env = env

    def _start_munged(self) -> None:
        key = self.root / "munge" / "munge.key"
        with open(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(os.urandom(1024))
        self._start_daemon("munged", [
            "munged", "--foreground", "--force",
            f"--socket={self.munge_socket}",
            f"--key-file={key}",
            f"--pid-file={self.root / 'munge' / 'munged.pid'}",
            f"--seed-file={self.root / 'munge' / 'munged.seed'}",
        ])  # --foreground logs to stderr (log/munged.stderr), not to --log-file

        def munge_works():
            if not self.munge_socket.exists():
                return False
            cred = subprocess.run(["munge", "-n", "-S", str(self.munge_socket)], capture_output=True, env=self.env)
            if cred.returncode != 0:
                return False
            back = subprocess.run(["unmunge", "-S", str(self.munge_socket)], input=cred.stdout,
                                  capture_output=True, env=self.env)
            return back.returncode == 0

        self._wait("munged to encode/decode a credential", munge_works)

    def _write_conf(self) -> None:
        r = self.root
        (r / "etc" / "plugstack.conf").write_text("")  # keep /etc/slurm/plugstack.conf.d out
        conf = f"""\
# Written by tests/slurm_cluster.py: a one-node test cluster on loopback.
ClusterName=dstrain-test
SlurmctldHost={self.hostname}(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job: BeginTime = requeue time + cred_expire + 1 (min 5, default 120).
AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}
StateSaveLocation={r / 'ctld'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}
SlurmdPidFile={r / 'run' / 'slurmd.pid'}
SlurmctldLogFile={self.log_path('slurmctld')}
SlurmdLogFile={self.log_path('slurmd')}
SlurmctldDebug={self.debug}
SlurmdDebug={self.debug}
PlugStackConfig={r / 'etc' / 'plugstack.conf'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Pending jobs whose BeginTime passed (e.g. requeued ones) start on the next full pass: make it every 1 s.
SchedulerParameters=sched_interval=1,bf_interval=1
PreemptType=preempt/none
MailProg=/bin/true
JobRequeue=1
ReturnToService=2
MinJobAge={self.min_job_age}
KillWait={self.kill_wait}
InactiveLimit=0
Waittime=0
MessageTimeout=10
SlurmctldTimeout=60
SlurmdTimeout=300
SlurmdParameters=config_overrides
NodeName={self.hostname} NodeAddr=127.0.0.1 NodeHostname={self.hostname} CPUs={self.cpus} RealMemory={self.real_memory_mb} State=UNKNOWN
PartitionName=debug Nodes={self.hostname} Default=YES MaxTime=INFINITE State=UP
{self.extra_conf}
"""
        self.conf_path.write_text(conf)

    def _start_daemon(self, name: str, command: list[str]) -> None:
        binary = shutil.which(command[0], path=SEARCH_PATH)
        stderr = open(self.root / "log" / f"{name}.stderr", "wb")
        try:
            self.procs[name] = subprocess.Popen(
                [binary, *command[1:]], env=self.env, stdin=subprocess.DEVNULL,
                stdout=stderr, stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        finally:
            stderr.close()

    def _wait(self, what: str, predicate, timeout: float | None = None, detail=lambda: "") -> None:
        deadline = time.monotonic() + (timeout or self.start_timeout)
        while True:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SlurmClusterError(f"{name} exited with {proc.returncode} while waiting for {what}")
            if predicate():
                return
            if time.monotonic() > deadline:
                raise SlurmClusterError(f"timed out waiting for {what} {detail()}".rstrip())
            time.sleep(0.2)

    def _ctld_up(self) -> bool:
        done = self.run("scontrol", "ping", check=False, timeout=15)
        return done.returncode == 0 and "UP" in done.stdout

    def _node_idle(self) -> bool:
        done = self.run("sinfo", "-h", "-N", "-n", self.hostname, "-o", "%T", check=False, timeout=15)
        return done.returncode == 0 and done.stdout.strip() == "idle"

    def _terminate(self, name: str, grace: float = 10) -> None:
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def _marked_pids(self) -> list[int]:
        """Processes carrying this cluster's marker in their environment (slurmstepd, job processes)."""
        mine = f"{MARKER}={self.root}".encode()
        skip = {os.getpid()}
        pid = os.getpid()
        while pid > 1:  # never our own ancestors
            try:
                pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                break
            skip.add(pid)
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in skip:
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if mine in environ.split(b"\0"):
                found.append(int(entry.name))
        return found

    def _stepds(self) -> list[int]:
        pids = []
        for pid in self._marked_pids():
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "slurmstepd":
                    pids.append(pid)
            except OSError:
                pass
        return pids

    def _kill_strays(self) -> None:
        daemon_pids = {p.pid for p in self.procs.values()}
        for sig, pause in ((signal.SIGTERM, 1.0), (signal.SIGKILL, 0.5)):
            strays = [pid for pid in self._marked_pids() if pid not in daemon_pids]
            if not strays:
                return
            for pid in strays:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(pause)


@pytest.fixture(scope="module")
def slurm_cluster():
    """A started LocalSlurmCluster for the test module (skips when slurm is not installed)."""
    skip_unless_installed()
    cluster = LocalSlurmCluster()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def _selfcheck() -> None:
    """`python tests/slurm_cluster.py`: start a cluster, run a 2-task job and one requeue cycle, print timings."""
    t0 = time.monotonic()
    with LocalSlurmCluster() as cluster:
        print(f"cluster up in {time.monotonic() - t0:.1f}s: {cluster.conf_path}")
        out = cluster.jobs_dir / "two-tasks.out"
        t = time.monotonic()
        job = cluster.sbatch("--ntasks=2", f"--output={out}", "--wrap", "srun hostname; srun env | grep SLURM_PROCID")
        info = cluster.wait_job(job, timeout=60)
        print(f"2-task job {info['JobState']} {info['ExitCode']} in {time.monotonic() - t:.1f}s:\n{out.read_text()}")
        assert info["JobState"] == "COMPLETED" and {"SLURM_PROCID=0", "SLURM_PROCID=1"} <= set(out.read_text().split())

        out = cluster.jobs_dir / "requeue.out"
        script = """#!/bin/bash
echo "run restart=${SLURM_RESTART_COUNT:-none}"
trap 'echo got USR1; exit 42' USR1
sleep 300 & wait
"""
        job = cluster.sbatch("--requeue", "--open-mode=append", f"--output={out}", script=script)
        cluster.wait_job(job, "RUNNING", timeout=60)
        time.sleep(1)
        cluster.signal(job, "USR1", batch=True)
        info = cluster.wait_job(job, timeout=60)
        assert (info["JobState"], info["ExitCode"]) == ("FAILED", "42:0"), info
        t = time.monotonic()
        cluster.requeue(job)
        info = cluster.wait_job(job, "RUNNING", restart_count=1, timeout=60)
        print(f"requeued job running again after {time.monotonic() - t:.1f}s (Restarts={info['Restarts']})")
        time.sleep(1)
        print(out.read_text())
        assert "run restart=1" in out.read_text()
    print(f"stopped; total {time.monotonic() - t0:.1f}s")


if __name__ == "__main__":
    _selfcheck()
