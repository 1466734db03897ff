"""Processes that never outlive their parent.

`kill -9` of `python -m app` (or of `uvicorn --workers N`) gives its children no chance to be
stopped: without help, the workers keep serving the port and the embedded redis-server keeps
running. On Linux the kernel can signal a child when its parent dies (prctl PR_SET_PDEATHSIG);
elsewhere these functions do nothing.
"""

import ctypes
import ctypes.util
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    prctl: Callable[..., int] = libc.prctl
    return prctl


_PRCTL = _prctl()  # looked up once, before any fork: a forked child only calls it


def die_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> None:
    """Have the kernel send `sig` to this process when its parent dies, and send it now if the
    parent `parent_pid` is already gone (it died before this call).

    The kernel's "parent" is the thread that forked this process: fork from a thread that lives
    as long as the parent process does."""
    if _PRCTL is None:
        return
    _PRCTL(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), sig)


def child_dies_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A subprocess.Popen `preexec_fn` that makes the child die with this process."""
    parent = os.getpid()

    def preexec() -> None:
        die_with_parent(parent, sig)

    return preexec


def worker_dies_with_supervisor() -> None:
    """In a worker process started by a supervisor through multiprocessing (uvicorn's
    `--workers`, `python -m app`): end with a SIGTERM, uvicorn's graceful stop, when the
    supervisor dies. A process that is not such a worker is left alone."""
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid is not None:
        die_with_parent(parent.pid)
