"""Dying with the parent: shared by engine cores and the server's child processes (torch-free)."""

from __future__ import annotations

import ctypes
import logging
import signal
import sys

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def set_parent_death_signal() -> None:
    """Linux: have the kernel send this process SIGTERM when its parent exits (callers keep a
    `getppid()` check as the fallback elsewhere).

    The kernel ties this to the parent *thread* that spawned us, so a parent must spawn its
    children from a thread that lives as long as it does (its main or event-loop thread).
    """
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            logger.debug("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    except (OSError, AttributeError) as e:
        logger.debug("prctl unavailable: %s", e)
