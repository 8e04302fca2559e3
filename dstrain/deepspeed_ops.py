"""DeepSpeed's C++ ops, loaded by dstrain before DeepSpeed would load them, so that a lock file left by a killed
process cannot hang every later run.

DeepSpeed builds its ops on first use through torch.utils.cpp_extension, and each process that loads one, even from
a finished build, first creates a `lock` file in the op's build directory and deletes it when done; any other
process waits for the file to go. A process killed in between (SIGKILL, the OOM killer, a preempted job's grace
period running out, a test's timeout) leaves the file behind, and every later run on the machine then waits
forever, printing nothing. dstrain loads each op a run needs under a lock of its own in the same directory, an
flock, which the kernel releases when its holder dies: a `lock` file found while holding it was left by a process
that died loading, and is deleted, with a warning. DeepSpeed then finds the op already loaded (it keeps loaded ops
per process) and takes no lock itself.

Limit: a program other than dstrain that loads the same op from the same directory at the same moment does not
take dstrain's lock, so its `lock` file could be taken for a stale one.
"""

import fcntl
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def op_build_directory(op_name: str) -> Path:
    """Where torch.utils.cpp_extension builds `op_name` (TORCH_EXTENSIONS_DIR, or its default under ~/.cache)."""
    # Private, but the only place that knows the layout; dstrain pins torch.
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(op_name, verbose=False))


def load_op(builder_name: str) -> None:
    """Load DeepSpeed's op `builder_name` (e.g. "FusedAdamBuilder") for this accelerator, clearing a stale lock."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops

    builder = get_accelerator().create_op_builder(builder_name)
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return
    if installed_ops.get(builder.NAME, False):
        # Built when DeepSpeed was installed: loading it takes no lock.
        builder.load(verbose=False)
        return
    directory = op_build_directory(builder.name)
    with open(directory / "dstrain.flock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        stale = directory / "lock"
        if stale.exists():
            log.warning("deleting %s, left by a process killed while it loaded DeepSpeed's %s op (every run "
                        "would otherwise wait for it forever)", stale, builder.name)
            stale.unlink()
        builder.load(verbose=False)
