"""Tie a worker's life to its launcher: when the launcher dies, the kernel kills the worker.

`accelerate launch` (and torch elastic under it) starts the distill workers as child
processes; killing the launcher (SIGKILL, a closed terminal, a job step cancelled) would
otherwise orphan them, and an orphan goes on writing checkpoints and the student into
outputs its orchestrator believes dead. Linux only (prctl PR_SET_PDEATHSIG); elsewhere a
no-op.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def launched() -> bool:
    """Started by a launcher (torch elastic or accelerate set these), not run by hand."""
    return "WORLD_SIZE" in os.environ or "ACCELERATE_MIXED_PRECISION" in os.environ


def tie_to_parent(sig: signal.Signals = signal.SIGKILL) -> bool:
    """Ask the kernel to send `sig` when the parent process exits; True if armed.

    SIGKILL, not SIGTERM: SIGTERM is the worker's "checkpoint and stop" signal, and a dead
    launcher's worker must not write anything more (its last atomic checkpoint stays)."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), sig)
    return True
