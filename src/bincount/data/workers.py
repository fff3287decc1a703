"""Worker processes that stop with the process that started them, and only through it."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

from bincount.atomic import is_running

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int) -> None:
    """Make this process receive SIGKILL when its parent dies (Linux ``PR_SET_PDEATHSIG``).

    Called in a child process. If ``parent_pid`` is already gone (the child was orphaned before
    it got here), this process exits at once. Does nothing in ``parent_pid`` itself, in a
    process that is not its direct child, or where ``prctl`` does not exist (not Linux).

    Args:
        parent_pid: The process whose death should end this one.

    Raises:
        OSError: If ``prctl`` fails.
    """
    if os.getpid() == parent_pid or not sys.platform.startswith("linux"):
        return
    if os.getppid() != parent_pid:
        if is_running(parent_pid):  # a grandchild: its own parent is not ours to watch
            return
        os._exit(1)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)


def init_loader_worker(worker_id: int) -> None:
    """``worker_init_fn`` of every DataLoader: ignore SIGTERM and SIGINT, then seed as Lightning does.

    A signal sent to the process group reaches the workers too; torch's worker SIGTERM handler
    exits at once, and the main process then fails with ``DataLoader worker (pid N) is killed by
    signal: Terminated`` instead of stopping the run (``last.ckpt`` and the resume line). Ignoring
    the signal leaves the stop to the main process, which ends its workers itself. Seeding: with
    ``seed_everything(workers=True)`` (``PL_SEED_WORKERS=1``), Lightning's own
    ``pl_worker_init_function``, which it only adds to loaders that have no ``worker_init_fn``.

    Args:
        worker_id: The worker's index in its DataLoader.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        from lightning.fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id)
