"""Start the ranks of a script on this machine as `deepspeed --num_gpus N --master_port P SCRIPT ARGS...` does,
for the tests' many short runs.

    python tests/launch_ranks.py --num_gpus N --master_port P SCRIPT ARGS...

DeepSpeed's launcher is two Python processes that each import deepspeed and torch before the first rank starts,
and it polls its ranks once a second: 7 s of every run on this project's 2-core machine, most of a short test
run. This does what deepspeed.launcher.launch does for one node, importing neither: each rank gets RANK,
LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE, CROSS_RANK, CROSS_SIZE, MASTER_ADDR and MASTER_PORT, the argument
`--local_rank=N` and this process's stdout and stderr; when a rank exits with an error the others are terminated
(killed after 30 s) and this process exits with the rank's code; SIGINT or SIGTERM terminates the ranks, exit
code 1. The tests about DeepSpeed's launcher itself, and those that run the README's commands, use `deepspeed`.
"""

import os
import signal
import subprocess
import sys
import time

import psutil

POLL_S = 0.05


def terminate(processes) -> None:
    """SIGTERM each rank and whatever it started, SIGKILL for those still alive after 30 s (DeepSpeed's
    terminate_process_tree)."""
    tree = []
    for process in processes:
        try:
            parent = psutil.Process(process.pid)
            tree += [*parent.children(recursive=True), parent]
        except psutil.NoSuchProcess:
            pass
    for member in tree:
        try:
            member.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=30)
    for member in alive:
        member.kill()


def main() -> None:
    args = sys.argv[1:]
    if len(args) < 5 or args[0] != "--num_gpus" or args[2] != "--master_port":
        sys.exit(f"usage: {sys.argv[0]} --num_gpus N --master_port P SCRIPT ARGS...")
    ranks, port, script, script_args = int(args[1]), args[3], args[4], args[5:]
    env = dict(os.environ, WORLD_SIZE=str(ranks), LOCAL_SIZE=str(ranks), CROSS_RANK="0", CROSS_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    processes = [
        subprocess.Popen([sys.executable, "-u", script, f"--local_rank={rank}", *script_args],
                         env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)))
        for rank in range(ranks)
    ]

    def stop(signum, frame):
        terminate(processes)
        sys.exit(1)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    while True:
        codes = [process.poll() for process in processes]
        failed = next((code for code in codes if code not in (None, 0)), None)
        if failed is not None:
            terminate([process for process in processes if process.poll() is None])
            sys.exit(failed)
        if all(code == 0 for code in codes):
            return
        time.sleep(POLL_S)


if __name__ == "__main__":
    main()
