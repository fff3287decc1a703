"""Worker processes that die with the process that started them, even one killed with SIGKILL.

``bincount data prepare`` arms its ``litdata.optimize`` workers with :func:`die_with_parent`
(Linux's parent-death signal), so a killed prepare leaves no worker writing chunks behind.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

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


def is_running(pid: int) -> bool:
    """Whether process ``pid`` exists (also when it belongs to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
